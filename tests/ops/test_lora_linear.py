"""lora_linear / lora_linear_multi: reference vs float64, every backend and dtype vs the reference,
odd shapes, gradients, the dropout mask, opcheck, torch.compile, errors."""

import pytest
import torch

from seed_fast.ops import lora_dropout_mask, lora_linear, lora_linear_ref
from seed_fast.ops.lora_linear import lora_linear_multi, lora_linear_multi_ref, not_supported_reasons
from seed_fast.testing import assert_close, assert_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _runnable(impl, dtype):
    x = torch.empty(2, 4, dtype=dtype, device=DEVICE)
    return not not_supported_reasons(impl, x, x, x)


IMPLS = [i for i in ("torch", "lowrank", "triton") if _runnable(i, torch.float32)]


def _make(n, in_f, out_f, r, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    a = torch.randn(r, in_f, generator=g) / in_f**0.5
    bb = torch.randn(out_f, r, generator=g) / r**0.5
    return [t.to(DEVICE, dtype) if t is not None else None for t in (x, w, b, a, bb)]


def test_triton_is_tested_here():
    assert "triton" in IMPLS, "the Triton kernel must run (GPU, or TRITON_INTERPRET=1 on CPU)"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reference_matches_float64_formula(p, seed):
    x, w, b, a, bb = _make(7, 9, 5, 2, torch.float64, seed=seed)
    keep = lora_dropout_mask(11, 7, 9, p, device=DEVICE).double() / (1 - p)
    expect = x @ w.T + b + 0.5 * ((x * keep) @ a.T) @ bb.T
    got = lora_linear_ref(x, w, b, a, bb, 0.5, dropout_p=p, seed=11)
    assert_close(got, expect, atol=1e-12, rtol=1e-12, name="lora_linear_ref")


def test_dropout_mask_statistics(seed):
    m = lora_dropout_mask(seed, 300, 500, 0.25)
    assert abs(m.float().mean().item() - 0.75) < 0.01  # 9 standard deviations of the mean
    assert abs(m[:, :250].float().mean().item() - m[:, 250:].float().mean().item()) < 0.02  # no layout bias
    assert not torch.equal(m, lora_dropout_mask(seed + 1, 300, 500, 0.25)), "the seed must matter"
    assert_equal(lora_dropout_mask(seed, 300, 500, 0.25), m, name="the same seed's mask")
    assert lora_dropout_mask(3, 10, 10, 0.0).all()


SHAPES = [(1, 1, 1, 1), (5, 17, 1, 3), (3, 1, 17, 1), (33, 1000, 17, 3), (20, 17, 1000, 16), (70, 130, 90, 128)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.0), (True, 0.2)])
def test_forward_and_gradients_match_reference(impl, dtype, n, in_f, out_f, r, bias, p, seed):
    if not _runnable(impl, dtype):
        pytest.skip(f"{impl} cannot run {dtype} here")
    x, w, b, a, bb = _make(n, in_f, out_f, r, dtype, seed=seed, bias=bias)
    gy = torch.randn(n, out_f, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, a, bb)]
        wb = [t.to(dt) if t is not None else None for t in (w, b)]
        y = fn(leaves[0], wb[0], wb[1], leaves[1], leaves[2])
        y.backward(gy.to(dt))
        return [y.detach()] + [t.grad for t in leaves]

    kw = dict(dropout_p=p, seed=seed + 2)
    ours = run(lambda *t: lora_linear(*t, 0.75, impl=impl, **kw), dtype)
    ref64 = run(lambda *t: lora_linear_ref(*t, 0.75, **kw), torch.float64)
    plain = run(lambda *t: lora_linear_ref(*t, 0.75, **kw), dtype)
    for name, o, r64, pl in zip(("y", "dx", "dA", "dB"), ours, ref64, plain):
        assert o.dtype == dtype, name
        scale = r64.abs().max().clamp_min(1.0)
        bound = 2 * (pl.double() - r64).abs().max() + TOL[dtype] * scale
        assert_close(o, r64, atol=float(bound), rtol=0, name=f"{impl} {dtype} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_expectation_matches_no_dropout(impl, seed):
    """Averaged over seeds, the dropout output tends to the dropout-free one (inverted scaling)."""
    x, w, b, a, bb = _make(4, 24, 8, 4, torch.float32, seed=seed)
    clean = lora_linear_ref(x, w, b, a, bb, 2.0)
    runs = torch.stack([lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, seed=seed + s, impl=impl) for s in range(400)])
    lora_part = (clean - lora_linear_ref(x, w, b, a, bb, 0.0)).abs().mean()
    assert (runs.mean(0) - clean).abs().mean() < 0.15 * lora_part
    assert (runs.std(0)).mean() > 0.1 * lora_part  # and the mask really varies


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_is_repeatable_from_torch_seed(impl, seed):
    x, w, b, a, bb = _make(6, 20, 10, 2, torch.float32, seed=seed)
    torch.manual_seed(seed + 1)
    y1 = lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, impl=impl)
    torch.manual_seed(seed + 1)
    y2 = lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, impl=impl)
    y3 = lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.3, impl=impl)
    assert_equal(y2, y1, name="after the same torch seed")
    assert not torch.equal(y1, y3), "the next call drew the same mask"


