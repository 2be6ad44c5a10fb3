"""codebook_lookup / vector_quantize: every backend against float64 by distance achieved, ties,
odd shapes, dtypes, gradients, opcheck, torch.compile / torch.export, errors."""

import importlib

import pytest
import torch

from seed_fast import _ext
from seed_fast.ops import codebook_lookup, codebook_lookup_ref, vector_quantize, vector_quantize_ref
from seed_fast.ops.codebook_lookup import choose_impl, not_supported_reasons
from seed_fast.testing import assert_close, assert_equal

cl = importlib.import_module("seed_fast.ops.codebook_lookup")  # the module, not the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _runnable(impl, dtype):
    z = torch.empty(2, 4, dtype=dtype, device=DEVICE)
    return not not_supported_reasons(impl, z, z)


IMPLS = [i for i in ("ref", "cpu", "triton", "cuda", "cuda_tc") if _runnable(i, torch.float32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_expected_backends_are_present():
    z = torch.empty(2, 4)  # the C++ kernel takes CPU tensors, also on a GPU machine
    assert not not_supported_reasons("cpu", z, z), "the C++ kernel must be built on every machine"
    assert "triton" in IMPLS, "the Triton kernel must run (GPU, or TRITON_INTERPRET=1 on CPU)"


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
def test_reference_matches_float64_loop(metric, shape, k, d):
    z = torch.randn(*shape, d, dtype=torch.float64)
    book = torch.randn(k, d, dtype=torch.float64)
    idx, zq = codebook_lookup_ref(z, book, metric=metric)
    assert idx.dtype == torch.int64 and idx.shape == shape
    assert_equal(idx, _naive(z, book, metric), name="index")
    assert_equal(zq, book[idx], name="zq")


def _check_achieves_min(z, book, idx, metric, exact_fraction=0.99):
    """Indices achieve the float64 minimum distance up to fp32 rounding of the kernel's scores."""
    z64, e64 = z.double().cpu().reshape(-1, z.shape[-1]), book.double().cpu()
    if metric == "cosine":
        z64 = torch.nn.functional.normalize(z64, dim=-1)
        e64 = torch.nn.functional.normalize(e64, dim=-1)
    dist = torch.cdist(z64, e64).square()  # (N, K)
    best = dist.min(dim=1).values
    achieved = dist.gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
    d = z.shape[-1]
    tol = 8 * 2.0**-24 * d**0.5 * (z64.square().sum(1) + e64.square().sum(1).max())
    worst = (achieved - best - tol).max()
    assert worst <= 0, f"an index misses the minimum distance by {float(worst):.3g} beyond fp32 rounding"
    exact = (dist.argmin(dim=1) == idx.reshape(-1).cpu()).double().mean()
    assert exact >= exact_fraction, f"only {float(exact):.3f} of the indices are the float64 argmin"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n,k,d", [(1, 1, 1), (1, 300, 5), (33, 77, 32), (64, 1100, 16), (65, 1100, 16), (70, 130, 70), (5, 600, 768)]
)
def test_backends_achieve_the_minimum(impl, dtype, metric, n, k, d, seed):
    if not _runnable(impl, dtype):
        pytest.skip(
            f"{impl} cannot run {dtype} here: "
            f"{not_supported_reasons(impl, torch.empty(1, 1, dtype=dtype), torch.empty(1, 1, dtype=dtype))}"
        )
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    book = torch.randn(k, d, generator=g).to(DEVICE, dtype)
    idx, zq = codebook_lookup(z, book, metric=metric, impl=impl)
    assert idx.shape == (n,) and idx.dtype == torch.int64 and idx.device == z.device
    assert_equal(zq, book[idx], name="zq")
    _check_achieves_min(z, book, idx, metric)


@pytest.mark.parametrize("impl", IMPLS)
def test_odd_layouts(impl, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 3, 24, generator=g).to(DEVICE)
    z = base.transpose(0, 1)[:, ::2]  # (3, 20, 24), non-contiguous
    assert not z.is_contiguous()
    book = torch.randn(101, 24, generator=g).to(DEVICE)[::1]
    idx, zq = codebook_lookup(z, book, impl=impl)
    assert idx.shape == (3, 20) and zq.shape == (3, 20, 24)
    _check_achieves_min(z, book, idx, "l2")
    # empty leading dims give empty results
    idx0, zq0 = codebook_lookup(z[:, :0], book, impl=impl)
    assert idx0.shape == (3, 0) and zq0.shape == (3, 0, 24)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k,d", [(40, 16), (400, 768)])  # the second spans several of the CPU kernel's chunks
@pytest.mark.parametrize("n", [50, 150])  # the CPU kernel's small-N and blocked paths
def test_ties_go_to_the_lowest_index(impl, k, d, n, seed):
    # small integers: every product and sum is exact in fp32, so copies tie exactly whatever order a
    # backend sums in (the Triton interpreter's numpy BLAS rounds random floats differently by column)
    g = torch.Generator().manual_seed(seed)
    uniq = torch.randint(-3, 4, (k, d), generator=g).float()
    book = torch.cat([uniq, uniq, uniq]).to(DEVICE)  # every code appears 3 times: 0..k-1, k..2k-1, 2k..3k-1
    z = (uniq[torch.randint(0, k, (n,), generator=g)] + torch.randint(-1, 2, (n, d), generator=g)).to(DEVICE)
    idx, _ = codebook_lookup(z, book, impl=impl)
    assert int(idx.max()) < k
    assert_equal(idx, codebook_lookup_ref(z, book)[0], name="index")


@pytest.mark.skipif("triton" not in IMPLS, reason="triton cannot run here")
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_triton_codebook_splits_agree(splits, seed):
    from seed_fast.kernels.codebook_lookup import codebook_lookup_triton

    g = torch.Generator().manual_seed(seed)
    uniq = torch.randint(-3, 4, (100, 8), generator=g).float()  # exact scores: see the test above
    book = torch.cat([uniq, uniq]).to(DEVICE)  # ties across splits
    z = torch.randint(-3, 4, (20, 8), generator=g).float().to(DEVICE)
    idx, zq = codebook_lookup_triton(z, book, splits=splits)
    assert_equal(zq, book[idx], name="zq")
    assert_equal(idx, codebook_lookup_ref(z, book)[0], name="index")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_far_from_origin_low_precision(impl, dtype, seed):
    """Where SEED's fp16 expanded formula overflows / cancels, fp32 accumulation still finds the code."""
    if not _runnable(impl, dtype):
        pytest.skip(f"{impl} cannot run {dtype} here")
    g = torch.Generator().manual_seed(seed)
    center = torch.full((32,), 40.0)
    book = (center + torch.randn(256, 32, generator=g)).to(DEVICE, dtype)
    z = (center + torch.randn(64, 32, generator=g)).to(DEVICE, dtype)
    idx, _ = codebook_lookup(z, book, impl=impl)
    _check_achieves_min(z, book, idx, "l2", exact_fraction=0.95)
    if dtype == torch.float16:  # the SEED formula in fp16 is not usable here at all
        naive = (z.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * z @ book.t()).float()
        assert not torch.isfinite(naive).all()


def test_auto_picks_a_kernel_and_falls_back():
    z = torch.randn(4, 8, device=DEVICE)
    assert choose_impl(z, z) in (("cpu",) if DEVICE == "cpu" else ("cuda", "triton", "torch"))
    assert choose_impl(z.double(), z.double()) == "ref"  # no kernel takes fp64
    with pytest.raises(RuntimeError, match=r"impl='cpu' cannot run.*float64"):
        codebook_lookup(z.double().cpu(), z.double().cpu(), impl="cpu")
    if not torch.cuda.is_available():
        for impl in ("cuda", "cuda_tc"):
            with pytest.raises(RuntimeError, match=rf"impl='{impl}' cannot run.*not a CUDA device"):
                codebook_lookup(z, z, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_codebook_gradient_through_the_gather(impl, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 11, 8, generator=g).to(DEVICE)
    book = torch.randn(50, 8, generator=g).to(DEVICE).requires_grad_()
    book_ref = book.detach().clone().requires_grad_()
    w = torch.randn(3, 11, 8, generator=g).to(DEVICE)
    _, zq = codebook_lookup(z, book, impl=impl)
    (zq * w).sum().backward()
    _, zq_ref = codebook_lookup_ref(z, book_ref)
    (zq_ref * w).sum().backward()
    assert_close(book.grad, book_ref.grad, atol=1e-6, rtol=1e-6, name="codebook grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_vector_quantize_matches_plain_torch(impl, dtype, tol, seed):
    if dtype == torch.float64:
        impl = "ref"
    elif not _runnable(impl, dtype):
        pytest.skip(f"{impl} cannot run {dtype}")
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(2, 32, 16, generator=g)
    b0 = torch.randn(64, 16, generator=g)
    gz = torch.randn(2, 32, 16, generator=g)

    def run(fn, **kw):
        z = z0.to(DEVICE, dtype).requires_grad_()
        b = b0.to(DEVICE, dtype).requires_grad_()
        z_st, idx, loss = fn(z, b, 0.25, **kw)
        ((z_st * gz.to(DEVICE, dtype)).sum() + 3.0 * loss).backward()
        return z_st, idx, loss, z.grad, b.grad

    ours = run(vector_quantize, impl=impl)
    ref = run(vector_quantize_ref)
    assert_equal(ours[1], ref[1], name="idx")
    for name, a, e in zip(("z_st", "idx", "loss", "grad z", "grad codebook"), ours, ref):
        if name != "idx":
            assert a.dtype == e.dtype, name
            assert_close(a.float(), e.float(), atol=tol, rtol=tol, name=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    z, book = torch.randn(9, 12).to(DEVICE), torch.randn(70, 12).to(DEVICE)
    torch.library.opcheck(torch.ops.seed_fast.codebook_lookup_indices.default, (z, book, impl))


def test_torch_compile_fullgraph_and_export():
    z, book = torch.randn(2, 32, 8), torch.randn(100, 8)

    def f(z, book):
        idx, zq = codebook_lookup(z, book, impl="cpu")
        return idx, zq * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for name, a, b in zip(("idx", "zq * 2"), compiled(z, book), f(z, book)):
        assert_equal(a, b, name=name)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.book = torch.nn.Parameter(book)

        def forward(self, z):
            return codebook_lookup(z, self.book, impl="cpu")[0]

    ep = torch.export.export(M(), (z,))
    assert_equal(ep.module()(z), f(z, book)[0], name="exported")


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(impl):
    z, book = torch.randn(4, 8, device=DEVICE), torch.randn(16, 8, device=DEVICE)
    with pytest.raises(ValueError, match="last dim must equal the code dim 8"):
        codebook_lookup(torch.randn(4, 7, device=DEVICE), book, impl=impl)
    with pytest.raises(ValueError, match=r"codebook must be \(K, D\)"):
        codebook_lookup(z, book[None], impl=impl)
    with pytest.raises(ValueError, match="empty"):
        codebook_lookup(z, book[:0], impl=impl)
    with pytest.raises(TypeError, match="floating point"):
        codebook_lookup(z.long(), book, impl=impl)
    with pytest.raises(TypeError, match="floating point"):
        codebook_lookup(z, book.int(), impl=impl)
    zn = z.clone()
    zn[2, 3] = float("nan")
    bn = book.clone()
    bn[5, 0] = float("inf")
    if DEVICE == "cuda":  # found without a sync: reported by the next check, once
        for args in ((zn, book), (z, bn)):
            codebook_lookup(*args, impl=impl)
            with pytest.raises(ValueError, match="met NaN/inf"):
                cl.codebook_lookup_check()
        cl.codebook_lookup_check()
    else:
        with pytest.raises(ValueError, match="z contains 1 NaN/inf"):
            codebook_lookup(zn, book, impl=impl)
        with pytest.raises(ValueError, match="codebook contains 1 NaN/inf"):
            codebook_lookup(z, bn, impl=impl)
    with pytest.raises(ValueError, match="metric"):
        codebook_lookup(z, book, metric="dot", impl=impl)


def test_bad_input_general():
    with pytest.raises(ValueError, match="above the int32 index range"):
        codebook_lookup(torch.empty(4, 1, device="meta"), torch.empty(2**31, 1, device="meta"))
    with pytest.raises(ValueError, match="unknown impl 'flash'"):
        codebook_lookup(torch.randn(4, 8), torch.randn(16, 8), impl="flash")
    with pytest.raises(ValueError, match="z is on cpu but codebook on meta"):
        codebook_lookup(torch.randn(4, 8), torch.empty(16, 8, device="meta"))


@pytest.mark.parametrize("vq", [vector_quantize, vector_quantize_ref])
def test_vector_quantize_refuses_an_empty_batch_and_a_bad_beta(vq):
    book = torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"z holds no vectors \(shape \(0, 8\)\)"):
        vq(torch.randn(0, 8), book)
    for beta in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            vq(torch.randn(3, 8), book, beta)
    assert torch.isfinite(vq(torch.randn(3, 8), book)[2])


def test_reference_chunking_does_not_change_the_result(monkeypatch):
    z, book = torch.randn(101, 8), torch.randn(77, 8)
    full, _ = codebook_lookup_ref(z, book)
    monkeypatch.setattr(cl, "_REF_CHUNK_ELEMS", 8 * 77 * 3)  # 3 rows per chunk
    chunked, _ = codebook_lookup_ref(z, book)
    assert_equal(chunked, full, name="chunked")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [3, 100])  # the CPU kernel's small-N and packed paths check separately
@pytest.mark.parametrize("where", ["z", "codebook"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_named(impl, n, where, bad):
    z, book = torch.randn(n, 24, device=DEVICE), torch.randn(300, 24, device=DEVICE)
    (z if where == "z" else book)[-1, 5] = bad
    if DEVICE == "cuda" and impl != "cpu":  # found without a sync: reported by the next check
        idx, _ = codebook_lookup(z, book, impl=impl)
        assert bool(((idx >= 0) & (idx < 300)).all())
        with pytest.raises(ValueError, match="met NaN/inf"):
            cl.codebook_lookup_check()
        cl.codebook_lookup_check()  # reported once
        return
    with pytest.raises(ValueError, match=f"{where} contains 1 NaN/inf"):
        codebook_lookup(z, book, impl=impl)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the flag read without a sync is a GPU path")
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "cpu"])
@pytest.mark.parametrize("n", [1, 32, 1000])  # one and several row tiles; the codebook split or not
def test_gpu_non_finite_is_reported_at_the_next_call(impl, n):
    z, book = torch.randn(n, 32, device=DEVICE), torch.randn(8192, 32, device=DEVICE)
    bad = z.clone()
    bad[n // 2, 3] = float("nan")
    codebook_lookup(bad, book, impl=impl)  # returns without waiting for the GPU
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="an earlier call on cuda"):
        codebook_lookup(z, book, impl=impl)
    idx, zq = codebook_lookup(z, book, impl=impl)  # the flag was cleared by the report
    cl.codebook_lookup_check()
    assert_equal(idx, codebook_lookup_ref(z, book)[0], name="index after the report")
    assert_equal(zq, book[idx], name="zq after the report")
    idx, _ = codebook_lookup(bad, book, impl=impl, check_finite=False)
    cl.codebook_lookup_check()  # not checked, nothing flagged
    keep = torch.arange(n) != n // 2
    assert_equal(idx[keep], codebook_lookup_ref(z[keep], book)[0], name="finite rows")


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_mixed_dtypes_give_z_q_in_the_codebook_dtype(dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(70, 16, generator=g).to(DEVICE, dtypes[0])
    book = torch.randn(300, 16, generator=g).to(DEVICE, dtypes[1])
    for impl in IMPLS:
        if not_supported_reasons(impl, z, book):
            continue
        idx, zq = codebook_lookup(z, book, impl=impl)
        assert zq.dtype == book.dtype, impl
        assert_equal(zq, book[idx], name=f"{impl} zq")
        _check_achieves_min(z, book, idx, "l2")


def test_cuda_code_path_is_one_operator_call_without_a_sync(monkeypatch):
    """The Python around the fused operator adds no kernels and reads nothing back: on CUDA the
    operator is one kernel launch (here the same call reaches the C++ CPU kernel)."""
    _cpu_ext()
    monkeypatch.setattr(cl, "choose_impl", lambda z, book, impl="auto": "cuda")
    z, book = torch.randn(2, 32, 32), torch.randn(8192, 32)
    codebook_lookup(z, book)  # warm caches
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        idx, zq = codebook_lookup(z, book)
    events = prof.events()
    top = [e.name for e in events if e.cpu_parent is None]
    assert top.count("seed_fast::_codebook_lookup") == 1, top
    assert set(top) <= {"seed_fast::_codebook_lookup", "aten::view", "aten::reshape"}, top

    def inside_op(e):
        while e is not None and e.name != "seed_fast::_codebook_lookup":
            e = e.cpu_parent
        return e is not None

    outside = [e.name for e in events if not inside_op(e)]
    assert not [n for n in outside if n in ("aten::copy_", "aten::clone", "aten::empty")], outside  # views only
    assert not [e.name for e in events if e.name in ("aten::_local_scalar_dense", "aten::item")]
    assert idx.shape == (2, 32)
    assert_equal(zq, book[idx], name="zq")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "cpu"])  # the CPU kernel checks in-kernel, always
def test_check_finite_false_skips_the_check(impl):
    z, book = torch.randn(5, 8, device=DEVICE), torch.randn(40, 8, device=DEVICE)
    z[1, 2] = float("nan")
    idx, _ = codebook_lookup(z, book, impl=impl, check_finite=False)
    assert idx.shape == (5,) and bool(((idx >= 0) & (idx < 40)).all())
    keep = torch.tensor([0, 2, 3, 4])  # the finite rows still get their nearest code
    assert_equal(idx[keep], codebook_lookup_ref(z[keep], book)[0], name="finite rows")


def test_overflowing_norms_are_refused():
    z, book = torch.randn(3, 4), torch.randn(10, 4)
    book[2] = 3e19  # finite, but |e|^2 overflows float32
    with pytest.raises(ValueError, match="overflow float32"):
        codebook_lookup(z, book, impl="cpu")


_CPU_IMPLS = ["auto"] + [
    i for i in ("ref", "torch", "cpu", "triton") if not not_supported_reasons(i, *[torch.empty(2, 4)] * 2)
]


@pytest.mark.parametrize("impl", _CPU_IMPLS)
def test_inputs_beyond_float32_distances_are_refused_by_every_cpu_backend(impl, seed):
    """z ~ 1e30 (|z - e|^2 overflows) and a denormal-scale z and codebook (every distance underflows):
    refused as the reference refuses them, not answered with an index."""
    g = torch.Generator().manual_seed(seed)
    z, book = torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g)
    with pytest.raises(ValueError, match="overflow float32"):
        codebook_lookup(z * 1e30, book, impl=impl)
    with pytest.raises(ValueError, match="overflow float32"):
        vector_quantize(z * 1e30, book, impl=impl)
    with pytest.raises(ValueError, match="underflow float32"):
        codebook_lookup(z * 1e-30, book * 1e-30, impl=impl)
    # a tiny z against a normal codebook has normal distances: it is answered, as the reference answers
    assert_equal(codebook_lookup(z * 1e-30, book, impl=impl)[0], codebook_lookup_ref(z * 1e-30, book)[0], name="tiny z")


