"""Generation embeddings -> images through Stable unCLIP (e.g. stabilityai/stable-diffusion-2-1-unclip).

SEED decodes its image tokens into a CLIP-image-like "generation embedding" and renders it with diffusers'
``StableUnCLIPImg2ImgPipeline`` via ``image_embeds`` at ``noise_level=0``. Stock diffusers always uses zeros as
the unconditional image embedding under classifier-free guidance; SEED's evaluation uses the embedding decoded from
the tokens generated for the bare prompt "<img>" instead. ``SeedUnCLIPPipeline`` exists only to accept that
``negative_image_embeds``; everything else is the unmodified diffusers pipeline.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import PIL.Image
import torch


def _quiet_image_processor_fallback() -> None:
    # transformers 5 without torchvision warns the first time anything (diffusers' unCLIP module included) touches
    # CLIPImageProcessor and silently hands out the equivalent PIL class; resolve that once with the warning muted.
    try:
        import transformers
    except ImportError:
        return
    fallback_logger = logging.getLogger("transformers.utils.import_utils")
    previous = fallback_logger.level
    fallback_logger.setLevel(logging.ERROR)
    try:
        getattr(transformers, "CLIPImageProcessor", None)
    finally:
        fallback_logger.setLevel(previous)


_quiet_image_processor_fallback()

try:
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
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"seed_fast.models.decoders.unclip needs diffusers and transformers ({e}). "
        'Install them with: pip install "seed_fast[diffusion]"  (or: pip install diffusers transformers)'
    ) from e

from .image_decoder import register_with_diffusers  # noqa: E402

__all__ = [
    "SeedUnCLIPPipeline",
    "as_seed_pipeline",
    "embeddings_to_images",
    "load_unclip_pipeline",
    "tiny_unclip_pipeline",
]

# Folders written by save_pretrained of either class hold the same components.
_LOADABLE_CLASS_NAMES = ("StableUnCLIPImg2ImgPipeline", "SeedUnCLIPPipeline")


def _check_embeds(name: str, x: Any, dim: int, batch: int | None = None) -> None:
    """Raise naming `name` unless `x` is a finite float tensor (B, dim) with B >= 1 (B in {1, batch} if given)."""
    expected = f"(B, {dim})" if batch is None else f"({batch}, {dim}) or (1, {dim})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.ndim != 2:
        hint = " (add a batch dimension: x[None])" if x.ndim == 1 else ""
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have shape {expected} with B >= 1, got an empty batch {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape {expected}: the pipeline's image embedding dim is {dim}, got {tuple(x.shape)}"
        )
    if batch is not None and x.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must have shape {expected} to match image_embeds' batch of {batch}, got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


class SeedUnCLIPPipeline(StableUnCLIPImg2ImgPipeline):
    """``StableUnCLIPImg2ImgPipeline`` that also takes ``negative_image_embeds`` for classifier-free guidance.

    With ``guidance_scale > 1`` and ``negative_image_embeds`` (shape (B, D) or (1, D)) given, the unconditional
    half of the UNet's class conditioning is ``noise_image_embeddings(negative_image_embeds, noise_level)`` (same
    noise level and generator as the positive embedding) instead of diffusers' zeros. Without it, or with
    ``guidance_scale <= 1``, the pipeline behaves exactly like diffusers'.
    """

    # Set only for the duration of one __call__; diffusers calls _encode_image with a fixed signature.
    _seed_negative_image_embeds: torch.Tensor | None = None

    @property
    def image_embedding_dim(self) -> int:
        """D of ``image_embeds``: the normalizer's width (the UNet's class projection takes 2 * D: embedding, level)."""
        return int(self.image_normalizer.mean.shape[-1])

    @classmethod
    def from_pipe_components(cls, pipe: StableUnCLIPImg2ImgPipeline) -> SeedUnCLIPPipeline:
        """A ``SeedUnCLIPPipeline`` sharing ``pipe``'s modules (no copies, no dtype or device change)."""
        if not isinstance(pipe, StableUnCLIPImg2ImgPipeline):
            raise TypeError(
                "expected a diffusers StableUnCLIPImg2ImgPipeline (e.g. stabilityai/stable-diffusion-2-1-unclip), "
                f"got {type(pipe).__module__}.{type(pipe).__qualname__}"
            )
        # Not DiffusionPipeline.from_pipe: it casts every (shared) module to float32 unless told a dtype.
        new = cls(**pipe.components)
        name_or_path = pipe.config.get("_name_or_path")
        if name_or_path is not None:
            new.register_to_config(_name_or_path=name_or_path)
        if hasattr(pipe, "_progress_bar_config"):
            new._progress_bar_config = dict(pipe._progress_bar_config)
        return new

    def __call__(self, *args: Any, negative_image_embeds: torch.Tensor | None = None, **kwargs: Any):
        """diffusers' ``__call__`` plus ``negative_image_embeds`` ((B, D) or (1, D); used when guidance_scale > 1)."""
        if negative_image_embeds is not None:
            bound = inspect.signature(super().__call__).bind_partial(*args, **kwargs).arguments
            image_embeds = bound.get("image_embeds")
            batch = image_embeds.shape[0] if isinstance(image_embeds, torch.Tensor) and image_embeds.ndim == 2 else None
            _check_embeds("negative_image_embeds", negative_image_embeds, self.image_embedding_dim, batch)
        self._seed_negative_image_embeds = negative_image_embeds
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._seed_negative_image_embeds = None

    def _encode_image(
        self,
        image,
        device,
        batch_size,
        num_images_per_prompt,
        do_classifier_free_guidance,
        noise_level,
        generator,
        image_embeds,
    ):
        negative = self._seed_negative_image_embeds
        if negative is None or not do_classifier_free_guidance:
            return super()._encode_image(
                image=image,
                device=device,
                batch_size=batch_size,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=do_classifier_free_guidance,
                noise_level=noise_level,
                generator=generator,
                image_embeds=image_embeds,
            )
        positive = super()._encode_image(
            image=image,
            device=device,
            batch_size=batch_size,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=False,
            noise_level=noise_level,
            generator=generator,
            image_embeds=image_embeds,
        )
        # Same per-row repetition diffusers applies to the positive embedding (PIL input repeats by batch size).
        repeat_by = batch_size if isinstance(image, PIL.Image.Image) else num_images_per_prompt
        rows = positive.shape[0] // repeat_by
        if negative.shape[0] not in (1, rows):
            raise ValueError(
                f"negative_image_embeds must have shape ({rows}, {self.image_embedding_dim}) or "
                f"(1, {self.image_embedding_dim}) to match the image batch, got {tuple(negative.shape)}"
            )
        dtype = image_embeds.dtype if image_embeds is not None else next(self.image_encoder.parameters()).dtype
        # Broadcast before noising so every row draws its own noise, as a full (B, D) negative would.
        negative = negative.to(device=device, dtype=dtype).expand(rows, -1)
        negative = self.noise_image_embeddings(image_embeds=negative, noise_level=noise_level, generator=generator)
        negative = negative.repeat_interleave(repeat_by, dim=0).to(positive.dtype)
        return torch.cat([negative, positive])


