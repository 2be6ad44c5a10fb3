"""Image and code validation, and SEED's inference preprocessing.

Preprocessing (SEED_SPEC.md section 1): resize to S x S bicubic (no crop, aspect not kept), scale to
[0, 1], normalize with CLIP mean / std. PIL images are resized by PIL (as upstream's torchvision
transform on PIL does); tensors by antialiased bicubic interpolation, clamped back to [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..images import check_batch_shape, check_pixel_range, non_finite_pixels, pil_to_chw
from ..prompt import check_codes_dtype, check_codes_range, check_codes_shape

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputError(ValueError):
    """Bad images or codes given to the tokenizer."""


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(x, Image.Image)


def images_to_tensor(images, size: int) -> torch.Tensor:
    """Validate `images` and return float32 (B, 3, size, size) in [0, 1] (not yet normalized).

    images: float (B, 3, H, W) in [0, 1]; uint8 (B, 3, H, W); or a list of PIL images.
    """
    if _is_pil(images):
        raise InputError("got a single PIL image; pass a list of PIL images ([image])")
    if isinstance(images, (list, tuple)):
        return _pil_list_to_tensor(images, size)
    if isinstance(images, np.ndarray):
        if images.dtype == object or not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_):
            raise InputError(f"images as a numpy array must hold numbers (uint8 or float), got dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))  # negative strides (a flipped view) too
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a tensor (B, 3, H, W) or a list of PIL images, got {type(images).__name__}")
    check_batch_shape(images.shape, InputError)
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.dtype in _FLOAT_DTYPES:
        x = images.float()
        # one read of the range (one host sync on a GPU); NaN / inf show up in it, details only then
        lo, hi = torch.stack(torch.aminmax(x)).tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = torch.isfinite(x)
            bad = int((~finite).sum())
            where = sorted({int(i) for i in (~finite).flatten(1).any(1).nonzero().flatten()})
            raise non_finite_pixels(bad, where, InputError)
        check_pixel_range(lo, hi, InputError)
        x = x.clamp(0.0, 1.0)
    else:
        raise InputError(f"images dtype must be uint8 or float (16/32/64, bf16), got {images.dtype}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    return x


def _pil_list_to_tensor(images: Sequence, size: int) -> torch.Tensor:
    if len(images) == 0:
        raise InputError("images is an empty list")
    out = []
    for i, im in enumerate(images):
        if not _is_pil(im):
            raise InputError(f"images[{i}] is a {type(im).__name__}; a list must hold PIL images only")
        out.append(torch.from_numpy(pil_to_chw(im, size, f"images[{i}]", InputError)))
    return torch.stack(out).float() / 255.0


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def check_codes(codes, num_codes: int, codebook_size: int) -> torch.Tensor:
    """Validate codes as int (B, num_codes) in [0, codebook_size); returns an int64 tensor."""
    if isinstance(codes, np.ndarray):
        codes = torch.from_numpy(codes)
    elif isinstance(codes, (list, tuple)):
        try:
            codes = torch.tensor(codes)
        except (TypeError, ValueError) as e:
            raise InputError(f"codes could not be read as an integer array: {e}") from None
    if not isinstance(codes, torch.Tensor):
        raise InputError(f"codes must be an integer tensor (B, {num_codes}), got {type(codes).__name__}")
    check_codes_dtype(
        codes.dtype, not (codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool), InputError
    )
    check_codes_shape(codes.shape, num_codes, InputError)
    lo, hi = torch.stack(torch.aminmax(codes)).tolist()  # one host sync for both bounds
    check_codes_range(
        lo, hi, codebook_size, lambda: ((codes < 0) | (codes >= codebook_size)).nonzero()[0].tolist(), InputError
    )
    return codes.long()