def _cpu_ext():
    """The C++ extension's operators are loaded (or the test is skipped)."""
    ext = _ext.cpu_ext()
    if ext is None:
        pytest.skip(f"the C++ extension is not built: {_ext.cpu_ext_error()}")
    return ext


@pytest.mark.parametrize("isa", ["generic", "avx512"])
@pytest.mark.parametrize("n,k,d", [(65, 33, 1), (131, 1100, 16), (70, 130, 70), (300, 700, 32)])
def test_cpu_micro_kernels_each_match_float64(isa, n, k, d, seed):
    """Both CPU micro-kernels (the auto choice hides the other on any one machine) on the blocked path."""
    if isa == "avx512" and _cpu_ext().codebook_argmin_isa() != "avx512":
        pytest.skip("this CPU has no AVX-512")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    book = torch.randn(k, d, generator=g)
    idx = torch.ops.seed_fast._codebook_lookup_indices(z, book, isa=isa)
    _check_achieves_min(z, book, idx, "l2")


def test_cpu_isa_argument_is_checked():
    ext = _cpu_ext()
    z = torch.randn(70, 8)
    with pytest.raises(RuntimeError, match="isa must be"):
        torch.ops.seed_fast._codebook_lookup_indices(z, z, isa="sse9")
    if ext.codebook_argmin_isa() != "avx512":
        with pytest.raises(RuntimeError, match="no AVX-512"):
            torch.ops.seed_fast._codebook_lookup_indices(z, z, isa="avx512")


