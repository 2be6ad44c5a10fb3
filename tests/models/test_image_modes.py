"""High-bit-depth and float PIL images are scaled into 8-bit RGB, never clipped (PIL's convert("RGB")
turns a mid-gray 16-bit image white and a float image in [0, 1] black)."""

import json

import numpy as np
import pytest
from PIL import Image

from seed_fast import InputError, SeedTokenizer
from seed_fast.images import ImageModeError, to_rgb
from seed_fast.testing import assert_close, assert_equal


@pytest.fixture(scope="module")
def tok():
    return SeedTokenizer.from_config("tiny", seed=3, init="unit").eval()


def _gray8(rng, shape):
    return rng.integers(0, 256, shape).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_images_scale_like_their_8_bit_version(mode, seed):
    rng = np.random.default_rng(seed)
    g = _gray8(rng, (7, 5))
    if mode == "F":
        deep = Image.fromarray((g / 255.0).astype(np.float32))
    elif mode == "I":
        deep = Image.fromarray(g.astype(np.int32) * 257)
    else:
        deep = Image.fromarray(g.astype(np.uint16) * 257)
    assert deep.mode == mode
    want = np.repeat(g[..., None], 3, axis=-1)
    assert_equal(np.asarray(to_rgb(deep)), want, name=f"{mode} image as RGB")


def test_a_16_bit_png_from_disk(tmp_path, tok, seed):
    rng = np.random.default_rng(seed)
    g = _gray8(rng, (33, 20))
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(g).save(tmp_path / "eight.png")
    with Image.open(tmp_path / "deep.png") as deep, Image.open(tmp_path / "eight.png") as eight:
        assert deep.mode.startswith("I")
        codes = tok.encode([deep, eight])
    assert codes[0].tolist() == codes[1].tolist()
    white = tok.encode([Image.new("RGB", (33, 20), (255, 255, 255))])
    mid = Image.fromarray(np.full((16, 16), 32768, np.uint16))
    assert tok.encode([mid]).tolist() != white.tolist()  # a mid-gray 16-bit image is not white


