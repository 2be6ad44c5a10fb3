"""A small diffusion decoder (pixel or latent space): generation embeddings -> images, for the embedded model.

SEED renders its generation embedding with Stable unCLIP: the embedding conditions a UNet through its
class-embedding projection (added to the timestep embedding) and the UNet denoises VAE latents. The
embedded default model keeps that interface at a size that trains on a CPU: a diffusers
``UNet2DConditionModel`` that denoises pixels directly or, with a ``vae``, the latents of a small
``AutoencoderKL`` (see below), conditioned on the embedding twice,
through ``class_embed_type="projection"`` as unCLIP does and as the single token its cross-attention
blocks attend to, and a diffusers DDIM scheduler that predicts the clean sample. With ``patch`` > 1
the pipeline folds each patch x patch block of pixels into channels (``pixel_unshuffle``) before the
UNet and unfolds the prediction after it, so the UNet runs at 1/patch of the image's resolution; the
patch size is read back from the UNet's input channels (3 * patch**2), so saved folders need nothing
else.

``SeedImageDecoderPipeline(image_embeds, negative_image_embeds=None, num_inference_steps, guidance_scale,
generator, latents=None)`` takes the same arguments as ``SeedUnCLIPPipeline`` does through
``seed_fast.models.decoders.unclip.embeddings_to_images``, which accepts either. Classifier-free guidance uses
``negative_image_embeds`` ((1, D), shared by the batch, or (B, D)) when given, else the learned-null zeros
the decoder was trained with.

With a ``vae`` (a diffusers ``AutoencoderKL``), the pipeline is a latent decoder, as Stable unCLIP
is: the UNet denoises the autoencoder's latents (scaled by its ``scaling_factor``) and the
autoencoder's decoder turns the result into pixels. ``image_size`` is then the output's pixels and
``sample_size`` / ``sample_channels`` the latents' (``vae_scale_factor`` pixels per latent cell).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel

__all__ = [
    "SeedImageDecoderPipeline",
    "decoder_training_loss",
    "load_image_decoder",
    "mini_autoencoder",
    "mini_image_decoder",
]


class SeedImageDecoderPipeline(DiffusionPipeline):
    """Generation embeddings (B, D) -> images with a UNet, a DDIM scheduler and, optionally, an
    autoencoder whose latents the UNet denoises (without one, the UNet denoises pixels)."""

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDIMScheduler, vae: AutoencoderKL | None = None):
        super().__init__()
        if vae is not None and not isinstance(vae, AutoencoderKL):
            raise TypeError(f"vae must be a diffusers AutoencoderKL or None, got {type(vae).__name__}")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        _patch_of(int(unet.config.in_channels), self.sample_channels, vae is not None)  # the UNet must fit the samples

    # diffusers checks loaded components against these annotations and needs classes, not the strings
    # this module's `from __future__ import annotations` leaves (diffusers 0.36 fails on a string)
    __init__.__annotations__ = {
        "unet": UNet2DConditionModel,
        "scheduler": DDIMScheduler,
        "vae": Optional[AutoencoderKL],
        "return": None,
    }

    @property
    def image_embedding_dim(self) -> int:
        return int(self.unet.config.projection_class_embeddings_input_dim)

    @property
    def sample_channels(self) -> int:
        """Channels of what the diffusion loop denoises: 3 (pixels) or the autoencoder's latent channels."""
        return 3 if self.vae is None else int(self.vae.config.latent_channels)

    @property
    def patch(self) -> int:
        """Samples per UNet cell along each side: the UNet sees the sample space-to-depth folded into
        (sample_channels * patch**2) channels at 1/patch of its resolution (1: the sample as it is)."""
        return _patch_of(int(self.unet.config.in_channels), self.sample_channels, self.vae is not None)

    @property
    def sample_size(self) -> int:
        """Side of what the diffusion loop denoises (pixels, or latent cells with an autoencoder)."""
        return int(self.unet.config.sample_size) * self.patch

    @property
    def vae_scale_factor(self) -> int:
        """Output pixels per sample cell along a side: 1 without an autoencoder."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        """Side of the output images in pixels."""
        return self.sample_size * self.vae_scale_factor

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        p = self.patch
        if p > 1:
            x = torch.nn.functional.pixel_unshuffle(x, p)
        out = self.unet(x, t, encoder_hidden_states=emb[:, None, :], class_labels=emb).sample
        return torch.nn.functional.pixel_shuffle(out, p) if p > 1 else out

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, image_size, image_size) in [-1, 1] -> the clean samples the UNet learns to
        denoise: the images themselves, or the autoencoder's latent means times its scaling factor."""
        if self.vae is None:
            return images
        lat = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return lat * float(self.vae.config.scaling_factor)

    def decode_samples(self, x: torch.Tensor) -> torch.Tensor:
        """Denoised samples -> images in [-1, 1] (unclamped): the identity without an autoencoder."""
        if self.vae is None:
            return x
        return self.vae.decode(x.to(self.vae.dtype) / float(self.vae.config.scaling_factor)).sample

    _callback_tensor_inputs = ["latents"]

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from callback_on_step_end) to stop after the current step."""
        return getattr(self, "_interrupt", False)

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: torch.Tensor,
        negative_image_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool | None = None,
        num_images_per_prompt: int = 1,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **unused: Any,
    ):
        """Generation embeddings (B, D) -> B * num_images_per_prompt images, as diffusers' pipelines
        take their arguments: `generator` (one, or a list of one per image), `latents` (the starting
        noise), `output_type` "pil", "np", "pt" or "latent" (the denoised samples, not decoded),
        `callback_on_step_end(pipe, step, timestep, {"latents": ...})` after every step (a returned
        "latents" replaces them; `pipe._interrupt = True` stops the loop)."""
        if unused:
            raise TypeError(f"SeedImageDecoderPipeline got unexpected arguments {sorted(unused)}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        tensor_inputs = callback_on_step_end_tensor_inputs
        if tensor_inputs is None:
            tensor_inputs = ["latents"]
        if not set(tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {tensor_inputs}"
            )
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 2:
            raise ValueError(
                f"image_embeds must be a (B, D) tensor, got {getattr(image_embeds, 'shape', type(image_embeds))}"
            )
        dim = self.image_embedding_dim
        if image_embeds.shape[1] != dim:
            raise ValueError(f"image_embeds has D={image_embeds.shape[1]}, this decoder takes D={dim}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        device, dtype = self.unet.device, self.unet.dtype
        emb = image_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, 0)
        if negative_image_embeds is not None and negative_image_embeds.dim() == 2 and len(negative_image_embeds) > 1:
            negative_image_embeds = negative_image_embeds.repeat_interleave(num_images_per_prompt, 0)
        batch = emb.shape[0]
        use_cfg = guidance_scale > 1.0
        if use_cfg:
            neg = torch.zeros_like(emb) if negative_image_embeds is None else negative_image_embeds.to(device, dtype)
            if neg.dim() != 2 or neg.shape[1] != dim or neg.shape[0] not in (1, batch):
                raise ValueError(
                    f"negative_image_embeds must have shape (1, {dim}) or ({batch}, {dim}) to match image_embeds, "
                    f"got {tuple(neg.shape)}"
                )
            emb = torch.cat([neg.expand(batch, dim), emb])
        size = self.sample_size
        shape = (batch, self.sample_channels, size, size)
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} images; give one, or one per image")
        if latents is None and isinstance(generator, (list, tuple)):
            x = torch.cat([torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float32) for gen in generator])
            x = x.to(device=device, dtype=dtype)
            generator = generator[0]  # the scheduler's own noise (DDIM with eta 0 draws none)
        elif latents is None:
            x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            x = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        if progress is not None:
            self.set_progress_bar_config(disable=not progress)
        self._interrupt = False
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                break
            inp = torch.cat([x, x]) if use_cfg else x
            out = self._denoise(self.scheduler.scale_model_input(inp, t), t, emb)
            if use_cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {name: x for name in tensor_inputs}) or {}
                x = returned.pop("latents", x)
        if output_type == "latent":
            result = x
            return ImagePipelineOutput(images=result) if return_dict else (result,)
        images = (self.decode_samples(x).float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            result = (
                arr if output_type == "np" else [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
            )
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


def _patch_of(in_channels: int, channels: int = 3, latent: bool = False) -> int:
    p = int(round((in_channels / channels) ** 0.5))
    if p < 1 or channels * p * p != in_channels:
        raise ValueError(
            f"a SeedImageDecoderPipeline UNet takes {channels} * patch**2 input channels "
            f"({'the autoencoder latents' if latent else 'RGB pixels'}), got {in_channels}"
        )
    return p


def mini_autoencoder(
    image_size: int = 32, channels: tuple[int, ...] = (16, 32), latent_channels: int = 4, seed: int = 0
) -> AutoencoderKL:
    """A small diffusers AutoencoderKL with seeded random weights, for a latent decoder: one level per
    entry of `channels` (each after the first halves the resolution), one ResNet layer each, so
    (16, 32) maps 32 px images to 16 x 16 x `latent_channels` latents. `scaling_factor` starts at 1;
    the stage that trains it sets it to 1 / the latents' standard deviation."""
    channels = tuple(int(c) for c in channels)
    if len(channels) < 1 or any(c < 8 or c % 8 for c in channels):
        raise ValueError(f"autoencoder channels must be one or more multiples of 8, got {channels}")
    if int(latent_channels) != latent_channels or latent_channels < 1:
        raise ValueError(f"latent_channels must be a positive integer, got {latent_channels!r}")
    down = 2 ** (len(channels) - 1)
    if image_size % down:
        raise ValueError(
            f"image_size must be a multiple of {down} ({len(channels) - 1} down-samplings), got {image_size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            latent_channels=int(latent_channels),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=image_size,
            scaling_factor=1.0,
        )