# --------------------------------------------------------------- the compiled operator, called directly
def _kernel_devices():
    _cpu_ext()
    return ["cpu", "cuda"] if "cuda" in IMPLS else ["cpu"]


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("n", [3, 100])  # the CPU kernel's small-N and packed paths
def test_compiled_op_opcheck(n, dtypes):
    for device in _kernel_devices():
        z = torch.randn(n, 12).to(device, dtypes[0])
        book = torch.randn(70, 12).to(device, dtypes[1])
        torch.library.opcheck(torch.ops.seed_fast._codebook_lookup_indices.default, (z, book))
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        torch.library.opcheck(torch.ops.seed_fast._codebook_lookup.default, (z, book, flag))
        torch.library.opcheck(torch.ops.seed_fast._codebook_lookup.default, (z, book))


def test_compiled_op_under_torch_compile_with_dynamic_shapes():
    for device in _kernel_devices():
        op = torch.ops.seed_fast._codebook_lookup_indices
        f = torch.compile(lambda z, book: op(z, book) + 1, fullgraph=True, dynamic=True, backend="aot_eager")
        for n, k in ((70, 40), (9, 33)):
            z, book = torch.randn(n, 8, device=device), torch.randn(k, 8, device=device)
            assert_equal(f(z, book), op(z, book) + 1, name=f"{device} n={n} k={k}")