register_with_diffusers(SeedUnCLIPPipeline)


def as_seed_pipeline(pipe: StableUnCLIPImg2ImgPipeline) -> SeedUnCLIPPipeline:
    """``pipe`` itself if it already is a ``SeedUnCLIPPipeline``, else one sharing its modules."""
    if isinstance(pipe, SeedUnCLIPPipeline):
        return pipe
    return SeedUnCLIPPipeline.from_pipe_components(pipe)


def _byte_alphabet() -> list[str]:
    # CLIP's byte-level BPE alphabet: printable bytes stand for themselves, the rest map to U+0100 onwards.
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(0x100 + shifted))
            shifted += 1
    return symbols


def _tiny_clip_tokenizer(max_length: int) -> CLIPTokenizer:
    symbols = _byte_alphabet()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="seed_tiny_clip_tok_") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, local_files_only=True)


# Random-weight unCLIP pipelines by size: "tiny" for tests, "sd21-unclip-h" with Stable unCLIP 2.1
# (H)'s module shapes (SD 2.1 UNet, OpenCLIP-H text encoder, SD VAE; 768 px images) for benchmarks.
# The CLIP image encoder is never run when embeddings are given, so it is built tiny in both.
UNCLIP_SHAPES = {
    "tiny": {
        "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        "text_len": 16,
        "unet": dict(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=16,
            attention_head_dim=4,
        ),
        "vae": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
        "image_size": 32,
    },
    "sd21-unclip-h": {
        "text": dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
        ),
        "text_len": 77,
        "unet": dict(
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        "image_size": 224,
    },
}


