"""Nearest-code search for vector quantizers, and SEED's vector-quantization step.

`codebook_lookup_ref` is the specification: plain torch, exact squared distances
sum((z - e)^2) accumulated in fp32 (fp64 for fp64 inputs) whatever the input dtype, processed in
chunks so that the N x K distance matrix is never held at once, ties to the lowest index.

The fused backends ("cpu": C++ in csrc/codebook_lookup, "triton": kernels/codebook_lookup.py,
"cuda": csrc/codebook_lookup/*.cu, FFMA on every GPU; "cuda_tc": the same on tensor cores, sm_80+,
D <= 64) score codes by 0.5 ||e||^2 - z.e in fp32 (the Triton and "cuda_tc" kernels' fp32 dots as
3xTF32 on tensor cores, which keeps fp32's error), never materialize N x K, keep the
running (min, argmin), and gather z_q in the same launch. "torch" scores the same way with the vendor's fp32
matrix product (cuBLAS / the CPU BLAS) over row chunks, then argmin: the stock path, with TF32 off.
"auto" takes the backend measured fastest for the dtype and row count on this class of device
(seed_fast/ops/dispatch.py); unmeasured, "cpu" on the CPU and "torch" on a GPU.
The C++ and CUDA kernels are the operators `torch.ops.seed_fast._codebook_lookup(z, codebook)`
(indices and z_q; one kernel launch on CUDA) and `_codebook_lookup_indices` (kernel picked by
device); every backend is reachable as `torch.ops.seed_fast.codebook_lookup_indices(z, codebook,
impl)`. All have fake impls, so torch.compile(fullgraph=True) and torch.export see one opaque node.
On a GPU, NaN / inf are reported without a host sync (see `codebook_lookup_check`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from .. import _ext
from . import dispatch as _table
from . import dispatch_log as _dispatch
from ._triton_support import triton_reasons

# Load the compiled operators now, so that torch.compile never traces their first load (a failure
# is kept and reported by `python -m seed_fast.info`).
_ext.cpu_ext()
_ext.cuda_ext()

IMPLS = ("auto", "ref", "torch", "cpu", "triton", "cuda", "cuda_tc")
METRICS = ("l2", "cosine")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_ISA = {"cuda": "auto", "cuda_tc": "tc"}  # impl -> the CUDA operator's isa ("auto": FFMA)
_INT32_MAX = 2**31 - 1

# Elements of the (rows, K, D) difference tensor built per chunk by the reference (~64 MB in fp32).
_REF_CHUNK_ELEMS = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------- reference
def codebook_lookup_ref(
    z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row for each vector of z.

    z: (..., D) fp32 / fp16 / bf16 / fp64; codebook: (K, D), same dtype family.
    metric: "l2" (squared Euclidean, SEED) or "cosine" (both sides l2-normalized, LaVIT).
    Returns (indices int64 (...), z_q = codebook[indices] (..., D) in codebook's dtype).
    z_q is differentiable with respect to the codebook (gather); indices carry no gradient.
    """
    _check_inputs(z, codebook, metric)
    indices = _argmin_ref(*_prepare(z, codebook, metric)).reshape(z.shape[:-1])
    return indices, F.embedding(indices, codebook)


def squared_distances(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """The exact distance every nearest-code search here uses: z (N, D), book (K, D) -> (N, K), the
    squared differences summed over D in the inputs' dtype (callers cast to fp32 or fp64 first). Not
    the expanded |z|^2 - 2 z.e + |e|^2, which cancels between close codes."""
    return (z[:, None, :] - book[None, :, :]).square().sum(-1)


def _argmin_ref(flat: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if torch.float64 in (flat.dtype, book.dtype) else torch.float32
    flat, book = flat.to(acc), book.to(acc)
    n, k = flat.shape[0], book.shape[0]
    indices = torch.empty(n, dtype=torch.long, device=flat.device)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, k * book.shape[1]))
    for start in range(0, n, rows):
        chunk = flat[start : start + rows]
        dist = squared_distances(chunk, book)  # (rows, K)
        hi = dist.amax(dim=-1)  # (rows,): NaN where the inputs hold NaN
        if bool((hi == float("inf")).any()) and bool(torch.isfinite(chunk).all() & torch.isfinite(book).all()):
            raise ValueError(_SCALE_ERRORS["overflow"])  # finite inputs, infinite distances
        # every distance of a row underflowed (zero or subnormal: no precision left to rank codes)
        if bool((hi < torch.finfo(dist.dtype).tiny).any()) and bool((book != book[:1]).any()):
            raise ValueError(_SCALE_ERRORS["underflow"])
        indices[start : start + rows] = dist.argmin(dim=-1)  # first minimum = lowest index
    return indices