def test_batched_leading_dims_and_base_weight_grad(seed):
    x, w, b, a, bb = _make(12, 16, 8, 2, torch.float32, seed=seed)
    x3 = x.reshape(3, 4, 16)
    for impl in IMPLS:
        w_ = w.detach().clone().requires_grad_()
        y = lora_linear(x3, w_, b, a, bb, 0.5, impl=impl)
        assert y.shape == (3, 4, 8)
        y.sum().backward()
        assert_close(w_.grad, torch.ones(12, 8, device=DEVICE).T @ x, atol=1e-5, rtol=1e-5, name=f"{impl} dW")


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_computes_in_the_autocast_dtype_and_grads_reach_fp32_weights(impl, seed):
    # as torch.nn.Linear: under autocast the fp32 inputs and weights are used in the autocast dtype
    amp = torch.bfloat16 if _runnable(impl, torch.bfloat16) else torch.float16  # the interpreter has no bf16
    x, w, b, a, bb = _make(13, 24, 20, 4, torch.float32, seed=seed)
    for t in (x, w, b, a, bb):
        t.requires_grad_(True)
    with torch.autocast(DEVICE, dtype=amp):
        y = lora_linear(x, w, b, a, bb, 0.5, impl=impl)
    assert y.dtype == amp
    want = lora_linear_ref(*(t.detach().to(amp) for t in (x, w, b, a, bb)), 0.5)
    assert_close(y, want, atol=TOL[amp] * 5, rtol=TOL[amp], name=f"{impl} under autocast")
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (x, w, b, a, bb))
    ids = torch.tensor([0, -1, 1, 0], device=DEVICE)
    xs = torch.randn(4, 3, 24, device=DEVICE)
    with torch.autocast(DEVICE, dtype=amp):
        got = lora_linear_multi(
            xs,
            w.detach(),
            b.detach(),
            torch.stack([a, a * 2]).detach(),
            torch.stack([bb, bb]).detach(),
            ids,
            torch.tensor([0.5, 1.0]),
        )
    assert got.dtype == amp


def test_errors(seed):
    x, w, b, a, bb = _make(3, 8, 6, 2, torch.float32, seed=seed)
    for bad in (float("nan"), float("inf")):
        for fn in (lora_linear, lora_linear_ref):
            with pytest.raises(ValueError, match="scaling must be a finite Python number"):
                fn(x, w, b, a, bb, bad)
    with pytest.raises(ValueError, match="lora_B must be"):
        lora_linear(x, w, b, a, bb[:, :1], 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, w, b, a[:, :5], bb, 1.0)
    with pytest.raises(ValueError, match="last dim"):
        lora_linear(x[:, :5], w, b, a, bb, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        lora_linear(x.half(), w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        lora_linear(x, w, b[:3], a, bb, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="unknown impl"):
        lora_linear(x, w, b, a, bb, 1.0, impl="cutlass")
    with pytest.raises(RuntimeError, match="impl='triton' cannot run.*float64"):
        lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 1.0, impl="triton")
    with pytest.raises(TypeError, match="floating point"):
        lora_linear(x.long(), w, b, a, bb, 1.0)


def test_opcheck_and_compile(seed):
    if "triton" not in IMPLS:
        pytest.skip("triton cannot run here")
    x, w, b, a, bb = _make(5, 12, 7, 3, torch.float32, seed=seed)
    for p in (0.0, 0.25):
        # the ops are the kernels; their gradient is an autograd.Function around them (tested elsewhere)
        args = (x, w, b, a.detach(), bb.detach(), 0.5, p, 17)
        torch.library.opcheck(torch.ops.seed_fast.lora_linear_fwd.default, args)
        y, t = torch.ops.seed_fast.lora_linear_fwd(x, w, b, a.detach(), bb.detach(), 0.5, p, 17)
        torch.library.opcheck(
            torch.ops.seed_fast.lora_linear_bwd.default,
            (torch.randn_like(y), x, w, a.detach(), bb.detach(), t, 0.5, p, 17),
        )

        torch.library.opcheck(torch.ops.seed_fast.lora_lowrank_fwd.default, args)
        y, t = torch.ops.seed_fast.lora_lowrank_fwd(x, w, b, a.detach(), bb.detach(), 0.5, p, 17)
        torch.library.opcheck(
            torch.ops.seed_fast.lora_lowrank_bwd.default,
            (torch.randn_like(y), x, w, a.detach(), bb.detach(), t, 0.5, p, 17),
        )

    a.requires_grad_()
    bb.requires_grad_()
    for impl in ("triton", "lowrank"):

        def f(x, a, bb):
            return lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.25, seed=3, impl=impl).sum()

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        assert_close(compiled(x, a, bb), f(x, a, bb), atol=1e-4, rtol=1e-5, name=f"compiled {impl}")


