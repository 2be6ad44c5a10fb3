"""Nearest-code search for vector quantizers, and SEED's vector-quantization step.

`codebook_lookup_ref` is the specification: plain torch, exact squared distances
sum((z - e)^2) accumulated in fp32 (fp64 for fp64 inputs) whatever the input dtype, processed in
chunks so that the N x K distance matrix is never held at once, ties to the lowest index.

The fused backends ("cpu": C++ in csrc/codebook_lookup, "triton": kernels/codebook_lookup.py,
"cuda": csrc/codebook_lookup/*.cu) score codes by 0.5 ||e||^2 - z.e in fp32, never materialize
N x K, and keep the running (min, argmin). "torch" scores the same way with the vendor's fp32
matrix product (cuBLAS / the CPU BLAS) over row chunks, then argmin: the stock path, with TF32 off.
"auto" takes the backend measured fastest for the dtype and row count on this class of device
(seed_fast/ops/dispatch.py); unmeasured, "cpu" on the CPU and "torch" on a GPU.
The C++ and CUDA kernels are the operator `torch.ops.seed_fast._codebook_lookup_indices(z, codebook)`
(kernel picked by device); every backend is reachable as
`torch.ops.seed_fast.codebook_lookup_indices(z, codebook, impl)`. Both have fake impls, so
torch.compile(fullgraph=True) and torch.export see one opaque node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from . import dispatch as _table
from . import dispatch_log as _dispatch
from ._triton_support import triton_reasons

IMPLS = ("auto", "ref", "torch", "cpu", "triton", "cuda")
METRICS = ("l2", "cosine")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
        indices[start : start + rows] = squared_distances(chunk, book).argmin(
            dim=-1
        )  # (rows, K) -> (rows,)  # first minimum = lowest index
    return indices


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
# The C++ / CUDA kernels are the operator `seed_fast::_codebook_lookup_indices` (csrc/, registered
# with TORCH_LIBRARY, a Meta kernel for fake tensors). The other backends share the operator below,
# registered directly (`Library.define` + `impl`: a few microseconds per call, against 10-20 for
# `torch.library.custom_op`), so torch.compile(fullgraph=True) and torch.export see one node.
_lib = torch.library.Library("seed_fast", "FRAGMENT")
_lib.define("codebook_lookup_indices(Tensor z, Tensor codebook, str impl, bool check_finite=True) -> Tensor")


def codebook_lookup_indices(
    z: torch.Tensor, codebook: torch.Tensor, impl: str, check_finite: bool = True
) -> torch.Tensor:
    """(N, D) x (K, D) -> (N,) int64 nearest-code indices with the named backend (not "auto").

    check_finite: raise on NaN / inf. Free on the CPU kernel (it checks in-kernel); elsewhere one
    reduction and, on a GPU, one host sync, which False skips (then a NaN row gets an arbitrary
    index). An asynchronous device assertion would avoid the sync but leave the process's CUDA
    context unusable after one bad input, so it is not used."""
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    if impl == "cpu":  # the C++ kernel raises ValueError on NaN / inf, found on values it touches anyway
        _ext.require_cpu_ext()
        return torch.ops.seed_fast._codebook_lookup_indices(z, codebook)
    if check_finite:
        _check_finite(z, codebook)
    if impl == "ref":
        return _argmin_ref(z, codebook)
    if impl == "torch":
        return _argmin_torch(z, codebook)
    if impl == "cuda":
        _ext.require_cuda_ext()
        return torch.ops.seed_fast._codebook_lookup_indices(z, codebook)
    if impl == "triton":
        from ..kernels.codebook_lookup import codebook_argmin_triton

        return codebook_argmin_triton(z, codebook)
    raise ValueError(f"codebook_lookup_indices: unknown impl {impl!r}")


for _key in ("CPU", "CUDA"):
    _lib.impl("codebook_lookup_indices", codebook_lookup_indices, _key)


@torch.library.register_fake("seed_fast::codebook_lookup_indices", lib=_lib)
def _(z, codebook, impl, check_finite=True):
    return z.new_empty((z.shape[0],), dtype=torch.long)


def _check_finite(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if bool(torch.isfinite(z).all() & torch.isfinite(codebook).all()):  # one host sync
        return
    for name, t in (("z", z), ("codebook", codebook)):
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"codebook_lookup: {name} contains {bad} NaN/inf value(s)")


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
    elif impl == "cuda":
        if z.device.type != "cuda":
            reasons.append(f"tensors are on {z.device}, not a CUDA device")
        if _ext.cuda_ext() is None:
            reasons.append(f"CUDA extension not built: {_ext.cuda_ext_error()}")
    elif impl == "triton":
        reasons += triton_reasons(z.device, dtypes)
    else:
        reasons.append(f"unknown impl {impl!r}; choose from {IMPLS}")
    return reasons


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
    "cpu", "triton", "cuda".
    NaN / inf in z or the codebook raise ValueError. On a GPU that check costs a host sync;
    check_finite=False skips it (then a NaN row gets an arbitrary index). The CPU kernel always
    checks, in-kernel, at no cost.
    """
    _check_inputs(z, codebook, metric)
    flat, book = _prepare(z, codebook, metric)
    chosen = choose_impl(flat, book, impl)
    if _dispatch._logs:
        _dispatch.note("codebook_lookup", chosen)
    if chosen == "cpu" and flat.shape[0]:  # the C++ operator itself: one dispatcher call, checks in-kernel
        indices = torch.ops.seed_fast._codebook_lookup_indices.default(flat, book)
    else:
        if check_finite and flat.is_cuda and torch.cuda.is_current_stream_capturing():
            check_finite = False  # a CUDA graph capture cannot sync to read the result
        indices = torch.ops.seed_fast.codebook_lookup_indices.default(flat, book, chosen, check_finite)
    indices = indices.view(z.shape[:-1]) if z.dim() != 2 else indices
    return indices, torch.embedding(codebook, indices)  # F.embedding's kernel, without its Python


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
