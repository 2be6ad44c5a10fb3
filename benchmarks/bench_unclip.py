#!/usr/bin/env python
"""SEED's last step, generation embedding -> image through Stable unCLIP: images/s of diffusers'
pipeline as it comes against the same pipeline after seed_fast's `speed_up_pipeline`.

Shape "sd21-unclip-h": Stable unCLIP 2.1 (H)'s modules with random weights: the SD 2.1 UNet (320 /
640 / 1280 / 1280 channels, 2 layers per block, linear projections, cross-attention 1024, class
projection of 2 x 1024 for the image embedding and its noise level), the OpenCLIP-H text encoder's
shape (1024 x 23 layers; run once per call for the empty prompt), the SD VAE; 768 x 768 images.
The CLIP image encoder is never run (the embedding is given) and is built tiny. "tiny": the test
pipeline's shape. Both come from seed_fast.models.decoders.unclip.random_unclip_pipeline. Both
providers draw from the same embeddings with the same generator; "max diff" is the largest
difference between their images (values in [0, 1]).

Units: images/s = batch / median time of the whole call (every step with classifier-free guidance,
so the UNet sees 2 x batch; the VAE decode included).

    python benchmarks/bench_unclip.py [--shape sd21-unclip-h] [--batches 1,8] [--steps 25] [--compile default]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_fn, write_results  # noqa: E402

from seed_fast.models.decoders.fast import COMPILE_MODES, speed_up_pipeline  # noqa: E402


def build(shape: str, device: str, dtype: torch.dtype):
    """diffusers' own StableUnCLIPImg2ImgPipeline of `shape`, random weights; (pipe, embedding dim)."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    from seed_fast.models.decoders.unclip import random_unclip_pipeline

    dim, sample = (1024, 96) if shape == "sd21-unclip-h" else (32, 8)
    pipe = random_unclip_pipeline(
        shape, embed_dim=dim, sample_size=sample, dtype=dtype, device=device, cls=StableUnCLIPImg2ImgPipeline
    )
    return pipe, dim


SHAPES = ("sd21-unclip-h", "tiny")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, choices=SHAPES, help="default sd21-unclip-h (CUDA), tiny (CPU)")
    p.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=10.0)
    p.add_argument(
        "--compile",
        default=None,
        choices=[str(m) for m in COMPILE_MODES],
        help="speed_up_pipeline's compile mode (default: 'default' on CUDA, None on CPU)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = args.device
    cuda = device == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    shape = args.shape or ("sd21-unclip-h" if cuda else "tiny")
    mode = args.compile or ("default" if cuda else "None")
    mode = None if mode == "None" else mode
    batches = [int(b) for b in args.batches.split(",") if b]

    print(f"building {shape} ({dtype}, {device}) ...", flush=True)
    pipe, dim = build(shape, device, dtype)
    g = torch.Generator().manual_seed(0)
    embeds = {b: torch.randn(b, dim, generator=g).to(device, dtype) for b in batches}

    def draw(b):
        out = pipe(
            prompt=[""] * b,
            image_embeds=embeds[b],
            noise_level=0,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
        )
        return out.images

    rows, stock = [], {}
    for name in ("diffusers pipeline as it comes", f"seed_fast speed_up_pipeline(compile_mode={mode!r})"):
        if name.startswith("seed_fast"):
            speed_up_pipeline(pipe, compile_mode=mode)
        for b in batches:
            with torch.no_grad():
                images = draw(b)  # the first call of a batch size compiles
                diff = "-" if b not in stock else f"{(images.float() - stock[b].float()).abs().max().item():.1e}"
                stock.setdefault(b, images)
                tm = time_fn(lambda b=b: draw(b), device, warmup=0, repeats=args.repeats, max_seconds=120, graph=False)
            sec = tm["median_ms"] / 1e3
            row = {
                "shape": shape,
                "B": b,
                "steps": args.steps,
                "provider": name,
                "ms": f"{tm['median_ms']:.1f}",
                "iqr": f"{tm['q1_ms']:.1f}-{tm['q3_ms']:.1f}",
                "img_s": f"{b / sec:.3f}",
                "max_diff": diff,
                "method": tm["method"],
            }
            rows.append(row)
            print(f"B={b:3d} {name:48s} {row['ms']:>10s} ms  {row['img_s']:>8s} images/s  max diff {diff}", flush=True)
    for r in rows:
        ref = next(x for x in rows if x["B"] == r["B"])
        r["speedup"] = f"{float(r['img_s']) / float(ref['img_s']):.2f}x"

    columns = [
        ("B", "batch"),
        ("provider", "provider"),
        ("ms", "median ms / call"),
        ("iqr", "IQR ms"),
        ("img_s", "images/s"),
        ("speedup", "vs diffusers"),
        ("max_diff", "max diff vs diffusers"),
        ("method", "timing"),
    ]
    md = (
        f"{shape} (random weights), {str(dtype).replace('torch.', '')}, {args.steps} steps, guidance "
        f"{args.guidance:g} (classifier-free: the UNet sees 2 x batch), SDPA attention in both.\n\n"
    )
    md += markdown_table(rows, columns)
    folder = write_results(
        f"bench_unclip_{shape}_{str(dtype).replace('torch.', '')}",
        device,
        rows,
        md,
        args.out,
        {"shape": shape, "steps": args.steps, "compile_mode": mode},
    )
    print(md)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
