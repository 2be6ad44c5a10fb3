"""PIL images of any mode -> 8-bit RGB without silent clipping (numpy + pillow only: the torch-free
runtime uses it too).

PIL's `convert("RGB")` clips high-bit-depth modes instead of scaling them: a mid-gray 16-bit image
becomes white and a float image in [0, 1] black. `to_rgb` scales them into 0..255 first:
- "I;16*" (16-bit): value / 65535;
- "I" (32-bit integer, which is how PIL opens 16-bit grayscale PNGs): value / 65535, refusing values
  outside [0, 65535], which have no known white level;
- "F" (32-bit float): taken as [0, 1], refusing NaN / inf or values outside [0, 1].
Images with transparency (RGBA, LA, PA, premultiplied RGBa / La, and palette or RGB images with a
transparent colour) are composited over white, as viewers show them: `convert("RGB")` would keep the
colours stored under fully transparent pixels (often black), which nobody sees.
Every other mode (L, P, CMYK, YCbCr, LAB, HSV, 1, ...) goes through `convert("RGB")`, which is exact.
"""

from __future__ import annotations

import numpy as np


class ImageModeError(ValueError):
    """An image whose pixel values cannot be read as colours without guessing."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(im, where: str = "image"):
    """An 8-bit RGB PIL image with `im`'s colours; `where` names the image in errors."""
    from PIL import Image

    mode = im.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float64)
        if mode == "F":
            if not np.isfinite(values).all():
                raise ImageModeError(f"{where}: a float (mode F) image with NaN or inf pixels")
            scale = 1.0
        else:
            scale = 65535.0
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < 0 or hi > scale:
            kind = (
                "a float (mode F) image must lie in [0, 1]"
                if mode == "F"
                else f"a mode {mode} image must lie in [0, 65535]"
            )
            raise ImageModeError(f"{where}: {kind}, got values in [{lo:.6g}, {hi:.6g}]")
        gray = np.rint(values / scale * 255.0).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")  # PIL has no La -> RGBA
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # a new, loaded image even for RGB input (callers may close the file)


# ------------------------------------------------------------------------ SEED's image input
# The checks and the PIL path both the torch API (models/preprocess.py) and the torch-free runtime
# (export/runtime.py) run, so that they accept, refuse and resize images alike. `error` is the caller's
# exception class (a ValueError).


def check_batch_shape(shape: tuple, error: type = ValueError) -> None:
    """An image batch must be (B, 3, H, W) with B, H, W > 0; the message hints at the usual mistake."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        hint = " (a single image? add a batch dimension: images[None])" if len(shape) == 3 else ""
        raise error(f"images must have 4 dims (B, 3, H, W), got shape {shape}{hint}")
    if shape[0] == 0:
        raise error("images is an empty batch (B = 0)")
    if shape[1] != 3:
        hint = " (channels-last? permute to (B, 3, H, W))" if shape[-1] == 3 else ""
        raise error(f"images must have 3 channels (RGB) in dim 1, got shape {shape}{hint}")
    if shape[2] == 0 or shape[3] == 0:
        raise error(f"images have an empty spatial size: {shape}")


def pil_to_chw(im, size: int, where: str, error: type = ValueError) -> np.ndarray:
    """A PIL image -> uint8 (3, size, size): its colours as `to_rgb` reads them, resized bicubic by PIL
    (SEED's transform: no crop, aspect not kept)."""
    from PIL import Image

    if not isinstance(im, Image.Image):
        raise error(f"{where} is a {type(im).__name__}, not a PIL image")
    if im.width == 0 or im.height == 0:
        raise error(f"{where} is empty ({im.width}x{im.height})")
    try:
        im = to_rgb(im, where)
    except ImageModeError as e:
        raise error(str(e)) from None
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def check_pixel_range(lo: float, hi: float, error: type = ValueError) -> None:
    """Float pixels must lie in [0, 1] (a little rounding allowed); lo / hi are the batch's extremes."""
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise error(
            f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
            "(already normalized? pass raw pixels; 0-255 floats? divide by 255 or pass uint8)"
        )


def non_finite_pixels(count: int, items: list[int], error: type = ValueError) -> Exception:
    """The error for `count` NaN / inf pixels found in batch items `items`."""
    return error(f"images contain {count} NaN/inf value(s), in batch item(s) {sorted(items)[:10]}")