def random_unclip_pipeline(
    shape: str = "tiny",
    *,
    embed_dim: int = 32,
    sample_size: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cls: type | None = None,
):
    """A Stable unCLIP pipeline (`cls`, default SeedUnCLIPPipeline) of one of UNCLIP_SHAPES with
    random weights, built on `device` in `dtype` (no downloads). ``image_embeds`` are (B, embed_dim);
    images are ``sample_size * 8`` pixels square. The same ``seed`` gives the same weights; the
    global RNG state is left untouched."""
    if shape not in UNCLIP_SHAPES:
        raise ValueError(f"shape must be one of {sorted(UNCLIP_SHAPES)}, got {shape!r}")
    if embed_dim < 2 or embed_dim % 2:
        # get_timestep_embedding splits the noise-level embedding into sin and cos halves.
        raise ValueError(f"embed_dim must be an even number >= 2, got {embed_dim}")
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    sizes = UNCLIP_SHAPES[shape]
    text_len, image_size = sizes["text_len"], sizes["image_size"]
    tokenizer = _tiny_clip_tokenizer(text_len)
    old = torch.get_default_dtype()
    dev = torch.device(device)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), dev:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            feature_extractor = CLIPImageProcessor(
                size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
            )
            image_encoder = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=image_size,
                    patch_size=16,
                    projection_dim=embed_dim,
                )
            )
            image_normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    max_position_embeddings=text_len,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    **sizes["text"],
                )
            )
            unet = UNet2DConditionModel(
                sample_size=sample_size,
                in_channels=4,
                out_channels=4,
                class_embed_type="projection",
                projection_class_embeddings_input_dim=2 * embed_dim,
                **sizes["unet"],
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                sample_size=sample_size * 8,
                **sizes["vae"],
            )
        finally:
            torch.set_default_dtype(old)
    pipe = (cls or SeedUnCLIPPipeline)(
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        image_normalizer=image_normalizer,
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
    return pipe


def tiny_unclip_pipeline(
    embed_dim: int = 32, sample_size: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32
) -> SeedUnCLIPPipeline:
    """A randomly initialised, few-hundred-kB Stable unCLIP pipeline for tests (no downloads).

    ``image_embeds`` are (B, embed_dim); images default to ``sample_size * 8`` pixels square (VAE scale factor 8).
    The same ``seed`` gives the same weights; the global RNG state is left untouched.
    """
    return random_unclip_pipeline("tiny", embed_dim=embed_dim, sample_size=sample_size, seed=seed, dtype=dtype)


def _dtype_kwarg() -> str:
    # Recent diffusers renamed from_pretrained's torch_dtype to dtype and warn on the old name; older ones only
    # know torch_dtype.
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load_unclip_pipeline(
    path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> SeedUnCLIPPipeline:
    """Load a local diffusers Stable unCLIP folder (e.g. stable-diffusion-2-1-unclip) without network access."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"unCLIP pipeline folder {str(path)!r} does not exist or is not a directory; this loader never "
            "downloads: pass a local diffusers folder (e.g. a downloaded stabilityai/stable-diffusion-2-1-unclip)"
        )
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no model_index.json, so it is not a diffusers pipeline folder "
            "(expected model_index.json plus unet/, vae/, text_encoder/, ... subfolders)"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(index_file)!r} is not valid JSON: {e}") from e
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name == "SeedImageDecoderPipeline":  # the embedded model's pixel-space decoder
        from .image_decoder import load_image_decoder

        return load_image_decoder(folder, device=device, dtype=dtype)
    if class_name not in _LOADABLE_CLASS_NAMES:
        raise ValueError(
            f"{str(index_file)!r} describes a {class_name!r} pipeline; expected one of {list(_LOADABLE_CLASS_NAMES)} "
            "(a Stable unCLIP img2img checkpoint such as stabilityai/stable-diffusion-2-1-unclip)"
        )
    missing = [
        name
        for name, spec in index.items()
        if not name.startswith("_")
        and isinstance(spec, list)
        and spec
        and spec[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} lacks the component folder(s) {missing} named in model_index.json")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs[_dtype_kwarg()] = dtype
    pipe = SeedUnCLIPPipeline.from_pretrained(str(folder), **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe


def embeddings_to_images(
    pipe: StableUnCLIPImg2ImgPipeline,
    image_embeds: torch.Tensor,
    *,
    negative_image_embeds: torch.Tensor | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 10.0,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> list[PIL.Image.Image]:
    """Render generation embeddings (B, D) into B PIL images (empty text prompt, ``noise_level=0``).

    ``pipe`` may be a plain ``StableUnCLIPImg2ImgPipeline``; it is wrapped (modules shared) when a negative is given.
    ``seed`` makes a CPU generator (reproducible across devices); pass either ``seed`` or ``generator``.
    """
    from .image_decoder import SeedImageDecoderPipeline

    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    if isinstance(pipe, SeedImageDecoderPipeline):  # the embedded model's pixel decoder: same arguments
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != pipe.image_size:
                raise ValueError(f"{name}: this decoder draws {pipe.image_size} px images, got {value}")
        return list(
            pipe(
                image_embeds,
                negative_image_embeds=negative_image_embeds,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                progress=progress,
            ).images
        )
    if not isinstance(pipe, StableUnCLIPImg2ImgPipeline):
        raise TypeError(
            "pipe must be a diffusers StableUnCLIPImg2ImgPipeline (see load_unclip_pipeline) "
            "or a SeedImageDecoderPipeline, "
            f"got {type(pipe).__module__}.{type(pipe).__qualname__}"
        )
    dim = int(pipe.image_normalizer.mean.shape[-1])
    _check_embeds("image_embeds", image_embeds, dim)
    batch = image_embeds.shape[0]
    if negative_image_embeds is not None:
        _check_embeds("negative_image_embeds", negative_image_embeds, dim, batch)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    # diffusers' check_inputs insists on multiples of 8 whatever the VAE's actual factor is.
    multiple = math.lcm(int(pipe.vae_scale_factor), 8)
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % multiple):
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} (the VAE scale factor is {pipe.vae_scale_factor}), "
                f"got {value}"
            )

    device = pipe._execution_device
    dtype = pipe.unet.dtype
    pipe.set_progress_bar_config(disable=not progress)
    kwargs: dict[str, Any] = {}
    if negative_image_embeds is not None:
        pipe = as_seed_pipeline(pipe)
        kwargs["negative_image_embeds"] = negative_image_embeds.to(device=device, dtype=dtype)
    out = pipe(
        # One empty prompt per embedding: diffusers sizes the latent batch from the prompt, not from image_embeds.
        prompt=[""] * batch,
        image_embeds=image_embeds.to(device=device, dtype=dtype),
        noise_level=0,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        generator=generator,
        output_type="pil",
        **kwargs,
    )
    return list(out.images)