def test_compiled_op_errors_name_the_problem():
    """The C++ operators raise RuntimeError (thrown inside libc10, see csrc/codebook_lookup/
    codebook_lookup.h), naming the problem; the Python API raises ValueError / TypeError first."""
    _cpu_ext()
    op = torch.ops.seed_fast._codebook_lookup_indices
    z, book = torch.randn(70, 8), torch.randn(16, 8)
    with pytest.raises(RuntimeError, match="z has D=8 but codebook has D=4"):
        op(z, book[:, :4])
    with pytest.raises(RuntimeError, match=r"z must be \(N, D\)"):
        op(z[0], book)
    with pytest.raises(RuntimeError, match="the codebook is empty"):
        op(z, book[:0])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(z.double(), book)
    for n in (3, 70):  # small-N and packed paths find NaN / inf separately
        zn, bn = z[:n].clone(), book.clone()
        zn[1, 2], zn[2, 2], bn[3, 1] = float("nan"), float("inf"), float("nan")
        with pytest.raises(RuntimeError, match="z contains 2 NaN/inf"):
            op(zn, bn)
        with pytest.raises(RuntimeError, match="codebook contains 1 NaN/inf"):
            op(z[:n], bn)
        flag = torch.zeros(1, dtype=torch.int32)  # with a flag: set, no raise, indices in range
        idx, _ = torch.ops.seed_fast._codebook_lookup(zn, bn, flag)
        assert int(flag[0]) == 1 and bool(((idx >= 0) & (idx < 16)).all())
        flag.zero_()
        torch.ops.seed_fast._codebook_lookup(z[:n], book, flag)
        assert int(flag[0]) == 0, "a flag set without NaN / inf"
        bn[3, 1] = 3e19
        with pytest.raises(RuntimeError, match="squared norms overflow float32"):
            op(z[:n], bn)
        with pytest.raises(RuntimeError, match="squared norms overflow float32"):
            op(z[:n] * 1e30, book)  # finite z, every distance beyond float32 (the scores alone stay finite)
        flag.zero_()
        torch.ops.seed_fast._codebook_lookup(z[:n] * 1e30, book, flag)
        assert int(flag[0]) == 1, "a z beyond float32's distances not flagged"
    with pytest.raises(RuntimeError, match="error_flag must be a contiguous int32 CPU tensor"):
        torch.ops.seed_fast._codebook_lookup(z, book, torch.zeros(1))
    with pytest.raises(RuntimeError, match="z has D=8 but codebook has D=7"):
        op(torch.empty(4, 8, device="meta"), torch.empty(2, 7, device="meta"))