_SCALE_ERRORS = {
    "overflow": "codebook_lookup: the squared distances overflow float32 (values above ~1e19); scale z and the "
    "codebook down by the same power of two, or pass float64",
    "underflow": "codebook_lookup: the squared distances underflow float32 (values below ~1e-19); scale z and the "
    "codebook up by the same power of two, or pass float64",
}
_scale_verdicts = WeakTensorKeyDictionary()  # CPU codebook -> (version, None or an error key)


def _check_codebook_scale(book: torch.Tensor) -> None:
    """Refuse a CPU codebook whose squared norms leave float32's normal range (all codes' norms below
    it while some value is not zero, or any norm above it): every backend's fp32 distances would be
    meaningless. Checked once per codebook and version (a parameter: once per optimizer step)."""
    try:
        version = book._version
    except RuntimeError:  # an inference-mode tensor has no version counter: check every call
        version = None
    hit = _scale_verdicts.get(book) if version is not None else None
    if hit is not None and hit[0] == version:
        verdict = hit[1]
    else:
        with torch.no_grad():
            top = float(book.float().square().sum(1).max())
            verdict = None
            if top == float("inf") and bool(torch.isfinite(book).all()):
                verdict = "overflow"
            elif top < torch.finfo(torch.float32).tiny and bool((book != 0).any()):
                verdict = "underflow"
        if version is not None:
            _scale_verdicts[book] = (version, verdict)
    if verdict is not None:
        raise ValueError(_SCALE_ERRORS[verdict])


def _check_z_scale(flat: torch.Tensor) -> None:
    """Refuse finite z whose squared norms overflow float32 (values above ~1e19): every distance to
    them does too, yet the expanded-form scores (0.5 |e|^2 - z.e) stay finite and give an index. One
    fused reduction per call; NaN / inf are left to the finite check, which names them."""
    if not flat.shape[0]:
        return
    top = float(torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32).amax())
    if top == float("inf") and bool(torch.isfinite(flat).all()):
        raise ValueError(_SCALE_ERRORS["overflow"])