# --------------------------------------------------------------------------------------- multi
MULTI_IMPLS = ["torch"] + (["triton"] if "triton" in IMPLS else [])


@pytest.mark.parametrize("impl", MULTI_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_adapters,in_f,out_f,r", [(1, 20, 11, 4), (4, 20, 11, 4), (3, 300, 140, 17)])
def test_multi_matches_reference(impl, dtype, n_adapters, in_f, out_f, r, seed):
    g = torch.Generator().manual_seed(seed)
    bsz, seq = 6, 3
    x = torch.randn(bsz, seq, in_f, generator=g).to(DEVICE, dtype)
    w = (torch.randn(out_f, in_f, generator=g) / 5).to(DEVICE, dtype)
    b = torch.randn(out_f, generator=g).to(DEVICE, dtype)
    a_s = (torch.randn(n_adapters, r, in_f, generator=g) / 5).to(DEVICE, dtype)
    b_s = torch.randn(n_adapters, out_f, r, generator=g).to(DEVICE, dtype)
    ids = torch.randint(-1, n_adapters, (bsz,), generator=g).to(DEVICE)
    ids[0] = -1  # a row on the base model alone
    scal = [0.5 + i for i in range(n_adapters)]
    got = lora_linear_multi(x, w, b, a_s, b_s, ids, scal, impl=impl)
    ref64 = lora_linear_multi_ref(x.double(), w.double(), b.double(), a_s.double(), b_s.double(), ids, scal)
    plain = lora_linear_multi_ref(x, w, b, a_s, b_s, ids, scal)
    bound = 2 * (plain.double() - ref64).abs().max() + TOL[dtype] * ref64.abs().max()
    assert_close(got, ref64, atol=float(bound), rtol=0, name=f"multi {dtype}")
    # each row equals the single-adapter op with its adapter
    for i in range(bsz):
        k = int(ids[i])
        single = lora_linear_ref(x[i], w, b, a_s[max(k, 0)], b_s[max(k, 0)], scal[k] if k >= 0 else 0.0)
        bound = 4 * TOL[dtype] * single.abs().max().double() + 1e-6
        assert_close(got[i], single, atol=float(bound), rtol=0, name=f"row {i} (adapter {k})")


def test_multi_triton_is_forward_only():
    if "triton" not in MULTI_IMPLS:
        pytest.skip("triton cannot run here")
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    w, a_s, b_s = (torch.randn(*s, device=DEVICE) for s in ((5, 8), (3, 2, 8), (3, 5, 2)))
    with pytest.raises(RuntimeError, match="forward only"):
        lora_linear_multi(x, w, None, a_s, b_s, torch.tensor([0, 1], device=DEVICE), [1.0] * 3, impl="triton")
    with torch.no_grad():
        y = lora_linear_multi(x, w, None, a_s, b_s, torch.tensor([0, 1], device=DEVICE), [1.0] * 3, impl="triton")
    assert y.shape == (2, 3, 5)


def test_multi_update_opcheck(seed):
    if "triton" not in MULTI_IMPLS:
        pytest.skip("triton cannot run here")
    g = torch.Generator().manual_seed(seed)
    y, x = torch.randn(3, 2, 7, generator=g).to(DEVICE), torch.randn(3, 2, 9, generator=g).to(DEVICE)
    a_s, b_s = torch.randn(2, 3, 9, generator=g).to(DEVICE), torch.randn(2, 7, 3, generator=g).to(DEVICE)
    ids, s = torch.tensor([1, -1, 0], device=DEVICE), torch.tensor([0.5, 2.0], device=DEVICE)
    torch.library.opcheck(torch.ops.seed_fast.lora_multi_update_.default, (y, x, a_s, b_s, ids, s))


def test_multi_errors():
    x = torch.randn(2, 3, 8)
    w, a_s, b_s = torch.randn(5, 8), torch.randn(3, 2, 8), torch.randn(3, 5, 2)
    with pytest.raises(ValueError, match=r"adapter ids must lie in \[-1, 3\)"):
        lora_linear_multi(x, w, None, a_s, b_s, torch.tensor([0, 3]), [1.0] * 3)
    with pytest.raises(ValueError, match="adapter_ids must be"):
        lora_linear_multi(x, w, None, a_s, b_s, torch.tensor([0]), [1.0] * 3)
    with pytest.raises(TypeError, match="int32 / int64"):
        lora_linear_multi(x, w, None, a_s, b_s, torch.tensor([0.0, 1.0]), [1.0] * 3)
    with pytest.raises(ValueError, match="one scaling per adapter"):
        lora_linear_multi(x, w, None, a_s, b_s, torch.tensor([0, 1]), [1.0])
    with pytest.raises(ValueError, match="B_stack must be"):
        lora_linear_multi(x, w, None, a_s, b_s[:, :4], torch.tensor([0, 1]), [1.0] * 3)


@pytest.mark.parametrize("impl", ["auto", "ref"] + MULTI_IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_multi_refuses_non_finite_scalings(impl, bad, as_tensor):
    """A NaN / inf scaling would silently poison every row of that adapter (lora_linear refuses it)."""
    x = torch.randn(2, 3, 8, device=DEVICE)
    w, a_s, b_s = (torch.randn(*shape, device=DEVICE) for shape in [(5, 8), (3, 2, 8), (3, 5, 2)])
    scalings = [1.0, bad, 0.5]
    if as_tensor:
        scalings = torch.tensor(scalings, device=DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match=f"scalings must be finite, got {bad} for adapter 1"):
        lora_linear_multi(x, w, None, a_s, b_s, torch.tensor([0, 2], device=DEVICE), scalings, impl=impl)


def test_dropout_mask_int32_hash_equals_the_int64_specification(seed):
    from seed_fast.ops.lora_linear import _hash32, _hash32_i32, dropout_threshold

    g = torch.Generator().manual_seed(seed)
    # counters over the whole 32-bit range, the top end included, and several seeds
    idx = torch.cat([torch.arange(5000), torch.randint(0, 2**32, (20000,), generator=g), torch.tensor([2**32 - 1])])
    signed = torch.where(idx >= 2**31, idx - 2**32, idx).to(torch.int32)
    for hash_seed in (0, 1, 12345, 2**31 + 7, 2**32 - 1, seed):
        want = _hash32(idx, hash_seed)
        got = _hash32_i32(signed, hash_seed).to(torch.int64) & 0xFFFFFFFF
        assert_equal(got, want, name=f"hash seed {hash_seed}")
    for p in (0.05, 0.5, 0.999):
        m = lora_dropout_mask(9, 123, 77, p)
        ref = (_hash32(torch.arange(123 * 77), 9) >= dropout_threshold(p)).reshape(123, 77)
        assert_equal(m, ref, name=f"mask p={p}")


@pytest.mark.parametrize("int_seed", [5, 2**31 + 3, 2**32 - 1])
def test_a_tensor_seed_drops_what_the_int_seed_drops(int_seed, seed):
    """Under CUDA graph capture the seed is drawn on the device as a tensor; it must name the same
    mask as the int it holds (the low 32 bits), on every path that takes it."""
    from seed_fast.ops.lora_linear import _hash32_i32

    x, w, b, a, bb = _make(9, 20, 6, 3, torch.float32, seed=seed)
    t_seed = torch.tensor([int_seed], device=DEVICE)
    assert_equal(
        lora_dropout_mask(t_seed, 9, 20, 0.3, device=DEVICE),
        lora_dropout_mask(int_seed, 9, 20, 0.3, device=DEVICE),
        name="mask",
    )
    idx = torch.arange(50, dtype=torch.int32, device=DEVICE)
    assert_equal(_hash32_i32(idx, t_seed), _hash32_i32(idx, int_seed), name="hash")
    for impl in ("ref", "torch", "auto"):
        want = lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=int_seed, impl=impl)
        got = lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=t_seed, impl=impl)
        assert_equal(got, want, name=impl)
    if "triton" in IMPLS:
        with pytest.raises(TypeError, match="impl='triton' takes the dropout seed as a Python int"):
            lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=t_seed, impl="triton")


def test_bad_seeds_are_named(seed):
    x, w, b, a, bb = _make(2, 8, 4, 2, torch.float32, seed=seed)
    with pytest.raises(TypeError, match="one integer"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, seed=torch.tensor([1.5]))
    with pytest.raises(TypeError, match="one integer"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, seed=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="seed must be an int"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, seed=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropout_under_cuda_graph_capture_draws_a_new_mask_each_replay(seed):
    x, w, b, a, bb = _make(64, 32, 16, 4, torch.float32, seed=seed)
    out = torch.empty(64, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out.copy_(lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5))
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5))
    g.replay()
    first = out.clone()
    g.replay()
    assert not torch.equal(out, first), "every replay dropped the same elements: the seed was frozen"
