"""The attention reference against a float64 loop: causal mask, padding, dtypes, errors."""

import math

import pytest
import torch

from seed_fast.ops import qformer_attention, qformer_attention_ref
from seed_fast.ops.qformer_attention import choose_impl, not_supported_reasons
from seed_fast.testing import assert_close, assert_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _runnable(impl, dtype):
    x = torch.empty(1, 1, 2, 16, dtype=dtype, device=DEVICE)
    return not not_supported_reasons(impl, x, x, x)


FAST = [i for i in ("sdpa", "triton") if _runnable(i, torch.float32)]


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
    assert_equal(out, torch.zeros_like(out), name="fully masked rows")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_bounded_by_torch(dtype):
    q, k, v = (torch.randn(2, 4, 32, 16) for _ in range(3))
    ref = qformer_attention_ref(q.double(), k.double(), v.double(), causal=True)
    ours = qformer_attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert ours.dtype == dtype
    plain = torch.softmax(
        (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) / 4 + torch.full((32, 32), float("-inf")).triu(1).to(dtype), -1
    ) @ v.to(dtype)
    err_plain = (plain.double() - ref).abs().max()
    assert_close(ours, ref, atol=float(2 * err_plain + 1e-6), rtol=0, name=f"{dtype} vs float64 (2x plain torch)")


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
    with pytest.raises(TypeError, match="share a dtype"):
        qformer_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="must be bool"):
        qformer_attention(q, q, q, key_padding_mask=torch.zeros(1, 4))


def test_triton_is_tested_here():
    assert "triton" in FAST, "the Triton kernel must run (GPU, or TRITON_INTERPRET=1 on CPU)"


def test_requested_backend_that_cannot_run_says_why():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="impl='triton' cannot run.*float64"):
        qformer_attention(q, q, q, impl="triton")
    assert choose_impl(q, q, q) == "ref"


# (causal, Lq, Lk): odd sizes around SEED's 32 queries and 257 keys; causal needs Lq == Lk
SHAPES = [(False, lq, lk) for lq in (1, 31, 32, 33) for lk in (1, 257, 300)] + [(True, n, n) for n in (1, 31, 32, 33)]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(b, h, lq, lk, dh, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, dh, generator=g) for n in (lq, lk, lk))
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _padding(b, lk, seed, fully_padded_row=True):
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(b, lk, generator=g) > 0.4
    pad[0, 0] = True
    if fully_padded_row and b > 1:
        pad[-1] = False  # a batch element with every key padded: its rows must be zeros, no NaN
    return pad.to(DEVICE)


