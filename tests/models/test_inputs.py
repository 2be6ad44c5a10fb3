"""Bad images and codes get a clear error naming the problem."""

import numpy as np
import pytest
import torch
from PIL import Image

from seed_fast import InputError
from seed_fast.testing import assert_equal


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: torch.rand(3, 224, 224), r"4 dims \(B, 3, H, W\).*add a batch dimension"),
        (lambda: torch.rand(1, 1, 3, 224, 224), "4 dims"),
        (lambda: torch.rand(2, 1, 224, 224), "3 channels"),
        (lambda: torch.rand(2, 224, 224, 3), "3 channels.*channels-last"),
        (lambda: torch.rand(2, 4, 64, 64), "3 channels"),
        (lambda: torch.randint(0, 255, (2, 3, 64, 64)), "dtype must be uint8 or float.*int64"),
        (lambda: torch.zeros(2, 3, 64, 64, dtype=torch.bool), "dtype must be uint8 or float"),
        (lambda: torch.rand(0, 3, 224, 224), "empty batch"),
        (lambda: torch.rand(2, 3, 0, 224), "empty spatial size"),
        (lambda: [], "empty list"),
        (lambda: torch.rand(2, 3, 64, 64) * 255, r"must lie in \[0, 1\].*divide by 255"),
        (lambda: torch.randn(2, 3, 64, 64), r"must lie in \[0, 1\].*already normalized"),
        (lambda: Image.new("RGB", (8, 8)), "single PIL image"),
        (lambda: [Image.new("RGB", (8, 8)), "cat.png"], r"images\[1\] is a str"),
        (lambda: "cat.png", "must be a tensor"),
        (lambda: np.empty((1, 3, 8, 8), dtype=object), "numpy array must hold numbers.*object"),
        (lambda: np.full((1, 3, 8, 8), "a"), "numpy array must hold numbers"),
    ],
)
def test_bad_images(tiny_tok, make, match):
    with pytest.raises(InputError, match=match):
        tiny_tok.encode(make())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_name_the_image(tiny_tok, bad):
    x = torch.rand(3, 3, 32, 32)
    x[2, 1, 5, 7] = bad
    with pytest.raises(InputError, match=r"NaN/inf.*item\(s\) \[2\]"):
        tiny_tok.encode(x)
    with pytest.raises(InputError, match="NaN/inf"):
        tiny_tok.encode_embeddings(x.half())


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda k: torch.randint(0, k, (2, 31)), "exactly 32 codes, got 31"),
        (lambda k: torch.randint(0, k, (2, 33)), "exactly 32 codes, got 33"),
        (lambda k: torch.randint(0, k, (32,)), r"shape \(B, 32\).*add a batch dimension"),
        (lambda k: torch.full((2, 32), k), rf"\[0, {512}\).*\[{512}, {512}\]"),
        (lambda k: torch.full((1, 32), -1), "must lie in"),
        (lambda k: torch.rand(2, 32), "must be integers"),
        (lambda k: torch.zeros(0, 32, dtype=torch.long), "empty batch"),
        (lambda k: "1 2 3", "must be an integer tensor"),
        (lambda k: [[1, 2], [3]], "could not be read"),
    ],
)
def test_bad_codes(tiny_tok, make, match):
    with pytest.raises(InputError, match=match):
        tiny_tok.decode(make(tiny_tok.codebook_size))


def test_codes_accept_int32_lists_and_numpy(tiny_tok):
    codes = torch.randint(0, tiny_tok.codebook_size, (2, 32))
    ref = tiny_tok.decode(codes)
    assert_equal(tiny_tok.decode(codes.int()), ref, name="int32 codes")
    assert_equal(tiny_tok.decode(codes.tolist()), ref, name="list codes")
    assert_equal(tiny_tok.decode(codes.numpy().astype(np.int32)), ref, name="numpy codes")


def test_bad_batch_size(tiny_tok):
    with pytest.raises(InputError, match="batch_size must be >= 1"):
        tiny_tok.encode(torch.rand(2, 3, 32, 32), batch_size=0)


def test_numpy_views_with_negative_strides(tiny_tok, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2, 3, 40, 40), dtype=np.uint8)
    flipped = x[:, :, :, ::-1]  # a view: negative strides
    assert_equal(tiny_tok.encode(flipped), tiny_tok.encode(np.ascontiguousarray(flipped)), name="codes")