def mini_image_decoder(
    embed_dim: int = 64,
    image_size: int = 64,
    seed: int = 0,
    channels: tuple[int, ...] = (32, 64, 128),
    patch: int = 1,
    attention_levels: int = 1,
    vae: AutoencoderKL | None = None,
) -> SeedImageDecoderPipeline:
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
    With 4 levels at 32 px, 2 puts the cross-attention at 8 x 8 as well as at 4 x 4.

    `vae` (e.g. `mini_autoencoder()`, trained) makes it a latent decoder: `image_size` stays the output's
    pixels and the UNet denoises the autoencoder's latents (image_size / its down-sampling a side,
    its latent channels); the DDIM scheduler then does not clip the predicted sample to [-1, 1]."""
    channels = tuple(int(c) for c in channels)
    sample_channels = 3
    if vae is not None:
        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size % scale:
            raise ValueError(f"image_size {image_size} is not a multiple of the autoencoder's down-sampling ({scale})")
        image_size //= scale
        sample_channels = int(vae.config.latent_channels)
    if int(patch) != patch or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch}")
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
    if len(channels) < 2 or any(c < 8 or c % 8 for c in channels):
        raise ValueError(f"channels must be at least 2 levels of multiples of 8, got {channels}")
    down = 2 ** (len(channels) - 1)
    if image_size % (down * patch):
        raise ValueError(
            f"image_size must be a multiple of {down * patch} ({len(channels) - 1} down-samplings"
            f"{f' of {image_size // patch} px after the {patch}x{patch} patches' if patch > 1 else ''}), "
            f"got {image_size}"
        )
    levels = len(channels)
    if (
        isinstance(attention_levels, bool)
        or int(attention_levels) != attention_levels
        or not 1 <= attention_levels <= levels
    ):
        raise ValueError(f"attention_levels must be an integer from 1 to the {levels} levels, got {attention_levels!r}")
    plain, attn = levels - int(attention_levels), int(attention_levels)
    if any(c % 16 for c in channels[plain:]):
        raise ValueError(f"the attention levels' channels {channels[plain:]} must be multiples of 16 (16 heads each)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // patch,
            in_channels=sample_channels * patch * patch,
            out_channels=sample_channels * patch * patch,
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
        clip_sample=vae is None,
        set_alpha_to_one=True,
    )
    pipe = SeedImageDecoderPipeline(unet=unet, scheduler=scheduler, vae=vae)
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
    """One denoising loss: images (B, C, H, W), the clean samples (pixels in [-1, 1], or a latent
    decoder's scaled latents: `pipe.encode_images`), embeds (B, D). Random timesteps, the scheduler's
    noise, and with probability `null_prob` the zero embedding (for guidance)."""
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
    """A saved SeedImageDecoderPipeline folder (unet/ and scheduler/, and vae/ for a latent
    decoder), local files only."""
    from pathlib import Path

    root = Path(folder)
    missing = [name for name in ("unet", "scheduler") if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(root)!r} is not a SeedImageDecoderPipeline folder: no {missing} subfolder(s)")
    # the dtype at load time (not a cast afterwards, which diffusers warns about on every load)
    unet = UNet2DConditionModel.from_pretrained(
        str(root / "unet"), local_files_only=True, torch_dtype=torch.float32 if dtype is None else dtype
    )
    scheduler = DDIMScheduler.from_pretrained(str(root / "scheduler"), local_files_only=True)
    vae = None
    if (root / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(
            str(root / "vae"), local_files_only=True, torch_dtype=torch.float32 if dtype is None else dtype
        )
    else:
        index = root / "model_index.json"
        if index.is_file():
            import json

            entry = json.loads(index.read_text()).get("vae")
            if isinstance(entry, list) and entry and entry[0] is not None:
                raise FileNotFoundError(f"{str(root)!r}: model_index.json lists a vae but there is no vae/ subfolder")
    try:
        pipe = SeedImageDecoderPipeline(unet=unet, scheduler=scheduler, vae=vae)
    except ValueError as e:
        raise ValueError(f"{str(root)!r}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def register_with_diffusers(cls: type) -> type:
    """`DiffusionPipeline.from_pretrained(folder)` looks a folder's `_class_name` up in the diffusers
    namespace: put `cls` there, so the folders seed_fast's pipelines save load the diffusers way
    (done for SeedImageDecoderPipeline and SeedUnCLIPPipeline when their modules are imported, which
    `import seed_fast.models.decoders` does)."""
    import diffusers

    if getattr(diffusers, cls.__name__, None) is not cls:
        setattr(diffusers, cls.__name__, cls)
    return cls


register_with_diffusers(SeedImageDecoderPipeline)
