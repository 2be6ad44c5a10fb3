"""The attention reference against a float64 loop: causal mask, padding, dtypes, errors."""

import math

import pytest
import torch

from seed_fast.ops import qformer_attention, qformer_attention_ref
from seed_fast.testing import assert_close


def _naive(q, k, v, causal, pad):
    q, k, v = q.double(), k.double(), v.double()
    B, H, Lq, D = q.shape
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                s = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(D) for j in range(k.shape[2])]
                keep = [(not causal or j <= i) and (pad is None or bool(pad[b, j])) for j in range(len(s))]
                if not any(keep):
                    continue
                m = max(x for x, kp in zip(s, keep) if kp)
                w = [math.exp(x - m) if kp else 0.0 for x, kp in zip(s, keep)]
                tot = sum(w)
                out[b, h, i] = sum(wj / tot * v[b, h, j] for j, wj in enumerate(w))
    return out


CASES = [(c, n, n) for c in (False, True) for n in (1, 5, 32)] + [(False, 3, 17), (False, 32, 257)]


@pytest.mark.parametrize("causal,lq,lk", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_float64_loop(causal, lq, lk, padded):
    q, k, v = torch.randn(2, 3, lq, 8), torch.randn(2, 3, lk, 8), torch.randn(2, 3, lk, 8)
    pad = torch.rand(2, lk) > 0.3 if padded else None
    if pad is not None:
        pad[:, 0] = True
    out = qformer_attention_ref(q, k, v, causal=causal, key_padding_mask=pad)
    assert_close(out, _naive(q, k, v, causal, pad), atol=1e-5, rtol=1e-5, name="attention ref")


def test_fully_masked_rows_are_zero():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out = qformer_attention_ref(q, k, v, key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_bounded_by_torch(dtype):
    q, k, v = (torch.randn(2, 4, 32, 16) for _ in range(3))
    ref = qformer_attention_ref(q.double(), k.double(), v.double(), causal=True)
    ours = qformer_attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert ours.dtype == dtype
    plain = torch.softmax((q.to(dtype) @ k.to(dtype).transpose(-1, -2)) / 4 + torch.full((32, 32), float("-inf")).triu(1).to(dtype), -1) @ v.to(dtype)
    err_ours = (ours.double() - ref).abs().max()
    err_plain = (plain.double() - ref).abs().max()
    assert err_ours <= 2 * err_plain + 1e-6


def test_errors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q must be"):
        qformer_attention(q[0], q, q)
    with pytest.raises(ValueError, match="causal needs Lq == Lk"):
        qformer_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), causal=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        qformer_attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown impl"):
        qformer_attention(q, q, q, impl="flash")
