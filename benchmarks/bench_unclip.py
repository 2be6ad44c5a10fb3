#!/usr/bin/env python
"""SEED's last step, generation embedding -> image through Stable unCLIP: images/s of diffusers'
pipeline as it comes against the same pipeline after seed_fast's `speed_up_pipeline`.

Shape "sd21-unclip-h": Stable unCLIP 2.1 (H)'s modules with random weights: the SD 2.1 UNet (320 /
640 / 1280 / 1280 channels, 2 layers per block, linear projections, cross-attention 1024, class
projection of 2 x 1024 for the image embedding and its noise level), the OpenCLIP-H text encoder's
shape (1024 x 23 layers; run once per call for the empty prompt), the SD VAE; 768 x 768 images.
The CLIP image encoder is never run (the embedding is given) and is built tiny. "tiny": the test
pipeline. Both providers draw from the same embeddings with the same generator; "max diff" is the
largest difference between their images (values in [0, 1]).

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


def sd21_unclip_h(device: str, dtype: torch.dtype):
    """A StableUnCLIPImg2ImgPipeline of Stable unCLIP 2.1 (H)'s shapes, random weights, on device."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from seed_fast.models.decoders.unclip import _tiny_clip_tokenizer

    tokenizer = _tiny_clip_tokenizer(77)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=96,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                attention_head_dim=(5, 10, 20, 20),
                cross_attention_dim=1024,
                use_linear_projection=True,
                class_embed_type="projection",
                projection_class_embeddings_input_dim=2048,
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                sample_size=768,
            )
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_hidden_layers=23,
                    num_attention_heads=16,
                    max_position_embeddings=77,
                    hidden_act="gelu",
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
            image_encoder = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=224,
                    patch_size=14,
                    projection_dim=1024,
                )
            )
            normalizer = StableUnCLIPImageNormalizer(embedding_dim=1024)
    finally:
        torch.set_default_dtype(old)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(),
        image_encoder=image_encoder,
        image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            set_alpha_to_one=False,
            steps_offset=1,
            clip_sample=False,
        ),
        vae=vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, 1024


def tiny(device: str, dtype: torch.dtype):
    from seed_fast.models.decoders.unclip import tiny_unclip_pipeline

    return tiny_unclip_pipeline(embed_dim=32, sample_size=8, seed=0, dtype=dtype).to(device), 32


SHAPES = {"sd21-unclip-h": sd21_unclip_h, "tiny": tiny}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default sd21-unclip-h (CUDA), tiny (CPU)")
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
    pipe, dim = SHAPES[shape](device, dtype)
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
