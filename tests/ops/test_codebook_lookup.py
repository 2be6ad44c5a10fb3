"""The nearest-code reference: against a float64 loop, ties, chunking, dtypes, errors."""

import pytest
import torch

import importlib

from seed_fast.ops import codebook_lookup, codebook_lookup_ref

cl = importlib.import_module("seed_fast.ops.codebook_lookup")  # the module, not the function


def _naive(z, codebook, metric):
    z64, e64 = z.double().reshape(-1, z.shape[-1]), codebook.double()
    if metric == "cosine":
        z64 = z64 / z64.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        e64 = e64 / e64.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = []
    for row in z64:
        best, arg = None, None
        for j, e in enumerate(e64):
            d = float(((row - e) ** 2).sum())
            if best is None or d < best:
                best, arg = d, j
        out.append(arg)
    return torch.tensor(out).reshape(z.shape[:-1])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape,k,d", [((1,), 1, 1), ((7,), 13, 5), ((2, 3), 37, 32), ((33,), 300, 8)])
def test_matches_float64_loop(metric, shape, k, d):
    z = torch.randn(*shape, d, dtype=torch.float64)
    book = torch.randn(k, d, dtype=torch.float64)
    idx, zq = codebook_lookup_ref(z, book, metric=metric)
    assert idx.dtype == torch.int64 and idx.shape == shape
    assert torch.equal(idx, _naive(z, book, metric))
    assert torch.equal(zq, book[idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_distances_are_fp32_whatever_the_dtype(dtype):
    # Far from the origin with close codes: the expanded |z|^2 - 2 z.e + |e|^2 overflows fp16 and
    # cancels in bf16; the fp32 exact difference still finds the nearest code.
    g = torch.Generator().manual_seed(0)
    center = torch.full((16,), 60.0)
    book = (center + torch.randn(64, 16, generator=g) * 0.5).to(dtype)
    z = (center + torch.randn(50, 16, generator=g) * 0.5).to(dtype)
    idx, zq = codebook_lookup_ref(z, book)
    d = torch.cdist(z.double(), book.double()).square()
    assert torch.equal(d.gather(1, idx[:, None]).squeeze(1), d.min(1).values)  # achieved distance is the min
    assert zq.dtype == dtype


def test_ties_go_to_the_lowest_index():
    book = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    idx, _ = codebook_lookup_ref(z, book)
    assert idx.tolist() == [0, 1, 0]


def test_chunking_does_not_change_the_result(monkeypatch):
    z, book = torch.randn(101, 8), torch.randn(77, 8)
    full, _ = codebook_lookup_ref(z, book)
    monkeypatch.setattr(cl, "_REF_CHUNK_ELEMS", 8 * 77 * 3)  # 3 rows per chunk
    chunked, _ = codebook_lookup_ref(z, book)
    assert torch.equal(full, chunked)


def test_errors():
    z, book = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="last dim must equal the code dim 8"):
        codebook_lookup_ref(torch.randn(4, 7), book)
    with pytest.raises(ValueError, match=r"codebook must be \(K, D\)"):
        codebook_lookup_ref(z, book[None])
    with pytest.raises(ValueError, match="empty"):
        codebook_lookup_ref(z, book[:0])
    with pytest.raises(TypeError, match="floating point"):
        codebook_lookup_ref(z.long(), book)
    with pytest.raises(ValueError, match="metric"):
        codebook_lookup_ref(z, book, metric="dot")
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        codebook_lookup(z, book, impl="cuda")
