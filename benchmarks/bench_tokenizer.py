#!/usr/bin/env python
"""The causal Q-Former and the whole tokenizer (ViT + Q-Former + quantizer), side by side.

Part 1, Q-Former forward on 257 x 1408 image features (full-size, seed-tokenizer-2):
  transformers' Blip2QFormerModel (eager, the same weights, causal query mask), seed_fast's
  reference path, seed_fast to_fast(), torch.compile(to_fast()), and on CUDA to_fast() replayed
  as a CUDA graph.
Part 2, images -> codes (encode):
  the reference path, the same model in eager PyTorch with SDPA attention everywhere (the baseline
  a user gets by switching attention alone), that baseline under torch.compile (`--compile`, by
  default mode "max-autotune" on CUDA), to_fast(), on CUDA to_fast(cuda_graph=False / True), and
  to_fast() with the ViT's linear layers in FP8 (torchao float8 dynamic activations and weights;
  sm_89+, `--fp8`). Codes are compared with an fp32 copy of the model on the reference path, on the
  timed random images and on scikit-image's sample photographs ("photos" column).

Units: images/s = B / t; Q-Former GFLOP/s uses 2 * multiply-adds of its matmuls (FLOP counted in
qformer_flop below). Outputs of every provider are compared with the reference before timing.

    python benchmarks/bench_tokenizer.py [--quick] [--device cpu|cuda] [--dtype float16] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, peak_extra_bytes, time_fn, write_results  # noqa: E402

from seed_fast import SeedTokenizer  # noqa: E402
from seed_fast.models.checkpoint import ours_to_hf_qformer  # noqa: E402


def qformer_flop(cfg, b: int) -> float:
    """Matmul FLOP of one Q-Former forward for batch b (2 per multiply-add)."""
    q, length, enc = cfg.qformer, cfg.vision.num_tokens, cfg.vision.width
    nq, h, f = q.num_queries, q.hidden, q.ffn
    n_cross = sum(1 for i in range(q.layers) if i % q.cross_attention_freq == 0)
    per_layer = 4 * nq * h * h + 2 * nq * nq * h + 2 * nq * h * f  # self QKV+out, scores+PV, FFN
    cross = 2 * nq * h * h + 2 * length * enc * h + 2 * nq * length * h  # Q+out, K+V of the image, attention
    return 2.0 * b * (q.layers * per_layer + n_cross * cross)


def _hf_qformer(tok):
    import transformers

    cfg = tok.config
    q = cfg.qformer
    hf_cfg = transformers.Blip2QFormerConfig(
        hidden_size=q.hidden,
        num_hidden_layers=q.layers,
        num_attention_heads=q.heads,
        intermediate_size=q.ffn,
        encoder_hidden_size=cfg.vision.width,
        cross_attention_frequency=q.cross_attention_freq,
        layer_norm_eps=q.ln_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = transformers.Blip2QFormerModel(hf_cfg).eval()
    sd = ours_to_hf_qformer(tok.state_dict())
    query_tokens = sd.pop("query_tokens")
    hf.load_state_dict(sd, strict=True)
    return hf.to(tok.device, tok.dtype), query_tokens.to(tok.device, tok.dtype)


def _timed_row(part, b, name, fn, ref, device, repeats, flop=None):
    with torch.no_grad():
        out = fn()
        if out.is_floating_point():
            err = f"{((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item():.1e} rel"
        else:
            err = f"{(out == ref).float().mean().item() * 100:.2f}% codes equal"
        t = time_fn(fn, device, warmup=1 if device == "cpu" else 3, repeats=repeats, max_seconds=30)
    sec = t["median_ms"] / 1e3
    row = {
        "part": part,
        "B": b,
        "provider": name,
        "ms": f"{t['median_ms']:.3f}",
        "iqr": f"{t['q1_ms']:.3f}-{t['q3_ms']:.3f}",
        "img_s": f"{b / sec:.1f}",
        "check": err,
    }
    if flop is not None:
        row["gflops"] = f"{flop / sec / 1e9:.1f}"
    print(f"{part:9s} B={b:4d} {name:34s} {row['ms']:>10s} ms  {row['img_s']:>9s} img/s  {err}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    p.add_argument(
        "--config",
        default="seed-tokenizer-2",
        help="a preset (random weights) or a SeedTokenizer folder, "
        "e.g. seed_fast/default_model/assets/tokenizer (the embedded model)",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--qformer-batches", default=None, help="default 1,32,256 (CUDA) or 1,8 (CPU)")
    p.add_argument("--tokenizer-batches", default=None, help="default 1,32,256 (CUDA) or 1 (CPU)")
    p.add_argument(
        "--compile",
        default=None,
        choices=["none", "default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode of the eager + SDPA peer (default max-autotune on CUDA, none on CPU)",
    )
    p.add_argument("--fp8", default=None, choices=["on", "off"], help="default on where the GPU has FP8 (sm_89+)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = args.device
    dtype = getattr(torch, args.dtype or ("float16" if device == "cuda" else "float32"))
    cuda = device == "cuda"
    qb = args.qformer_batches if args.qformer_batches is not None else ("1,32,256" if cuda else "1,8")
    tb = args.tokenizer_batches if args.tokenizer_batches is not None else ("1,32,256" if cuda else "1")
    qb, tb = ([int(x) for x in v.split(",") if x] for v in (qb, tb))  # "" skips a part
    if args.quick:
        qb, tb = qb[:2], tb[:1]
    repeats = 7 if device == "cpu" else 30

    print(f"building {args.config} ({dtype}, {device}) ...", flush=True)
    from pathlib import Path

    folder_cfg = Path(args.config).is_dir()
    # a preset gets uniform unit-scale weights: speed does not depend on them, and the full size builds in
    # seconds instead of the minute its truncated-normal init takes on 2 cores
    tok = (
        SeedTokenizer.from_pretrained(args.config)
        if folder_cfg
        else SeedTokenizer.from_config(args.config, seed=0, init="uniform")
    )
    tok = tok.to(device, dtype).eval()
    cfg = tok.config
    rows = []

    # ---- part 1: Q-Former forward
    hf = None
    with contextlib.suppress(ImportError):
        hf, query_tokens = _hf_qformer(tok)
    g = torch.Generator().manual_seed(0)
    for b in qb:
        feats = torch.randn(b, cfg.vision.num_tokens, cfg.vision.width, generator=g).to(device, dtype)
        tok.to_reference()
        with torch.no_grad():
            ref = tok.qformer(feats)
        flop = qformer_flop(cfg, b)
        provs = {}
        if hf is not None:
            mask = torch.ones(b, 1, 32, 32, dtype=torch.bool, device=device).tril()
            qt = query_tokens.expand(b, -1, -1)
            provs["transformers Blip2QFormerModel"] = (
                lambda feats=feats, mask=mask, qt=qt: (
                    hf(query_embeds=qt, attention_mask=mask, encoder_hidden_states=feats).last_hidden_state
                ),
                None,
            )
        provs["seed_fast reference"] = (lambda feats=feats: tok.qformer(feats), "ref")
        provs["seed_fast to_fast()"] = (lambda feats=feats: tok.qformer(feats), "fast")
        if not (args.quick and not cuda):  # on CPU, compiling for each batch takes most of a quick run
            compiled = torch.compile(tok.qformer, dynamic=False)
            provs["torch.compile(to_fast())"] = (lambda feats=feats, c=compiled: c(feats), "fast")
        if cuda:
            from seed_fast.models.cuda_graph import GraphedForward

            graphed = GraphedForward(tok.qformer, prepare=tok.qformer.refresh_fused)
            provs["to_fast() + CUDA graph"] = (lambda feats=feats, gr=graphed: gr(feats), "fast")
        for name, (fn, mode) in provs.items():
            if mode == "ref":
                tok.to_reference()
            elif mode == "fast":
                tok.to_fast()
            try:
                rows.append(_timed_row("Q-Former", b, name, fn, ref, device, repeats, flop))
            except Exception as e:  # a provider that fails is reported in the table, the run goes on
                rows.append({"part": "Q-Former", "B": b, "provider": name, "note": f"failed: {str(e)[:80]}"})

    # ---- part 2: images -> codes, against an fp32 copy on the reference path
    compile_mode = args.compile or ("max-autotune" if cuda else "none")
    fp8 = (args.fp8 or ("on" if cuda and torch.cuda.get_device_capability() >= (8, 9) else "off")) == "on"
    ref32 = _fp32_reference(tok) if tb else None
    photos = _photos() if tb else []
    photo_ref = ref32.encode(photos) if photos else None
    for b in tb:
        images = torch.rand(b, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        ref_codes = ref32.encode(images)
        modes = {  # name -> setup, returning the tokenizer to time
            "seed_fast reference (eager)": lambda: tok.to_reference(),
            "eager + SDPA attention": lambda: _sdpa_everywhere(tok.to_reference()),
            "seed_fast to_fast()": lambda: tok.to_fast(),
        }
        if cuda:  # to_fast() replays graphs for batches <= 32 by default ("auto"); beside it, none and all
            modes["to_fast(cuda_graph=False)"] = lambda: tok.to_fast(cuda_graph=False)
            modes["to_fast(cuda_graph=True)"] = lambda: tok.to_fast(cuda_graph=True)
        if fp8:
            modes["to_fast() + FP8 ViT (torchao)"] = lambda: _fp8_vit(tok)
        if compile_mode != "none":
            modes[f'eager + SDPA, torch.compile("{compile_mode}")'] = lambda: _compiled(tok, compile_mode)
            modes["to_fast(compile_vit=True)"] = lambda: tok.to_fast(compile_vit=True)
        for name, setup in modes.items():
            try:
                run = setup()
            except Exception as e:  # e.g. no FP8 kernels for this GPU: reported, the run goes on
                rows.append({"part": "tokenizer", "B": b, "provider": name, "note": f"failed: {str(e)[:80]}"})
                continue
            rows.append(
                _timed_row(
                    "tokenizer",
                    b,
                    name,
                    lambda images=images, run=run: run.encode(images),
                    ref_codes,
                    device,
                    max(2, repeats // 3),
                )
            )
            if photo_ref is not None:
                rows[-1]["photos"] = f"{(run.encode(photos) == photo_ref).float().mean().item() * 100:.2f}%"
            peak = peak_extra_bytes(lambda images=images, run=run: run.encode(images), device)
            rows[-1]["peak_mb"] = f"{peak / 2**20:.1f}" if peak is not None else "n/a"
            if run is not tok:
                del run
        _uncompile(tok)
    tok.to_reference()  # also drops the compiled ViT blocks
    del ref32

    # ---- part 3: codes -> generation embedding (the de-tokenizer, reference path: no fused kernel of ours)
    for b in sorted({1, *tb, 32}):
        codes = torch.randint(0, tok.codebook_size, (b, tok.num_codes), generator=g)
        with torch.no_grad():
            ref_emb = tok.decode(codes)
        rows.append(
            _timed_row(
                "de-tokenizer", b, "seed_fast decode", lambda codes=codes: tok.decode(codes), ref_emb, device, repeats
            )
        )
        peak = peak_extra_bytes(lambda codes=codes: tok.decode(codes), device)
        rows[-1]["peak_mb"] = f"{peak / 2**20:.1f}" if peak is not None else "n/a"

    columns = [
        ("part", "part"),
        ("B", "B"),
        ("provider", "provider"),
        ("ms", "median ms"),
        ("iqr", "IQR ms"),
        ("img_s", "images/s"),
        ("gflops", "GFLOP/s (Q-Former matmuls)"),
        ("peak_mb", "peak extra MB"),
        ("check", "vs reference"),
        ("photos", f"photos ({len(photos)}) vs fp32"),
        ("note", "note"),
    ]
    v = cfg.vision
    weights = (
        "the embedded model's weights"
        if folder_cfg
        else "random weights, init 'uniform' (speed does not depend on them)"
    )
    md = (
        f"{cfg.name}, {str(dtype).replace('torch.', '')}, {weights}. Q-Former input: (B, {v.num_tokens}, {v.width}) "
        f"features; tokenizer: {v.image_size} x {v.image_size} images -> {tok.num_codes} codes; de-tokenizer: codes -> "
        "generation embedding.\n\n"
    )
    md += markdown_table(rows, columns)
    suffix = "_embedded" if folder_cfg else ""
    folder = write_results(
        f"bench_tokenizer{suffix}_{str(dtype).replace('torch.', '')}",
        device,
        rows,
        md,
        args.out,
        {"quick": args.quick, "config": args.config},
    )
    print(md)
    print(f"results in {folder}")
    return 0


def _sdpa_everywhere(tok):
    """Reference structure (no fusion), SDPA for every attention: the eager-PyTorch baseline."""
    for layer in tok.qformer.layers:
        layer.attention.self.attn_impl = "sdpa"
        if layer.has_cross_attention:
            layer.crossattention.self.attn_impl = "sdpa"
    for blk in tok.vision.blocks:
        blk.attn.attn_impl = "sdpa"
    return tok


def _compiled(tok, mode: str):
    """The eager + SDPA baseline with its ViT and Q-Former under torch.compile(mode) (undone by
    _uncompile)."""
    _sdpa_everywhere(tok.to_reference())
    for m in (tok.vision, tok.qformer):
        m.compile(mode=mode)
    return tok


def _uncompile(tok):
    for m in (tok.vision, tok.qformer):
        m._compiled_call_impl = None


def _fp8_vit(tok):
    """A copy of to_fast() with the ViT's linear layers in FP8 (torchao: dynamic per-tensor scales for
    activations, weights scaled once)."""
    import copy

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    fast = copy.deepcopy(tok.to_reference()).to_fast(cuda_graph=False)
    quantize_(fast.vision, Float8DynamicActivationFloat8WeightConfig())
    return fast


def _fp32_reference(tok):
    """An fp32 copy of the tokenizer on the reference path: the codes every provider is held to."""
    import copy

    return copy.deepcopy(tok.to_reference()).float()


def _photos() -> list:
    """scikit-image's bundled sample photographs as RGB PIL images (none without scikit-image)."""
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        return []
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "horse", "immunohistochemistry"):
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a sample that needs a download, or a changed scikit-image
            continue
        if img.dtype == bool:
            img = img.astype("uint8") * 255
        out.append(Image.fromarray(img).convert("RGB"))
    return out


if __name__ == "__main__":
    sys.exit(main())