def test_python_api_keeps_typed_errors_for_the_cpu_kernel():
    _cpu_ext()
    z, book = torch.randn(70, 8), torch.randn(16, 8)
    for n in (3, 70):
        zn = z[:n].clone()
        zn[1, 2] = float("nan")
        with pytest.raises(ValueError, match="z contains 1 NaN/inf"):
            codebook_lookup(zn, book, impl="cpu")
        with pytest.raises(ValueError, match="z contains 1 NaN/inf"):  # the registered op, also with grad
            codebook_lookup(zn, book.clone().requires_grad_(), impl="cpu")
        assert_equal(codebook_lookup(z[:n], book, impl="cpu")[0], codebook_lookup_ref(z[:n], book)[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale,error", [(1e30, "overflow"), (1e-40, "underflow"), (1e-21, "underflow")])
def test_inputs_beyond_float32_distances_are_refused(impl, scale, error, seed):
    """Distances that overflow or underflow fp32 would make every index meaningless (index 0 for all
    rows): refused, where the same inputs scaled into range find the float64 answer."""
    if DEVICE == "cuda" and impl != "ref":
        pytest.skip("on a GPU, the kernels flag overflow (inf scores) but do not look for underflow")
    g = torch.Generator().manual_seed(seed)
    z, book = torch.randn(5, 8, generator=g).to(DEVICE), torch.randn(50, 8, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match=f"distances {error} float32"):
        codebook_lookup(z * scale, book * scale, impl=impl)
    for ok in (1e-17, 1e18):  # the squared norms stay in range: the float64 answer
        idx, _ = codebook_lookup(z * ok, book * ok, impl=impl)
        want = torch.cdist((z * ok).double(), (book * ok).double()).argmin(1)
        assert_equal(idx, want, name=f"{impl} at scale {ok:g}")


@pytest.mark.parametrize("impl", [i for i in ("torch", "triton", "cuda", "cuda_tc") if _runnable(i, torch.float32)])
@pytest.mark.parametrize("n", [1, 70])  # one and several row tiles
def test_flagged_backends_flag_z_whose_norms_overflow(impl, n, seed):
    """With an error flag (the no-sync path a GPU takes), a finite z whose squared norms overflow
    float32 sets the flag: its scores alone (0.5 |e|^2 - z.e) stay finite and would give an index."""
    g = torch.Generator().manual_seed(seed)
    z, book = torch.randn(n, 8, generator=g).to(DEVICE), torch.randn(300, 8, generator=g).to(DEVICE)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    cl.codebook_lookup_indices(z, book, impl, True, flag)
    assert int(flag[0]) == 0, "a flag set for inputs in range"
    big = z.clone()
    big[n // 2] *= 1e30
    cl.codebook_lookup_indices(big, book, impl, True, flag)
    assert int(flag[0]) == 1, f"{impl}: a z beyond float32's squared norms not flagged"
    flag.zero_()
    bad_book = book.clone()
    bad_book[7] = 3e19
    cl.codebook_lookup_indices(z, bad_book, impl, True, flag)
    assert int(flag[0]) == 1, f"{impl}: a codebook beyond float32's squared norms not flagged"


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the flag read without a sync is a GPU path")
@pytest.mark.parametrize("impl", ["auto", "torch"] + [i for i in IMPLS if i not in ("cpu", "ref")])
def test_gpu_z_beyond_float32_is_reported_at_the_next_call(impl):
    z, book = torch.randn(32, 32, device=DEVICE), torch.randn(8192, 32, device=DEVICE)
    codebook_lookup(z * 1e30, book, impl=impl)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="an earlier call on cuda"):
        codebook_lookup(z, book, impl=impl)
    codebook_lookup(z, book, impl=impl)
    cl.codebook_lookup_check()  # in range: nothing flagged


def test_the_scale_check_sees_a_codebook_changed_in_place():
    z, book = torch.randn(3, 8), torch.randn(40, 8)
    codebook_lookup(z, book)
    with torch.no_grad():
        book.mul_(1e-40)
    with pytest.raises(ValueError, match="underflow"):
        codebook_lookup(z * 1e-40, book)
    with pytest.raises(ValueError, match="underflow"):
        codebook_lookup_ref(z * 1e-40, book)


def _tf32(x):
    """Round fp32 to TF32 (10 mantissa bits, to nearest) as the tensor cores' conversion does."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _split_case(offset, seed):
    """K=8192, D=32 inputs (+offset), the fp32 specification's codes, and both sides split hi + lo."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1024, 32, generator=g) + offset
    book = torch.randn(8192, 32, generator=g) + offset
    zh, eh = _tf32(z), _tf32(book)
    return z, book, codebook_lookup_ref(z, book)[0], (zh, _tf32(z - zh)), (eh, _tf32(book - eh))


@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_3xtf32_scores_keep_the_fp32_contract(offset, seed):
    """The Triton kernel's fp32 dots on tensor cores: each operand split into a TF32 part and a TF32
    remainder, three products summed in fp32. Emulated here: 0 codes differ from the fp32
    specification at K=8192, D=32 on N(0,1) inputs and inputs offset by +4 (one TF32 product, which
    this split replaces, does change codes)."""
    z, book, spec, (zh, zl), (eh, el) = _split_case(offset, seed)
    half = 0.5 * book.square().sum(1)
    three = half - (zh @ eh.T + (zh @ el.T + zl @ eh.T))
    assert_equal(three.argmin(1), spec, name="3xTF32 codes")
    one = half - zh @ eh.T
    if offset:
        assert int((one.argmin(1) != spec).sum()) > 0  # why the split is needed


@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_cuda_tc_accumulation_order_keeps_the_fp32_contract(offset, seed):
    """The "cuda_tc" kernel's order: per 8-wide step of D, the two small products (lo.hi, hi.lo) then
    the big one (hi.hi) go into one fp32 accumulator (mma.sync m16n8k8 TF32). Emulated with 8-wide
    matrix products: 0 codes differ from the fp32 specification at K=8192, D=32."""
    z, book, spec, (zh, zl), (eh, el) = _split_case(offset, seed)
    acc = torch.zeros(1024, 8192)
    for k in range(0, 32, 8):
        s = slice(k, k + 8)
        acc = acc + zl[:, s] @ eh[:, s].T
        acc = acc + zh[:, s] @ el[:, s].T
        acc = acc + zh[:, s] @ eh[:, s].T
    assert_equal((0.5 * book.square().sum(1) - acc).argmin(1), spec, name="cuda_tc codes (emulated)")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the tensor-core kernels run on a GPU")
@pytest.mark.parametrize("impl", [i for i in ("triton", "cuda_tc") if i in IMPLS])
@pytest.mark.parametrize("offset", [0.0, 4.0])
@pytest.mark.parametrize("n", [32, 8192])
def test_gpu_tensor_core_kernels_keep_the_fp32_contract(impl, offset, n, seed):
    """On the GPU itself: 0 codes differ from the fp32 specification at K=8192, D=32 (and z_q is the
    gathered row), on N(0,1) inputs and inputs offset by +4."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, 32, generator=g) + offset).to(DEVICE)
    book = (torch.randn(8192, 32, generator=g) + offset).to(DEVICE)
    idx, zq = codebook_lookup(z, book, impl=impl)
    cl.codebook_lookup_check()
    assert_equal(idx, codebook_lookup_ref(z, book)[0], name=f"{impl} codes")
    assert_equal(zq, book[idx], name=f"{impl} z_q")


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in IMPLS, reason="needs the CUDA extension on a GPU")
def test_gpu_cuda_tc_says_why_it_cannot_run():
    z = torch.randn(4, 96, device=DEVICE)
    reasons = not_supported_reasons("cuda_tc", z, z)
    assert any("D=96 is above" in r for r in reasons), reasons
    with pytest.raises(RuntimeError, match="impl='cuda_tc' cannot run"):
        codebook_lookup(z, z, impl="cuda_tc")
    with pytest.raises(RuntimeError, match="isa must be 'auto', 'simt' or 'tc'"):
        torch.ops.seed_fast._codebook_lookup(z, z, None, "avx512")
    if torch.cuda.get_device_capability()[0] < 8:
        assert any("sm_80 or newer" in r for r in not_supported_reasons("cuda_tc", z[:, :32], z[:, :32]))


@pytest.mark.skipif("triton" not in IMPLS, reason="triton cannot run here")
def test_triton_split_workspace_is_left_reset(seed):
    """The split path merges through a workspace that the last program of each row tile resets, so
    it is initialized once and calls in a row (or graph replays) stay exact."""
    from seed_fast.kernels import codebook_lookup as kmod

    g = torch.Generator().manual_seed(seed)
    book = torch.randn(300, 16, generator=g).to(DEVICE)
    for n in (3, 40, 3):
        z = torch.randn(n, 16, generator=g).to(DEVICE)
        idx, zq = kmod.codebook_lookup_triton(z, book, splits=4)
        assert_equal(idx, codebook_lookup_ref(z, book)[0], name=f"index, n={n}")
        assert_equal(zq, book[idx], name=f"zq, n={n}")
    for words, counters in (w for k, w in kmod._workspaces.items() if k[0] == torch.device(DEVICE)):
        assert bool((words == -(2**63)).all()) and bool((counters == 0).all())


@pytest.mark.skipif("triton" not in IMPLS, reason="triton cannot run here")
def test_triton_fused_op_opcheck():
    z, book = torch.randn(33, 12).to(DEVICE), torch.randn(70, 12).to(DEVICE)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.seed_fast._codebook_lookup_triton.default, (z, book, flag))