def _bound(impl_out, ref64, dtype, plain):
    """flash-attention's rule: the kernel's error is at most 2x that of plain torch at `dtype`."""
    return 2 * (plain.double() - ref64).abs().max() + TOL[dtype]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,lq,lk", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_reference(impl, dtype, causal, lq, lk, padded, seed):
    if not _runnable(impl, dtype):
        pytest.skip(f"{impl} cannot run {dtype} here")
    q, k, v = _inputs(2, 3, lq, lk, 64, dtype, seed=seed)
    pad = _padding(2, lk, seed=seed + 1) if padded else None
    out = qformer_attention(q, k, v, causal=causal, key_padding_mask=pad, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    ref64 = qformer_attention_ref(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=pad)
    plain = qformer_attention_ref(q, k, v, causal=causal, key_padding_mask=pad)
    assert_close(out, ref64, atol=float(_bound(out, ref64, dtype, plain)), rtol=0, name=f"{impl} {dtype}")
    if padded:
        assert_equal(out[-1], torch.zeros_like(out[-1]), name="fully padded rows")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,lq,lk", [(False, 33, 257), (False, 1, 300), (True, 33, 33), (True, 32, 32)])
@pytest.mark.parametrize("padded", [False, True])
def test_gradients_match_reference(impl, dtype, causal, lq, lk, padded, seed):
    q, k, v = _inputs(2, 2, lq, lk, 40, dtype, seed=seed)  # Dh = 40: not a power of two
    pad = _padding(2, lk, seed=seed + 1) if padded else None
    g = torch.randn(2, 2, lq, 40, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE, dtype)

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward(g.to(dt))
        return [t.grad for t in leaves]

    ours = grads(lambda a, b, c: qformer_attention(a, b, c, causal=causal, key_padding_mask=pad, impl=impl), dtype)
    ref64 = grads(lambda a, b, c: qformer_attention_ref(a, b, c, causal=causal, key_padding_mask=pad), torch.float64)
    plain = grads(lambda a, b, c: qformer_attention_ref(a, b, c, causal=causal, key_padding_mask=pad), dtype)
    for name, o, r, p in zip("qkv", ours, ref64, plain):
        assert o.dtype == dtype and o.shape == r.shape
        bound = 2 * (p.double() - r).abs().max() + 4 * TOL[dtype]
        assert_close(o, r, atol=float(bound), rtol=0, name=f"{impl} {dtype} d{name}")
    if padded:  # the fully padded batch element gets no gradient at all
        for name, o in zip("qkv", ours):
            assert_equal(o[-1], torch.zeros_like(o[-1]), name=f"d{name} of the fully padded element")


@pytest.mark.parametrize("impl", FAST)
def test_causality(impl, seed):
    """Changing query j (and key / value j) never changes the outputs of rows i < j."""
    q, k, v = _inputs(1, 2, 33, 33, 64, torch.float32, seed=seed)
    base = qformer_attention(q, k, v, causal=True, impl=impl)
    for j in (0, 5, 31, 32):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[:, :, j] += 3.0
        out = qformer_attention(q2, k2, v2, causal=True, impl=impl)
        assert_equal(out[:, :, :j], base[:, :, :j], name=f"rows before {j}")
        if j < 32:
            assert not torch.equal(out[:, :, j:], base[:, :, j:])


def test_triton_output_merges_heads_without_copy(seed):
    if "triton" not in FAST:
        pytest.skip("triton cannot run here")
    q, k, v = _inputs(2, 3, 32, 257, 64, torch.float32, seed=seed)
    out = qformer_attention(q, k, v, impl="triton")
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()  # so .flatten(2) is a view


def test_non_contiguous_inputs(seed):
    """The model passes (B, L, H, Dh).transpose(1, 2) views: strides must be honoured."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 3 * 64, generator=g).to(DEVICE)
    kv = torch.randn(2, 257, 2 * 3 * 64, generator=g).to(DEVICE)
    q = x.view(2, 32, 3, 64).transpose(1, 2)
    k, v = (t.reshape(2, 257, 3, 64).transpose(1, 2) for t in kv.split(3 * 64, dim=-1))
    ref = qformer_attention_ref(q, k, v)
    for impl in FAST:
        assert_close(qformer_attention(q, k, v, impl=impl), ref, atol=2e-5, rtol=1e-5, name=impl)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_opcheck(causal, padded, seed):
    if "triton" not in FAST:
        pytest.skip("triton cannot run here")
    # the ops are the kernels; their gradient is an autograd.Function around them (tested elsewhere)
    q, k, v = _inputs(2, 2, 17, 17, 16, torch.float32, seed=seed)
    pad = _padding(2, 17, seed=seed + 1, fully_padded_row=False) if padded else None
    torch.library.opcheck(torch.ops.seed_fast.qformer_attention_fwd.default, (q, k, v, pad, causal, 0.25))
    out, lse = torch.ops.seed_fast.qformer_attention_fwd(q.detach(), k.detach(), v.detach(), pad, causal, 0.25)
    torch.library.opcheck(
        torch.ops.seed_fast.qformer_attention_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, pad, causal, 0.25),
    )


def test_torch_compile_fullgraph(seed):
    if "triton" not in FAST:
        pytest.skip("triton cannot run here")
    q, k, v = _inputs(1, 2, 32, 40, 16, torch.float32, seed=seed)

    def f(q, k, v):
        return qformer_attention(q, k, v, impl="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(q, k, v), f(q, k, v), atol=1e-5, rtol=1e-5, name="compiled")


@pytest.mark.parametrize("causal", [False, True])
def test_backward_writes_gradients_in_the_inputs_layout(causal, seed):
    """q, k, v as the model makes them, (B, L, H, Dh) buffers viewed as (B, H, L, Dh): the gradients
    come back in that layout, so autograd has nothing to copy, and they match the reference's.
    (Strides, not a profiler count: under the Triton interpreter every launch copies.)"""
    if "triton" not in FAST:
        pytest.skip("triton cannot run here")
    g = torch.Generator().manual_seed(seed)
    lk = 32 if causal else 45
    base = [torch.randn(2, n, 3, 16, generator=g).to(DEVICE).requires_grad_() for n in (32, lk, lk)]
    go = torch.randn(2, 3, 32, 16, generator=g).to(DEVICE)
    views = [t.transpose(1, 2) for t in base]
    seen = []
    for t in views:  # the gradient each view receives, as the op wrote it
        t.register_hook(lambda grad, view=t: seen.append(grad.stride() == view.stride()))
    qformer_attention(*views, causal=causal, impl="triton").backward(go)
    assert seen == [True, True, True]
    ref = [t.detach().clone().requires_grad_() for t in base]
    qformer_attention_ref(*(t.transpose(1, 2) for t in ref), causal=causal).backward(go)
    for got, want in zip(base, ref):
        assert_close(got.grad, want.grad, atol=2e-5, rtol=1e-4, name="grad")


@pytest.mark.parametrize("impl", ["auto", "sdpa", "ref"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_nan_inputs_are_never_hidden(impl, causal, padded, seed):
    """NaN in q, k or v reaches the output wherever the specification puts it (a NaN query row is
    NaN, not zeros as torch's CPU SDPA kernel alone gives); without a mask exactly there."""
    g = torch.Generator().manual_seed(seed)
    for trial in range(25):
        q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
        for t in (q, k, v):
            if float(torch.rand(1, generator=g)) < 0.7:
                t[tuple(int(torch.randint(0, n, (1,), generator=g)) for n in t.shape)] = float("nan")
        mask = (torch.rand(2, 6, generator=g) > 0.4) if padded else None
        q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
        mask = None if mask is None else mask.to(DEVICE)
        out = qformer_attention(q, k, v, causal=causal, key_padding_mask=mask, impl=impl)
        ref = qformer_attention_ref(q, k, v, causal=causal, key_padding_mask=mask)
        hidden = ref.isnan() & ~out.isnan()
        assert not hidden.any(), f"trial {trial}: NaN hidden at {hidden.nonzero()[:4].tolist()}"
        if mask is None:
            assert_equal(out.isnan(), ref.isnan(), name=f"trial {trial}: where NaN is")
        finite = ~ref.isnan() & ~out.isnan()
        assert_close(out[finite], ref[finite], atol=1e-5, rtol=1e-5, name=f"trial {trial}")


def test_nan_query_row_gives_a_nan_row(seed):
    q, k, v = (torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(seed + i)) for i in range(3))
    q[0, 0, 1, 3] = float("nan")
    for causal in (False, True):
        for impl in ("auto", "ref"):
            out = qformer_attention(q, k, v, causal=causal, impl=impl)
            assert out[0, 0, 1].isnan().all(), (impl, causal)
            assert not out[0, 0, [0, 2, 3]].isnan().any() and not out[0, 1].isnan().any(), (impl, causal)


@pytest.mark.skipif("triton" not in FAST, reason="triton cannot run here")
@pytest.mark.parametrize(
    "causal,lq,lk", [(False, 32, 257), (False, 1, 70), (True, 32, 32), (True, 64, 64), (False, 50, 3)]
)
@pytest.mark.parametrize("padded", [False, True])
def test_one_launch_backward_equals_the_two_kernel_backward(causal, lq, lk, padded):
    """The one-launch backward (all queries of a (batch, head) in one program, Lq <= 64) against the
    two-kernel one on the same saved forward: same gradients up to summation order."""
    from seed_fast.kernels.qformer_attention import qformer_attention_bwd_triton, qformer_attention_fwd_triton

    g = torch.Generator().manual_seed(lq + lk)
    q, k, v = (torch.randn(2, 3, n, 24, generator=g).to(DEVICE) for n in (lq, lk, lk))
    pad = None
    if padded:
        pad = torch.rand(2, lk, generator=g).to(DEVICE) > 0.3
        pad[-1] = False  # a batch with no key at all
    scale = 24**-0.5
    out, lse = qformer_attention_fwd_triton(q, k, v, pad, causal, scale)
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    one = qformer_attention_bwd_triton(dout, q, k, v, out, lse, pad, causal, scale, fused=True)
    two = qformer_attention_bwd_triton(dout, q, k, v, out, lse, pad, causal, scale, fused=False)
    for name, a, b in zip(("dq", "dk", "dv"), one, two):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)
