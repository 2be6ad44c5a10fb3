#!/usr/bin/env python
"""Q-Former attention, side by side, on the real shapes: 12 heads x 64, 32 queries, causal
self-attention (32 x 32 keys) and cross-attention to the 257 image tokens.

Providers: seed_fast's reference (eager, fp32 softmax), torch.compile of the reference, SDPA with
each backend that accepts the inputs (CUDA: flash / efficient / cudnn / math; CPU: torch's choice),
xformers memory_efficient_attention and flash-attn (when installed, CUDA only), and seed_fast's
backends ("sdpa" wrapper on CPU, "triton" on CUDA).
Batch {1, 32, 256}; fp32 / fp16 / bf16; forward and forward+backward.

Units:
  FLOP (forward)          = 4 * B * H * Dh * pairs, pairs = Lq * Lk (cross) or Lq (Lq + 1) / 2 (causal)
  FLOP (forward+backward) = 3.5 x forward   (backward = 5 matmuls of the 2 in forward; recompute not counted)
  GB/s (forward)          = (q + k + v + out) bytes / t
Every provider's forward output is compared with the float64 reference before timing (max abs err).

    python benchmarks/bench_qformer_attention.py [--quick] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_fn, write_results  # noqa: E402

from seed_fast.ops import qformer_attention, qformer_attention_ref  # noqa: E402
from seed_fast.ops.qformer_attention import not_supported_reasons  # noqa: E402

HEADS, DH, LQ, LK_IMAGE = 12, 64, 32, 257


def _sdpa_backends(device: str) -> dict:
    if device != "cuda":
        return {"SDPA (torch default)": None}
    from torch.nn.attention import SDPBackend

    return {
        "SDPA flash": SDPBackend.FLASH_ATTENTION,
        "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION,
        "SDPA cudnn": SDPBackend.CUDNN_ATTENTION,
        "SDPA math": SDPBackend.MATH,
    }


def make_providers(device: str) -> dict:
    """name -> fn(q, k, v, causal) -> out (B, H, Lq, Dh)."""
    prov = {"seed_fast ref (eager)": lambda q, k, v, c: qformer_attention_ref(q, k, v, causal=c)}
    compiled = torch.compile(lambda q, k, v, c: qformer_attention_ref(q, k, v, causal=c), dynamic=False)
    prov["torch.compile(ref)"] = compiled
    for name, backend in _sdpa_backends(device).items():
        if backend is None:
            prov[name] = lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c)
        else:
            from torch.nn.attention import sdpa_kernel

            def run(q, k, v, c, _b=backend):
                with sdpa_kernel(_b):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=c)

            prov[name] = run
    if device == "cuda":
        with contextlib.suppress(ImportError):
            import xformers.ops as xops

            def xf(q, k, v, c):
                bias = xops.LowerTriangularMask() if c else None
                out = xops.memory_efficient_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
                )
                return out.transpose(1, 2)

            prov["xformers mem-efficient"] = xf
        with contextlib.suppress(ImportError):
            from flash_attn import flash_attn_func

            prov["flash-attn 2"] = lambda q, k, v, c: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c
            ).transpose(1, 2)
    ours = ("sdpa", "triton") if device == "cuda" else ("sdpa",)
    for impl in ours:
        prov[f"seed_fast {impl}"] = lambda q, k, v, c, _i=impl: qformer_attention(q, k, v, causal=c, impl=_i)
    # what a user gets: the dispatch table's choice (under CUDA-graph timing, its "graph" column)
    prov["seed_fast auto"] = lambda q, k, v, c: qformer_attention(q, k, v, causal=c)
    return prov


def _inputs(b, lk, dtype, device, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, L, H, Dh) storage viewed as (B, H, L, Dh): the layout the model's projections produce
    q = torch.randn(b, LQ, HEADS, DH, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(b, lk, HEADS, DH, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(b, lk, HEADS, DH, generator=g).to(device, dtype).transpose(1, 2)
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--dtypes", default=None, help="comma list (default: all three on CUDA, float32,bfloat16 on CPU)")
    p.add_argument("--batches", default=None, help="comma list (default 1,32,256)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    p.add_argument("--skip", default=None, help="regular expression: providers to leave out")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = args.device
    dtypes = args.dtypes or ("float32,float16,bfloat16" if device == "cuda" else "float32,bfloat16")
    dtypes = [getattr(torch, d) for d in dtypes.split(",")]
    batches = [int(b) for b in (args.batches or ("1,32" if args.quick else "1,32,256")).split(",")]
    repeats = 5 if args.quick else (10 if device == "cpu" else 50)
    providers = make_providers(device)
    if args.skip:
        providers = {n: f for n, f in providers.items() if not re.search(args.skip, n)}

    rows = []
    for dtype in dtypes:
        for b in batches:
            for kind, lk, causal in (("self (causal)", LQ, True), ("cross", LK_IMAGE, False)):
                pairs = LQ * (LQ + 1) // 2 if causal else LQ * lk
                fwd_flop = 4 * b * HEADS * DH * pairs
                q, k, v = _inputs(b, lk, dtype, device, grad=False)
                ref64 = qformer_attention_ref(q.double(), k.double(), v.double(), causal=causal)
                for mode in args.modes.split(","):
                    for name, fn in providers.items():
                        row = {
                            "dtype": str(dtype).replace("torch.", ""),
                            "B": b,
                            "attention": kind,
                            "mode": mode,
                            "provider": name,
                        }
                        if name.startswith("seed_fast triton") and not_supported_reasons("triton", q, k, v):
                            continue
                        try:
                            with torch.no_grad():
                                err = (fn(q, k, v, causal).double() - ref64).abs().max().item()
                            if mode == "fwd":
                                with torch.no_grad():
                                    t = time_fn(
                                        lambda fn=fn: fn(q, k, v, causal), device, repeats=repeats, max_seconds=5
                                    )
                                flop = fwd_flop
                            else:
                                qg, kg, vg = _inputs(b, lk, dtype, device, grad=True)
                                go = torch.randn_like(qg)

                                def step(fn=fn, qg=qg, kg=kg, vg=vg, go=go):
                                    qg.grad = kg.grad = vg.grad = None
                                    fn(qg, kg, vg, causal).backward(go)

                                t = time_fn(step, device, repeats=repeats, max_seconds=5)
                                flop = 3.5 * fwd_flop
                        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
                            row["note"] = f"cannot run: {str(e).splitlines()[0][:80]}"
                            rows.append(row)
                            continue
                        sec = t["median_ms"] / 1e3
                        nbytes = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
                        row.update(
                            us=f"{t['median_ms'] * 1e3:.1f}",
                            iqr=f"{t['q1_ms'] * 1e3:.1f}-{t['q3_ms'] * 1e3:.1f}",
                            tflops=f"{flop / sec / 1e12:.3f}",
                            gbs=f"{nbytes / sec / 1e9:.1f}" if mode == "fwd" else "",
                            err=f"{err:.1e}",
                            host_us=f"{t['host_us']:.1f}",
                            method=t["method"],
                        )
                        rows.append(row)
                        print(
                            f"{row['dtype']:8s} B={b:4d} {kind:13s} {mode:7s} {name:24s} {row['us']:>10s} us "
                            f"{row['tflops']:>8s} TFLOP/s  err {row['err']}",
                            flush=True,
                        )
    columns = [
        ("dtype", "dtype"),
        ("B", "B"),
        ("attention", "attention"),
        ("mode", "mode"),
        ("provider", "provider"),
        ("us", "median us"),
        ("iqr", "IQR us"),
        ("tflops", "TFLOP/s"),
        ("gbs", "GB/s (fwd)"),
        ("err", "max err vs fp64"),
        ("host_us", "host us/call"),
        ("method", "timing"),
        ("note", "note"),
    ]
    md = (
        f"{HEADS} heads x {DH}, {LQ} queries; self = causal 32 x 32, cross = 32 x {LK_IMAGE}; {repeats} timed "
        "repeats.\nFLOP fwd = 4 B H Dh pairs; fwd+bwd = 3.5 x fwd; GB/s = (q + k + v + out) bytes / t.\n\n"
    )
    md += markdown_table(rows, columns)
    folder = write_results(
        "bench_qformer_attention", device, rows, md, args.out, {"quick": args.quick}, roofline_math="fp32"
    )
    print(md)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