def test_the_command_line_reads_a_16_bit_png(tmp_path, capsys, seed):
    from seed_fast.cli import main

    tok = SeedTokenizer.from_config("tiny", seed=3, init="unit")
    tok.save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(seed)
    g = _gray8(rng, (24, 24))
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(g).convert("RGB").save(tmp_path / "eight.png")
    files = [str(tmp_path / "deep.png"), str(tmp_path / "eight.png")]
    assert main(["tokenize", *files, "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["codes"] == out[1]["codes"]
    Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(tmp_path / "bad.tiff")
    with pytest.raises(SystemExit, match=r"must lie in \[0, 1\], got values in \[3, 3\]"):
        main(["tokenize", str(tmp_path / "bad.tiff"), "--checkpoint", str(tmp_path / "ckpt")])


@pytest.mark.parametrize("mode, suffix", [("I;16", "png"), ("I", "tiff"), ("F", "tiff")])
def test_every_deep_mode_through_the_api_and_the_command_line(tmp_path, tok, capsys, mode, suffix, seed):
    """Each deep mode, in memory and from a file through `seed-fast tokenize`, gives its 8-bit version's codes."""
    from seed_fast.cli import main

    g = _gray8(np.random.default_rng(seed), (24, 24))
    values = {"F": g / 255.0, "I": g.astype(np.int32) * 257, "I;16": g.astype(np.uint16) * 257}[mode]
    deep = Image.fromarray(values.astype(np.float32) if mode == "F" else values)
    assert deep.mode == mode
    eight = Image.fromarray(g).convert("RGB")
    assert tok.encode([deep]).tolist() == tok.encode([eight]).tolist()
    tok.save_pretrained(tmp_path / "ckpt")
    deep.save(tmp_path / f"deep.{suffix}")
    eight.save(tmp_path / "eight.png")
    with Image.open(tmp_path / f"deep.{suffix}") as back:
        assert back.mode in (mode, "I", "I;16"), back.mode  # 16-bit PNGs open as I or I;16 by Pillow version
    files = [str(tmp_path / f"deep.{suffix}"), str(tmp_path / "eight.png")]
    assert main(["tokenize", *files, "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["codes"] == out[1]["codes"]


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: Image.fromarray(np.full((4, 4), 1.5, np.float32)),
            r"images\[0\]: a float \(mode F\) image must lie in",
        ),
        (lambda: Image.fromarray(np.full((4, 4), np.nan, np.float32)), r"images\[0\]: .*NaN or inf"),
        (
            lambda: Image.fromarray(np.full((4, 4), -3, np.int32)),
            r"images\[0\]: a mode I image must lie in \[0, 65535\]",
        ),
        (lambda: Image.fromarray(np.full((4, 4), 70000, np.int32)), r"must lie in \[0, 65535\], got values in \[70000"),
    ],
)
def test_values_without_a_known_range_are_refused(tok, make, match):
    with pytest.raises(InputError, match=match):
        tok.encode([make()])
    with pytest.raises(ImageModeError):
        to_rgb(make())


def test_the_runtime_reads_deep_images_the_same_way(seed):
    from seed_fast.runtime import RuntimeInputError, SeedRuntime

    rng = np.random.default_rng(seed)
    g = _gray8(rng, (10, 10))
    deep = SeedRuntime._load_image(Image.fromarray(g.astype(np.uint16) * 257), 10, 0)
    assert_equal(deep, np.repeat(g[None], 3, axis=0), name="16-bit image in the runtime")
    with pytest.raises(RuntimeInputError, match=r"images\[1\] is empty \(0x0\)"):
        SeedRuntime._load_image(Image.new("RGB", (0, 0)), 4, 1)
    with pytest.raises(RuntimeInputError, match=r"images\[2\]"):
        SeedRuntime._load_image(Image.fromarray(np.full((4, 4), 2.0, np.float32)), 4, 2)


def _alpha_over_white(rgb, alpha):
    a = alpha[..., None].astype(np.float64) / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La"])
def test_transparent_pixels_are_composited_over_white(mode, seed):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (6, 5, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (6, 5)).astype(np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255  # fully transparent (white whatever lies under it), fully opaque
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "PA":
        im = rgba.convert("P").convert("PA")
    elif mode == "La":  # PIL converts RGBA to La through L, dropping alpha: premultiply by hand
        la = np.asarray(rgba.convert("LA")).astype(np.uint16)
        pre = np.dstack([(la[..., 0] * la[..., 1] + 127) // 255, la[..., 1]]).astype(np.uint8)
        im = Image.frombytes("La", rgba.size, pre.tobytes())
    else:
        im = rgba.convert(mode)
    out = np.asarray(to_rgb(im)).astype(np.float64)
    assert out.shape == (6, 5, 3)
    assert_equal(out[0, 0], [255, 255, 255], name="a fully transparent pixel")
    # the expected picture: the mode's own colours (gray for LA / La, the palette for PA) over white
    own = np.asarray(im.convert("LA" if mode == "La" else im.mode).convert("RGBA")).astype(np.float64)
    want = _alpha_over_white(own[..., :3], own[..., 3].astype(np.uint8))
    assert_close(out, want, atol=2 if mode in ("RGBa", "La") else 1, rtol=0, name=f"{mode} over white")


def test_palette_and_rgb_transparency_are_white():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = [10, 20, 30]
    for im in (Image.fromarray(rgb), Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)):
        im.info["transparency"] = (0, 0, 0) if im.mode == "RGB" else int(np.asarray(im)[1, 1])
        out = np.asarray(to_rgb(im))
        assert_equal(out[1, 1], [255, 255, 255], name=f"{im.mode}: the transparent colour")
        assert_equal(out[0, 0], [10, 20, 30], name=f"{im.mode}: an opaque colour")


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"])
def test_opaque_modes_convert_as_pil_does(mode, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (4, 6, 3)).astype(np.uint8)
    im = Image.fromarray(rgb).convert(mode)
    assert_equal(np.asarray(to_rgb(im)), np.asarray(im.convert("RGB")), name=mode)