def _argmin_torch(flat: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """argmin_k 0.5 ||e_k||^2 - z.e_k through the vendor's matrix product, in row chunks."""
    acc = torch.float64 if torch.float64 in (flat.dtype, book.dtype) else torch.float32
    flat, book = flat.to(acc), book.to(acc)
    half = 0.5 * book.square().sum(1)  # (K,)
    n, k = flat.shape[0], book.shape[0]
    rows = max(1, _REF_CHUNK_ELEMS // max(1, k))  # (rows, K) scores per chunk: ~64 MB in fp32
    if rows >= n:
        return torch.addmm(half, flat, book.t(), alpha=-1).argmin(1)
    indices = torch.empty(n, dtype=torch.long, device=flat.device)
    for start in range(0, n, rows):
        scores = torch.addmm(half, flat[start : start + rows], book.t(), alpha=-1)
        indices[start : start + rows] = scores.argmin(1)  # first minimum = lowest index
    return indices


def _prepare(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    flat = z if z.dim() == 2 else z.reshape(-1, z.shape[-1])
    if metric == "cosine":
        acc = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
        return F.normalize(flat.to(acc), dim=-1), F.normalize(codebook.to(acc), dim=-1)
    return flat, codebook


# --------------------------------------------------------------------------------------- ops
# The C++ / CUDA kernels are the operators `seed_fast::_codebook_lookup` (indices and z_q in one
# call: one kernel launch on CUDA) and `seed_fast::_codebook_lookup_indices` (csrc/, registered with
# TORCH_LIBRARY, Meta kernels for fake tensors). Every backend is reachable through the operator
# below, registered directly (`Library.define` + `impl`: a few microseconds per call, against 10-20
# for `torch.library.custom_op`), so torch.compile(fullgraph=True) and torch.export see one node.
_lib = torch.library.Library("seed_fast", "FRAGMENT")
_lib.define(
    "codebook_lookup_indices(Tensor z, Tensor codebook, str impl, bool check_finite=True, "
    "Tensor(a!)? error_flag=None) -> Tensor"
)


def codebook_lookup_indices(
    z: torch.Tensor,
    codebook: torch.Tensor,
    impl: str,
    check_finite: bool = True,
    error_flag: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, D) x (K, D) -> (N,) int64 nearest-code indices with the named backend (not "auto").

    check_finite: look for NaN / inf. The CPU kernel checks in-kernel, at no cost, and raises
    ValueError. Elsewhere, with an int32 `error_flag` tensor on z's device, the backend sets
    error_flag[0] = 1 on a NaN / inf score without waiting for the device (codebook_lookup reads the
    flag and raises); without one, one reduction and, on a GPU, one host sync, raising ValueError.
    False skips the check (then a NaN row gets an arbitrary index)."""
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    if impl == "cpu":  # the C++ kernel finds NaN / inf on values it touches anyway, and sets the flag
        _ext.require_cpu_ext()
        cpu_flag = torch.zeros(1, dtype=torch.int32)
        indices = torch.ops.seed_fast._codebook_lookup(z, codebook, cpu_flag)[0]
        if cpu_flag[0]:
            _raise_non_finite(z, codebook)
        return indices
    flag = error_flag if check_finite else None
    if check_finite and flag is None:
        _check_finite(z, codebook)
    if impl in ("cuda", "cuda_tc"):
        _ext.require_cuda_ext()
        isa = _CUDA_ISA[impl]
        if flag is None:
            return torch.ops.seed_fast._codebook_lookup_indices(z, codebook, isa)
        return torch.ops.seed_fast._codebook_lookup(z, codebook, flag, isa)[0]
    if impl == "triton":
        from ..kernels.codebook_lookup import codebook_lookup_triton

        return codebook_lookup_triton(z, codebook, error_flag=flag, want_zq=False)[0]
    if flag is not None:  # "ref" / "torch": a few reductions on the device, no sync
        # NaN / inf, or squared norms beyond float32 (the scores of such a z alone can stay finite):
        # either leaves a row's norm NaN or inf
        top = [
            torch.linalg.vector_norm(t, dim=-1, dtype=torch.promote_types(t.dtype, torch.float32)).amax()
            for t in (z, codebook)
        ]
        bad = ~((top[0] < float("inf")) & (top[1] < float("inf")))
        torch.bitwise_or(flag[:1], bad.to(torch.int32), out=flag[:1])
    if impl == "ref":
        return _argmin_ref(z, codebook)
    if impl == "torch":
        return _argmin_torch(z, codebook)
    raise ValueError(f"codebook_lookup_indices: unknown impl {impl!r}")


for _key in ("CPU", "CUDA"):
    _lib.impl("codebook_lookup_indices", codebook_lookup_indices, _key)

# The Triton kernel's indices and z_q in one launch (as `_codebook_lookup` is for the C++ / CUDA ones).
_lib.define("_codebook_lookup_triton(Tensor z, Tensor codebook, Tensor(a!)? error_flag=None) -> (Tensor, Tensor)")


def _codebook_lookup_triton(z, codebook, error_flag=None):
    from ..kernels.codebook_lookup import codebook_lookup_triton

    return codebook_lookup_triton(z, codebook, error_flag=error_flag)


for _key in ("CPU", "CUDA"):
    _lib.impl("_codebook_lookup_triton", _codebook_lookup_triton, _key)


@torch.library.register_fake("seed_fast::_codebook_lookup_triton", lib=_lib)
def _(z, codebook, error_flag=None):
    return z.new_empty((z.shape[0],), dtype=torch.long), codebook.new_empty((z.shape[0], z.shape[1]))


@torch.library.register_fake("seed_fast::codebook_lookup_indices", lib=_lib)
def _(z, codebook, impl, check_finite=True, error_flag=None):
    return z.new_empty((z.shape[0],), dtype=torch.long)


def _check_finite(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if bool(torch.isfinite(z).all() & torch.isfinite(codebook).all()):  # one host sync
        return
    for name, t in (("z", z), ("codebook", codebook)):
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"codebook_lookup: {name} contains {bad} NaN/inf value(s)")


# --------------------------------------------------------------------------------------- NaN / inf flags
# On a GPU, NaN / inf are found by the kernels, which set an int32 flag in pinned host memory the
# device writes directly; codebook_lookup reads it (a plain memory read, no sync) at its next call on
# that device and raises then, and `codebook_lookup_check` synchronizes and raises at once. So the
# default path never waits for the GPU. (An asynchronous device assertion would leave the process's
# CUDA context unusable after one bad input.) On the CPU every backend raises within the call.
class _DevicePointer:
    """A device-visible pointer to one int32, for torch.as_tensor (no copy)."""

    def __init__(self, ptr: int):
        self.__cuda_array_interface__ = {"shape": (1,), "typestr": "<i4", "data": (ptr, False), "version": 3}


_flags: dict = {}  # device -> (numpy view of the host word, tensor aliasing it on the device, host tensor)
_flag_unavailable: dict = {}  # device -> why the flag could not be made (then the check syncs)


def _error_flag(device: torch.device):
    """The (host view, device tensor, host tensor) flag of a CUDA device; None while a CUDA graph is
    being captured before the flag exists, or where pinned memory cannot be mapped."""
    flag = _flags.get(device)
    if flag is not None or device in _flag_unavailable:
        return flag
    if torch.cuda.is_current_stream_capturing():
        return None  # no pinned allocation during capture; the first eager call makes it
    with torch.cuda.device(device):
        host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        try:
            dev = torch.as_tensor(_DevicePointer(host.data_ptr()), device=device)
        except (RuntimeError, TypeError, ValueError) as err:
            _flag_unavailable[device] = f"pinned memory not mapped into {device}: {err}"
            return None
    if dev.data_ptr() != host.data_ptr():  # copied, not aliased: the device would write elsewhere
        _flag_unavailable[device] = f"pinned memory not mapped into {device}"
        return None
    flag = _flags[device] = (host.numpy(), dev, host)
    return flag


def _raise_flagged(device: torch.device, view) -> None:
    view[0] = 0
    raise ValueError(
        f"codebook_lookup: an earlier call on {device} met NaN/inf in z or the codebook (or distances beyond "
        "float32 range); on a GPU this is found without waiting for the kernel, so it is reported by the next "
        "codebook_lookup call on the device or by seed_fast.ops.codebook_lookup_check()"
    )


def codebook_lookup_check(device: torch.device | str | int | None = None) -> None:
    """Wait for `device` (default: the current CUDA device) and raise ValueError if a codebook_lookup
    call on it since the last check met NaN / inf. Nothing to do on the CPU, where calls raise at once."""
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    flag = _flags.get(device)
    if flag is None:
        return
    torch.cuda.synchronize(device)
    if flag[0][0]:
        _raise_flagged(device, flag[0])


# --------------------------------------------------------------------------------------- dispatch


def not_supported_reasons(impl: str, z: torch.Tensor, codebook: torch.Tensor) -> list[str]:
    """Why backend `impl` cannot run these (prepared, 2-D) inputs; empty when it can."""
    reasons = []
    dtypes = {z.dtype, codebook.dtype}
    if impl == "ref":
        return reasons
    if impl == "torch":
        if z.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            reasons.append("TF32 matrix products are on (torch.backends.cuda.matmul.allow_tf32): not fp32 scores")
        return reasons
    if not dtypes <= set(_KERNEL_DTYPES):
        reasons.append(f"dtype {sorted(map(str, dtypes))} not in float32/float16/bfloat16")
    if impl == "cpu":
        if z.device.type != "cpu":
            reasons.append(f"tensors are on {z.device}, not the CPU")
        if _ext.cpu_ext() is None:
            reasons.append(f"C++ extension not built: {_ext.cpu_ext_error()}")
    elif impl in ("cuda", "cuda_tc"):
        if z.device.type != "cuda":
            reasons.append(f"tensors are on {z.device}, not a CUDA device")
        if _ext.cuda_ext() is None:
            reasons.append(f"CUDA extension not built: {_ext.cuda_ext_error()}")
        elif impl == "cuda_tc" and z.device.type == "cuda":
            why = _tc_unsupported(z.device, z.shape[-1])
            if why:
                reasons.append(why)
    elif impl == "triton":
        reasons += triton_reasons(z.device, dtypes)
    else:
        reasons.append(f"unknown impl {impl!r}; choose from {IMPLS}")
    return reasons


_tc_verdicts: dict = {}


def _tc_unsupported(device: torch.device, d: int) -> str:
    """Why the tensor-core CUDA kernel cannot run on `device` with this D (the GPU's arch, the arches
    compiled in, D <= 64); "" when it can. Asked of the extension once per device and D."""
    key = (device, d)
    if key not in _tc_verdicts:
        _tc_verdicts[key] = torch.ops.seed_fast._codebook_tc_unsupported(torch.empty(0, d, device=device))
    return _tc_verdicts[key]


_auto_cache: dict = {}


def choose_impl(z: torch.Tensor, codebook: torch.Tensor, impl: str = "auto") -> str:
    """The backend `codebook_lookup(impl=...)` would use; raises with the reasons when it cannot run."""
    if impl == "auto":
        capturing = z.is_cuda and torch.cuda.is_current_stream_capturing()
        key = (z.device, z.dtype, codebook.dtype, z.shape[0], capturing, _table.generation())
        hit = _auto_cache.get(key)
        if hit is None:
            if len(_auto_cache) > 4096:
                _auto_cache.clear()
            hit = _auto_cache[key] = _choose_impl(z, codebook, impl)
        return hit
    return _choose_impl(z, codebook, impl)


def _choose_impl(z: torch.Tensor, codebook: torch.Tensor, impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"codebook_lookup: unknown impl {impl!r}; choose from {IMPLS}")
    if impl != "auto":
        reasons = not_supported_reasons(impl, z, codebook)
        if reasons:
            raise RuntimeError(f"codebook_lookup: impl={impl!r} cannot run these inputs: " + "; ".join(reasons))
        return impl
    if torch.float64 in (z.dtype, codebook.dtype):
        return "ref"  # no kernel takes fp64
    default = "cpu" if z.device.type == "cpu" else "torch"
    case = (("dtype", _table.dtype_name(z.dtype)),)
    chosen = _table.choose("codebook_lookup", z.device, case, z.shape[0], default)
    for cand in (chosen, default):
        if not not_supported_reasons(cand, z, codebook):
            return cand
    return "ref"


def codebook_lookup(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    impl: str = "auto",
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused nearest-code search; same contract as `codebook_lookup_ref`.

    impl: "auto" (the backend measured fastest here, see the module docstring), "ref", "torch",
    "cpu", "triton", "cuda", "cuda_tc" (tensor cores; sm_80+, D <= 64).
    NaN / inf in z or the codebook raise ValueError: within the call on the CPU; on a GPU without
    waiting for the device, at the next codebook_lookup call on that device or at
    `codebook_lookup_check()`. check_finite=False skips the check (then a NaN row gets an arbitrary
    index; the CPU kernel checks anyway, at no cost). Inside torch.compile the GPU check syncs.
    On CUDA with metric="l2" and no gradient wanted for the codebook, the "cuda" backend is one
    kernel launch for indices and z_q.
    """
    _check_inputs(z, codebook, metric)
    flat, book = _prepare(z, codebook, metric)
    chosen = choose_impl(flat, book, impl)
    if metric == "l2" and not book.is_cuda and book.dtype != torch.float64 and not torch.compiler.is_compiling():
        _check_codebook_scale(book)
        if chosen not in ("cpu", "cuda", "cuda_tc"):  # the C++ kernel finds it on the values it reads anyway
            _check_z_scale(flat)
    if _dispatch._logs:
        _dispatch.note("codebook_lookup", chosen)
    flag = None
    if chosen == "cpu" and not torch.compiler.is_compiling():
        flag = _cpu_flag()  # the C++ kernel always checks, at no cost
    elif check_finite and not torch.compiler.is_compiling():
        if flat.is_cuda:
            flag = _error_flag(flat.device)
            if flag is not None and flag[0][0]:
                _raise_flagged(flat.device, flag[0])
        else:
            flag = _cpu_flag()
    if not flat.shape[0]:
        indices = flat.new_empty(0, dtype=torch.long)
    elif (
        (chosen == "cpu" or (chosen in _CUDA_ISA and (flag is not None or not check_finite)))
        and metric == "l2"
        and not (codebook.requires_grad and torch.is_grad_enabled())
    ):
        # the C++ / CUDA operator itself: one dispatcher call, indices and z_q (one kernel on CUDA)
        indices, z_q = torch.ops.seed_fast._codebook_lookup.default(
            flat, book, None if flag is None else flag[1], _CUDA_ISA.get(chosen, "auto")
        )
        if flag is not None and not flat.is_cuda and flag[0][0]:
            _raise_cpu_flagged(flag, flat, book)
        if z.dim() != 2:
            indices, z_q = indices.view(z.shape[:-1]), z_q.view(z.shape)
        return indices, z_q
    elif (
        chosen == "triton"
        and (flag is not None or not check_finite)
        and metric == "l2"
        and book.dtype == flat.dtype
        and not (codebook.requires_grad and torch.is_grad_enabled())
    ):
        indices, z_q = torch.ops.seed_fast._codebook_lookup_triton.default(
            flat, book, None if flag is None else flag[1]
        )
        if flag is not None and not flat.is_cuda and flag[0][0]:
            _raise_cpu_flagged(flag, flat, book)
        if z.dim() != 2:
            indices, z_q = indices.view(z.shape[:-1]), z_q.view(z.shape)
        return indices, z_q
    else:
        if check_finite and flag is None and flat.is_cuda and torch.cuda.is_current_stream_capturing():
            check_finite = False  # a CUDA graph capture cannot sync to read the result
        indices = torch.ops.seed_fast.codebook_lookup_indices.default(
            flat, book, chosen, check_finite, None if flag is None else flag[1]
        )
        if flag is not None and not flat.is_cuda and flag[0][0]:
            _raise_cpu_flagged(flag, flat, book)
    indices = indices.view(z.shape[:-1]) if z.dim() != 2 else indices
    return indices, torch.embedding(codebook, indices)  # F.embedding's kernel, without its Python


_cpu_flags: list = []


def _raise_cpu_flagged(flag, flat: torch.Tensor, book: torch.Tensor) -> None:
    flag[0][0] = 0
    _raise_non_finite(flat, book)


def _raise_non_finite(flat: torch.Tensor, book: torch.Tensor) -> None:
    _check_finite(flat, book)  # names the input and counts; else the distances overflowed
    raise ValueError(_SCALE_ERRORS["overflow"])


def _cpu_flag():
    """The CPU counterpart of a device's flag (backends other than the C++ kernel; read after the call)."""
    if not _cpu_flags:
        host = torch.zeros(1, dtype=torch.int32)
        _cpu_flags.append((host.numpy(), host, host))
    return _cpu_flags[0]


# --------------------------------------------------------------------------------------- VQ step
def vector_quantize_ref(
    z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SEED's quantization step in plain torch (the specification).

    Returns (z_st, indices, loss): z_st = z + sg[z_q - z] (straight-through), and the released
    "legacy" loss mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2).
    """
    _check_vq_inputs(z, beta)
    indices, z_q = codebook_lookup_ref(z, codebook)
    loss = F.mse_loss(z, z_q.detach()) + beta * F.mse_loss(z_q, z.detach())
    z_st = z + (z_q - z).detach()
    return z_st, indices, loss


class _VectorQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, codebook, beta, impl):
        indices, z_q = codebook_lookup(z, codebook, impl=impl)
        acc = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
        diff = z_q.to(acc) - z.to(acc)  # (..., D) in fp32 (fp64 for fp64 inputs)
        loss = ((1.0 + beta) * diff.square().mean()).to(z.dtype)  # both legacy terms share one value
        z_st = z + (z_q - z)
        ctx.save_for_backward(indices, diff)
        ctx.beta, ctx.k, ctx.dtypes = beta, codebook.shape[0], (z.dtype, codebook.dtype)
        ctx.mark_non_differentiable(indices)
        return z_st, indices, loss

    @staticmethod
    def backward(ctx, g_zst, g_idx, g_loss):
        indices, diff = ctx.saved_tensors
        z_dtype, c_dtype = ctx.dtypes
        scale = 2.0 * g_loss.to(diff.dtype) / diff.numel()
        grad_z = grad_cb = None
        if ctx.needs_input_grad[0]:
            grad_z = -scale * diff
            if g_zst is not None:
                grad_z = grad_z + g_zst.to(diff.dtype)
            grad_z = grad_z.to(z_dtype)
        if ctx.needs_input_grad[1]:
            d = diff.shape[-1]
            grad_cb = torch.zeros(ctx.k, d, dtype=diff.dtype, device=diff.device)
            grad_cb.index_add_(0, indices.reshape(-1), (ctx.beta * scale) * diff.reshape(-1, d))
            grad_cb = grad_cb.to(c_dtype)
        return grad_z, grad_cb, None, None


def vector_quantize(
    z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SEED's quantization step: fused lookup, straight-through output and legacy VQ loss in one
    autograd node (forward and backward equal `vector_quantize_ref`)."""
    _check_vq_inputs(z, beta)
    return _VectorQuantize.apply(z, codebook, float(beta), impl)


def _check_vq_inputs(z: torch.Tensor, beta: float) -> None:
    # the loss is a mean over z's elements: an empty batch has none, and would give NaN
    if isinstance(z, torch.Tensor) and z.numel() == 0:
        raise ValueError(
            f"vector_quantize: z holds no vectors (shape {tuple(z.shape)}); the loss of an empty batch is undefined"
        )
    if not 0.0 <= float(beta) < float("inf"):
        raise ValueError(f"vector_quantize: beta must be a finite number >= 0, got {beta}")


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"codebook_lookup: metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(z, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise TypeError("codebook_lookup: z and codebook must be tensors")
    if codebook.dim() != 2:
        raise ValueError(f"codebook_lookup: codebook must be (K, D), got shape {tuple(codebook.shape)}")
    if z.dim() < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"codebook_lookup: z's last dim must equal the code dim {codebook.shape[1]}, got shape {tuple(z.shape)}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("codebook_lookup: the codebook is empty (K = 0)")
    if codebook.shape[0] > _INT32_MAX - 64:
        raise ValueError(f"codebook_lookup: K = {codebook.shape[0]} codes is above the int32 index range")
    for name, t in (("z", z), ("codebook", codebook)):
        if not t.is_floating_point():
            raise TypeError(f"codebook_lookup: {name} must be floating point, got {t.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"codebook_lookup: z is on {z.device} but codebook on {codebook.device}")
