"""Faster image decoding with a diffusers pipeline's own modules (Stable unCLIP, or the embedded
model's SeedImageDecoderPipeline): SDPA attention with the q / k / v projections fused into one
matmul, channels-last convolutions, and the UNet and the VAE's decoder under torch.compile.

    from seed_fast.models.decoders.fast import speed_up_pipeline
    pipe = speed_up_pipeline(load_unclip_pipeline(folder, device="cuda", dtype=torch.float16))

Everything happens in place, on the pipeline's modules (weights are not copied), and
`undo_speed_up(pipe)` returns them to diffusers' defaults. The images agree with the stock pipeline's
to within the dtype's rounding (benchmarks/bench_unclip.py measures both).
"""

from __future__ import annotations

import torch

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _modules(pipe) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(
            f"speed_up_pipeline needs a diffusers pipeline with a UNet, got {type(pipe).__module__}."
            f"{type(pipe).__qualname__}"
        )
    vae = getattr(pipe, "vae", None)
    return unet, vae if isinstance(vae, torch.nn.Module) else None


def speed_up_pipeline(pipe, *, compile_mode: str | None = "default", fuse_qkv: bool = True, channels_last: bool = True):
    """Make `pipe` draw faster, in place; returns it.

    compile_mode: torch.compile mode for the UNet and the VAE decoder (None: no compilation, e.g. on
    the CPU, where the first call would spend minutes compiling); the first call of each new batch
    size compiles. fuse_qkv: one matmul for q, k and v (k and v in cross-attention); channels_last:
    the convolutions' preferred memory format on tensor cores.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    unet, vae = _modules(pipe)
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())  # SDPA (diffusers' default; set in case it was changed)
    for m in (unet, vae):
        if m is None:
            continue
        if fuse_qkv and hasattr(m, "fuse_qkv_projections") and getattr(m, "original_attn_processors", None) is None:
            m.fuse_qkv_projections()
        if channels_last:
            m.to(memory_format=torch.channels_last)
    if compile_mode is not None:
        unet.compile(mode=compile_mode)
        if vae is not None:
            vae.decoder.compile(mode=compile_mode)
    return pipe


def undo_speed_up(pipe):
    """Back to diffusers' defaults: no compilation, separate q / k / v, contiguous weights; returns pipe."""
    unet, vae = _modules(pipe)
    for m in (unet, vae):
        if m is None:
            continue
        for sub in (m, getattr(m, "decoder", None)):
            if isinstance(sub, torch.nn.Module):
                sub._compiled_call_impl = None
        if getattr(m, "original_attn_processors", None) is not None and hasattr(m, "unfuse_qkv_projections"):
            m.unfuse_qkv_projections()
            m.original_attn_processors = None
            for sub in m.modules():  # drop the fused copies of the weights
                if getattr(sub, "fused_projections", False):
                    for name in ("to_qkv", "to_kv"):
                        if hasattr(sub, name):
                            delattr(sub, name)
                    sub.fused_projections = False
        m.to(memory_format=torch.contiguous_format)
    return pipe
