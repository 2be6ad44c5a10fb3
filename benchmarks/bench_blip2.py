#!/usr/bin/env python
"""transformers' BLIP-2 Q-Former, stock against apply_seed_fast_to_blip2, side by side.

The released BLIP-2 Q-Former shape (random weights: speed does not depend on them): 12 layers, hidden
768, 12 heads, FFN 3072, 32 query tokens, cross-attention every other layer to 257 image tokens of
width 1408, called as Blip2ForConditionalGeneration calls it (query tokens, image features, an all-ones
image mask). Providers: the stock Blip2QFormerModel with attn_implementation "eager" and "sdpa" (the
default), and the same model after apply_seed_fast_to_blip2 (from the "sdpa" one). Batch 1 and 256.

Units: GFLOP/s = Q-Former matmul FLOP / t, with the FLOP (2 per multiply-add) counted in qformer_flop
below; "vs stock" = stock sdpa median / this provider's median. Each provider's output is compared with
the stock eager model's (max abs error / max abs value) before timing.

    python benchmarks/bench_blip2.py [--device cpu|cuda] [--dtype float32] [--batches 1,256]
                                     [--shape released|tiny] [--repeats N] [--out [DIR]]

Results are written only with --out: to DIR, or to benchmarks/results/<device>/ when --out has no DIR.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_fn, write_results  # noqa: E402

from seed_fast.integrations import apply_seed_fast_to_blip2  # noqa: E402

SHAPES = {
    # hidden, layers, heads, ffn, queries, image tokens, image width
    "released": dict(hidden=768, layers=12, heads=12, ffn=3072, queries=32, tokens=257, width=1408),
    "tiny": dict(hidden=64, layers=2, heads=4, ffn=96, queries=8, tokens=17, width=48),
}


def qformer_flop(s: dict, b: int) -> float:
    """Matmul FLOP of one Q-Former forward over queries only (2 per multiply-add)."""
    d, q, f, t, w = s["hidden"], s["queries"], s["ffn"], s["tokens"], s["width"]
    n_cross = len(range(0, s["layers"], 2))
    per_layer = 4 * q * d * d + 2 * q * q * d + 2 * q * d * f  # QKV + out projections, scores + PV, FFN
    cross = 2 * q * d * d + 2 * t * w * d + 2 * q * t * d  # Q + out, K + V of the image, scores + PV
    return 2.0 * b * (s["layers"] * per_layer + n_cross * cross)


def build(shape: dict, device: str, dtype: torch.dtype) -> dict:
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=shape["ffn"],
        encoder_hidden_size=shape["width"],
        cross_attention_frequency=2,
    )
    sdpa = Blip2QFormerModel._from_config(cfg, attn_implementation="sdpa").to(device, dtype).eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    patched = apply_seed_fast_to_blip2(copy.deepcopy(sdpa))
    return {
        "transformers eager": eager,
        "transformers sdpa (stock default)": sdpa,
        "seed_fast apply_seed_fast_to_blip2": patched,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 (BLIP-2 keeps its Q-Former in fp32), float16, bfloat16")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--shape", choices=sorted(SHAPES), default="released")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (CPU) or 30 (CUDA)")
    p.add_argument("--out", nargs="?", const="", default=None, help="write results (to DIR, or results/<device>)")
    args = p.parse_args(argv)
    device, dtype, shape = args.device, getattr(torch, args.dtype), SHAPES[args.shape]
    repeats = args.repeats or (5 if device == "cpu" else 30)
    batches = [int(x) for x in args.batches.split(",") if x]

    torch.manual_seed(0)
    models = build(shape, device, dtype)
    stock_name = "transformers sdpa (stock default)"
    query_tokens = torch.randn(1, shape["queries"], shape["hidden"], device=device, dtype=dtype)
    rows = []
    for b in batches:
        feats = torch.randn(b, shape["tokens"], shape["width"], device=device, dtype=dtype)
        image_mask = torch.ones(b, shape["tokens"], dtype=torch.long, device=device)
        qt = query_tokens.expand(b, -1, -1)
        fns = {
            name: (
                lambda m=m: (
                    m(query_embeds=qt, encoder_hidden_states=feats, encoder_attention_mask=image_mask).last_hidden_state
                )
            )
            for name, m in models.items()
        }
        with torch.no_grad():
            ref = fns["transformers eager"]().float()
            group = []
            for name, fn in fns.items():
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                t = time_fn(fn, device, warmup=1 if device == "cpu" else 3, repeats=repeats, max_seconds=60)
                group.append((name, t, err))
        stock_ms = next(t["median_ms"] for name, t, _ in group if name == stock_name)
        for name, t, err in group:
            row = {
                "B": b,
                "provider": name,
                "ms": f"{t['median_ms']:.3f}",
                "iqr": f"{t['q1_ms']:.3f}-{t['q3_ms']:.3f}",
                "gflops": f"{qformer_flop(shape, b) / (t['median_ms'] / 1e3) / 1e9:.1f}",
                "vs_stock": f"{stock_ms / t['median_ms']:.2f}x",
                "method": t["method"],
                "check": f"{err:.1e} rel",
            }
            rows.append(row)
            print(f"B={b:4d} {name:38s} {row['ms']:>10s} ms  {row['vs_stock']:>6s}  {row['check']}", flush=True)

    columns = [
        ("B", "B"),
        ("provider", "provider"),
        ("ms", "median ms"),
        ("iqr", "IQR ms"),
        ("gflops", "GFLOP/s (Q-Former matmuls)"),
        ("vs_stock", "vs stock sdpa"),
        ("method", "timing"),
        ("check", "vs stock eager"),
    ]
    md = (
        f"transformers Blip2QFormerModel, {args.shape} shape {shape}, {args.dtype}, random weights; "
        f"input: {shape['queries']} query tokens, (B, {shape['tokens']}, {shape['width']}) image features, "
        "an all-ones image mask.\n\n" + markdown_table(rows, columns)
    )
    print(md)
    if args.out is not None:
        folder = write_results(
            f"bench_blip2_{args.dtype}", device, rows, md, args.out or None, {"shape": args.shape, "repeats": repeats}
        )
        print(f"results in {folder}")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
