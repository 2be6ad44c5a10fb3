"""A small pixel-space diffusion decoder: generation embeddings -> images, for the embedded model.

SEED renders its generation embedding with Stable unCLIP: the embedding conditions a UNet through its
class-embedding projection (added to the timestep embedding) and the UNet denoises VAE latents. The
embedded default model keeps that interface at a size that trains on a CPU: a diffusers
``UNet2DConditionModel`` that denoises pixels directly (no VAE), conditioned on the embedding twice,
through ``class_embed_type="projection"`` as unCLIP does and as the single token its cross-attention
blocks attend to, and a diffusers DDIM scheduler that predicts the clean sample. With ``patch`` > 1
the pipeline folds each patch x patch block of pixels into channels (``pixel_unshuffle``) before the
UNet and unfolds the prediction after it, so the UNet runs at 1/patch of the image's resolution; the
patch size is read back from the UNet's input channels (3 * patch**2), so saved folders need nothing
else.

``SeedImageDecoderPipeline(image_embeds, negative_image_embeds=None, num_inference_steps, guidance_scale,
generator, latents=None)`` takes the same arguments as ``SeedUnCLIPPipeline`` does through
``seed_fast.models.unclip.embeddings_to_images``, which accepts either. Classifier-free guidance uses
``negative_image_embeds`` when given, else the learned-null zeros the decoder was trained with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel

__all__ = ["SeedImageDecoderPipeline", "decoder_training_loss", "load_image_decoder", "mini_image_decoder"]


class SeedImageDecoderPipeline(DiffusionPipeline):
    """Generation embeddings (B, D) -> images with a pixel-space UNet and a DDIM scheduler."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def image_embedding_dim(self) -> int:
        return int(self.unet.config.projection_class_embeddings_input_dim)

    @property
    def patch(self) -> int:
        """Pixels per UNet cell along each side: the UNet sees the image space-to-depth folded into
        (3 * patch**2) channels at 1/patch of its resolution (1: plain pixels)."""
        return _patch_of(int(self.unet.config.in_channels))

    @property
    def image_channels(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.patch

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        p = self.patch
        if p > 1:
            x = torch.nn.functional.pixel_unshuffle(x, p)
        out = self.unet(x, t, encoder_hidden_states=emb[:, None, :], class_labels=emb).sample
        return torch.nn.functional.pixel_shuffle(out, p) if p > 1 else out

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: torch.Tensor,
        negative_image_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool | None = None,
        **unused: Any,
    ):
        if unused:
            raise TypeError(f"SeedImageDecoderPipeline got unexpected arguments {sorted(unused)}")
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 2:
            raise ValueError(f"image_embeds must be a (B, D) tensor, got {getattr(image_embeds, 'shape', type(image_embeds))}")
        dim = self.image_embedding_dim
        if image_embeds.shape[1] != dim:
            raise ValueError(f"image_embeds has D={image_embeds.shape[1]}, this decoder takes D={dim}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        device, dtype = self.unet.device, self.unet.dtype
        emb = image_embeds.to(device=device, dtype=dtype)
        batch = emb.shape[0]
        use_cfg = guidance_scale > 1.0
        if use_cfg:
            neg = torch.zeros_like(emb) if negative_image_embeds is None else negative_image_embeds.to(device, dtype)
            if neg.shape != emb.shape:
                raise ValueError(f"negative_image_embeds must have shape {tuple(emb.shape)}, got {tuple(neg.shape)}")
            emb = torch.cat([neg, emb])
        size = self.image_size
        shape = (batch, self.image_channels, size, size)
        if latents is None:
            x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            x = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        if progress is not None:
            self.set_progress_bar_config(disable=not progress)
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = torch.cat([x, x]) if use_cfg else x
            out = self._denoise(self.scheduler.scale_model_input(inp, t), t, emb)
            if use_cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            result = arr if output_type == "np" else [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


def _patch_of(in_channels: int) -> int:
    p = int(round((in_channels / 3) ** 0.5))
    if p < 1 or 3 * p * p != in_channels:
        raise ValueError(f"a SeedImageDecoderPipeline UNet takes 3 * patch**2 input channels, got {in_channels}")
    return p


def mini_image_decoder(embed_dim: int = 64, image_size: int = 64, seed: int = 0,
                       channels: tuple[int, ...] = (32, 64, 128), patch: int = 1,
                       attention_levels: int = 1) -> SeedImageDecoderPipeline:
    """The embedded model's decoder architecture with seeded random weights.

    `channels` gives one UNet level per entry (full resolution first; each level halves the
    resolution); the coarsest level cross-attends to the embedding. The default, 3 levels, is about
    4 M parameters. Adding a cheap full-resolution level in front, e.g. (16, 32, 64, 128) at 64 px,
    costs about as much per level as the others (pixels x channels^2 stay constant).

    `patch` > 1 folds each patch x patch block of pixels into channels (space-to-depth) before the
    UNet and unfolds its output: a 64 px decoder with patch 2 costs about what a 32 px one does, but
    draws every pixel.

    `attention_levels` is how many of the coarsest levels hold a transformer block (self-attention,
    then cross-attention to the embedding) in the down and the up path; the mid block always has one.
    With 4 levels at 32 px, 2 puts the cross-attention at 8 x 8 as well as at 4 x 4."""
    channels = tuple(int(c) for c in channels)
    if int(patch) != patch or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch}")
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
    if len(channels) < 2 or any(c < 8 or c % 8 for c in channels):
        raise ValueError(f"channels must be at least 2 levels of multiples of 8, got {channels}")
    down = 2 ** (len(channels) - 1)
    if image_size % (down * patch):
        raise ValueError(f"image_size must be a multiple of {down * patch} ({len(channels) - 1} down-samplings"
                         f"{f' of {image_size // patch} px after the {patch}x{patch} patches' if patch > 1 else ''}), got {image_size}")
    levels = len(channels)
    if isinstance(attention_levels, bool) or int(attention_levels) != attention_levels or not 1 <= attention_levels <= levels:
        raise ValueError(f"attention_levels must be an integer from 1 to the {levels} levels, got {attention_levels!r}")
    plain, attn = levels - int(attention_levels), int(attention_levels)
    if any(c % 16 for c in channels[plain:]):
        raise ValueError(f"the attention levels' channels {channels[plain:]} must be multiples of 16 (16 heads each)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // patch,
            in_channels=3 * patch * patch,
            out_channels=3 * patch * patch,
            down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attn,
            up_block_types=("CrossAttnUpBlock2D",) * attn + ("UpBlock2D",) * plain,
            block_out_channels=channels,
            layers_per_block=1,
            norm_num_groups=min(16, min(channels) // 2) if min(channels) < 32 else 16,
            cross_attention_dim=embed_dim,
            attention_head_dim=16,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=embed_dim,
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=True,
        set_alpha_to_one=True,
    )
    pipe = SeedImageDecoderPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoder_training_loss(
    pipe: SeedImageDecoderPipeline,
    images: torch.Tensor,
    embeds: torch.Tensor,
    *,
    null_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One denoising loss: images (B, 3, H, W) in [-1, 1], embeds (B, D). Random timesteps, the
    scheduler's noise, and with probability `null_prob` the zero embedding (for guidance)."""
    b = images.shape[0]
    sched = pipe.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(images.device)
    noise = torch.randn(images.shape, generator=generator).to(images)
    noisy = sched.add_noise(images, noise, t)
    if null_prob > 0:
        keep = (torch.rand(b, generator=generator) >= null_prob).to(embeds)[:, None]
        embeds = embeds * keep
    pred = pipe._denoise(noisy, t, embeds)
    target = {"sample": images, "epsilon": noise}[sched.config.prediction_type]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def load_image_decoder(folder, *, device=None, dtype: torch.dtype | None = None) -> SeedImageDecoderPipeline:
    """A saved SeedImageDecoderPipeline folder (unet/ and scheduler/), local files only."""
    from pathlib import Path

    root = Path(folder)
    missing = [name for name in ("unet", "scheduler") if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(root)!r} is not a SeedImageDecoderPipeline folder: no {missing} subfolder(s)")
    # the dtype at load time (not a cast afterwards, which diffusers warns about on every load)
    unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True,
                                                torch_dtype=torch.float32 if dtype is None else dtype)
    scheduler = DDIMScheduler.from_pretrained(str(root / "scheduler"), local_files_only=True)
    pipe = SeedImageDecoderPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe
