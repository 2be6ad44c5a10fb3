"""LoRA linear layers: y = x W^T + b + scaling * (dropout(x) A^T) B^T, as peft's LoRA Linear computes.

Shapes follow peft: x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in),
lora_B (out, r). The base weight and bias are frozen in LoRA training; gradients flow to x, A, B
(and to W / b too if they require grad).

`lora_linear_ref` is the specification (plain torch, fp32 accumulation, output in x's dtype).
Dropout: peft applies nn.Dropout to x on the LoRA branch only. Here the mask is a pure function of
(seed, row, column) — `lora_dropout_mask` — so the Triton kernels regenerate it wherever needed
(forward, dx, dA) instead of storing an (N, in) mask, and the reference reproduces it exactly.

Backends behind `lora_linear(impl=...)`:
  "triton"  kernels/lora_linear.py: the low-rank product rides in the base matmul's pass (x is read
            once for both, the LoRA term is added in the epilogue, no extra output round trip);
            backward dx uses the same kernel on transposed operands, dA a split-M reduction kernel,
            dB one matmul. CUDA tensors, or CPU under TRITON_INTERPRET=1 (testing).
  "torch"   addmm chain (base product, then the rank-r update added in place): no (N, out)
            temporary for the LoRA term; the CPU path.
  "lowrank" the same chain of vendor GEMMs, with the parts that need the dropout mask in Triton
            kernels that compute it in-kernel and read their big operand once: t = drop(x) A^T
            (one pass over x), dx += s drop(u A) in place, dA = s u^T drop(x) (split-row reduction).
  "ref"     the specification.
`lora_linear_multi` serves a batch whose rows use different adapters (stacked A / B).
"""

from __future__ import annotations

import numbers

import torch

from . import dispatch as _table
from . import dispatch_log as _dispatch
from ._triton_support import triton_reasons

IMPLS = ("auto", "ref", "torch", "lowrank", "triton")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_RANK = 128
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------- dropout mask
def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 a in [0, 2^32) without int64 overflow (16-bit halves)."""
    lo, hi = a & 0xFFFF, a >> 16
    return (lo * c + ((hi * c) & 0xFFFF) * 65536) & _M32


def _hash32(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """murmur3's 32-bit finalizer of (idx * golden + seed): a counter-based generator the Triton
    kernels compute bit for bit (kernels/lora_linear.py `_keep`)."""
    h = (_mul32(idx & _M32, 0x9E3779B1) + (seed & _M32)) & _M32
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """An element is kept when its 32-bit hash >= this (so P(keep) = 1 - p up to 2^-32)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return min(int(round(p * 2**32)), _M32)


def _signed32(c: int) -> int:
    """The int32 with the same 32 bits as the unsigned value c."""
    c &= _M32
    return c - 2**32 if c >= 2**31 else c


def _seed_i32(seed: torch.Tensor) -> torch.Tensor:
    """A one-element integer seed tensor as the int32 with the same low 32 bits (on its device)."""
    s = seed.reshape(1).to(torch.int64) & _M32
    return torch.where(s >= 2**31, s - 2**32, s).to(torch.int32)


def _hash32_i32(idx: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """`_hash32` on int32 tensors: the same 32 bits, a quarter of the memory traffic and half the
    kernels. Multiplication wraps modulo 2^32 in two's complement; right shifts are made logical
    by masking off the sign-extended bits. seed: an int, or a one-element integer tensor on idx's
    device (read on the device: a CUDA graph replay then uses the value the tensor holds)."""
    add = _seed_i32(seed) if isinstance(seed, torch.Tensor) else _signed32(seed)
    h = idx.mul(_signed32(0x9E3779B1)).add_(add)
    h.bitwise_xor_((h >> 16) & 0xFFFF)
    h.mul_(_signed32(0x85EBCA6B))
    h.bitwise_xor_((h >> 13) & 0x7FFFF)
    h.mul_(_signed32(0xC2B2AE35))
    return h.bitwise_xor_((h >> 16) & 0xFFFF)


def lora_dropout_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """(rows, cols) bool keep-mask of the LoRA dropout for `seed`: element (i, j) is kept when
    hash32(i * cols + j, seed) >= p * 2^32. Needs rows * cols < 2^32. seed: an int, or a
    one-element integer tensor (its low 32 bits count, as an int's do)."""
    if rows * cols >= 2**32:
        raise ValueError(f"lora dropout: {rows} x {cols} elements exceed the 2^32 counter range")
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    if rows * cols < 2**31:
        idx = idx.to(torch.int32)
    else:  # counters from 2^31 up: the int32 with the same low 32 bits
        idx = torch.where(idx >= 2**31, idx - 2**32, idx).to(torch.int32)
    h = _hash32_i32(idx, seed)
    # unsigned h >= t  <=>  signed (h ^ 2^31) >= signed (t ^ 2^31)
    return (h.bitwise_xor_(-(2**31)) >= dropout_threshold(p) - 2**31).reshape(rows, cols)


# --------------------------------------------------------------------------------------- reference
def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """x W^T + b + scaling * (dropout(x) A^T) B^T, fp32 accumulation (fp64 for fp64 inputs).

    x (..., in); weight (out, in); bias (out,) or None; lora_A (r, in); lora_B (out, r).
    dropout_p > 0 needs `seed`: the kept elements are `lora_dropout_mask(seed, N, in, p)` over the
    flattened rows, scaled by 1 / (1 - p). Returns (..., out) in x's dtype.
    """
    _check(x, weight, bias, lora_A, lora_B, dropout_p, seed, scaling)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(-1, x.shape[-1]).to(acc)
    y = flat @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    xd = flat
    if dropout_p > 0:
        keep = lora_dropout_mask(seed, flat.shape[0], flat.shape[1], dropout_p, device=x.device)
        xd = flat * keep / (1.0 - dropout_p)
    y = y + scaling * ((xd @ lora_A.to(acc).t()) @ lora_B.to(acc).t())
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------- torch path
class _LoraTorch(torch.autograd.Function):
    """addmm chain; saves only x (and t = dropout(x) A^T, r columns) for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        flat = x.reshape(-1, x.shape[-1])
        xd = flat
        if dropout_p > 0:
            keep = lora_dropout_mask(seed, flat.shape[0], flat.shape[1], dropout_p, device=x.device)
            xd = flat * keep.to(flat.dtype) * (1.0 / (1.0 - dropout_p))
        t = xd @ lora_A.t()  # (N, r)
        y = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
        y.addmm_(t, lora_B.t(), alpha=scaling)  # rank-r update in place: no (N, out) temporary
        ctx.save_for_backward(flat, weight, lora_A, lora_B, t)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.has_bias = scaling, dropout_p, seed, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        flat, weight, lora_A, lora_B, t = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        g = gy.reshape(-1, gy.shape[-1])
        u = (g @ lora_B) * s  # (N, r)
        gx = gw = gb = ga = gbb = None
        keep = None
        if p > 0 and (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
            keep = lora_dropout_mask(ctx.seed, flat.shape[0], flat.shape[1], p, device=flat.device)
            keep = keep.to(flat.dtype) * (1.0 / (1.0 - p))
        if ctx.needs_input_grad[0]:
            lora_in = u @ lora_A  # (N, in)
            gx = torch.addmm(lora_in * keep, g, weight) if keep is not None else lora_in.addmm_(g, weight)
            gx = gx.reshape(*gy.shape[:-1], flat.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = g.t() @ flat
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        if ctx.needs_input_grad[3]:
            xd = flat * keep if keep is not None else flat
            ga = u.t() @ xd
        if ctx.needs_input_grad[4]:
            gbb = (g.t() @ t) * s
        return gx, gw, gb, ga, gbb, None, None, None


# --------------------------------------------------------------------------------------- Triton path
def _keep_args(dropout_p: float) -> tuple[int, float]:
    return (dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)) if dropout_p > 0 else (0, 1.0)


# The Triton kernels are registered directly (`Library.define` + `impl`: a few microseconds per call
# against 10-20 for `torch.library.custom_op`) with fake impls; autograd is an autograd.Function.
_lib = torch.library.Library("seed_fast", "FRAGMENT")


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward on 2-D x (N, in): (y (N, out), t = dropout(x) A^T (N, r) fp32, kept for the backward)."""
    from ..kernels.lora_linear import lora_mm

    thresh, inv_keep = _keep_args(dropout_p)
    return lora_mm(
        x,
        (weight, weight.stride(0), weight.stride(1)),
        (lora_A, lora_A.stride(0), lora_A.stride(1)),
        (lora_B, lora_B.stride(0), lora_B.stride(1)),
        bias,
        weight.shape[0],
        lora_A.shape[0],
        scaling,
        seed=seed,
        thresh=thresh,
        inv_keep=inv_keep,
        drop_in=dropout_p > 0,
        drop_out=False,
        store_t=True,
        out_dtype=x.dtype,
    )


def lora_linear_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    t: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dx (N, in), dA (r, in), dB (out, r)) for 2-D x and grad_y (N, out).

    dx = dy W + s * drop(dy B A) is the forward kernel on transposed operands (it also returns
    u = dy B); dA = s * u^T drop(x) is a split-row reduction; dB = s * dy^T t is one matmul."""
    from ..kernels.lora_linear import lora_da, lora_mm

    thresh, inv_keep = _keep_args(dropout_p)
    drop = dropout_p > 0
    g = grad_y.contiguous()
    # operand triples (tensor, stride over the kernel's output dim, stride over its reduction dim)
    gx, u = lora_mm(
        g,
        (weight, weight.stride(1), weight.stride(0)),
        (lora_B, lora_B.stride(1), lora_B.stride(0)),
        (lora_A, lora_A.stride(1), lora_A.stride(0)),
        None,
        weight.shape[1],
        lora_A.shape[0],
        scaling,
        seed=seed,
        thresh=thresh,
        inv_keep=inv_keep,
        drop_in=False,
        drop_out=drop,
        store_t=True,
        out_dtype=x.dtype,
    )
    ga = lora_da(u, x, seed=seed, thresh=thresh, drop=drop) * (scaling * inv_keep)
    gb = (g.t() @ t.to(g.dtype)) * scaling  # (out, r)
    return gx, ga.to(lora_A.dtype), gb.to(lora_B.dtype)


def _lora_op_pair(name: str, fwd, bwd, t_dtype: torch.dtype | None) -> type:
    """Registers `seed_fast::{name}_fwd` / `_bwd` (CUDA, and CPU for the Triton interpreter) with fake
    impls, and returns the autograd.Function over them: the forward returns y and the low-rank
    activation t (fp32 when t_dtype says so, else x's dtype), which the backward reuses; the base
    weight's and bias's gradients only when they are trained."""
    _lib.define(
        f"{name}_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, int seed) -> (Tensor, Tensor)"
    )
    _lib.define(
        f"{name}_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor t, "
        "float scaling, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)"
    )
    for key in ("CUDA", "CPU"):  # CPU: the Triton interpreter (TRITON_INTERPRET=1), for testing
        _lib.impl(f"{name}_fwd", fwd, key)
        _lib.impl(f"{name}_bwd", bwd, key)

    @torch.library.register_fake(f"seed_fast::{name}_fwd", lib=_lib)
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        t = x.new_empty(x.shape[0], lora_A.shape[0], dtype=t_dtype or x.dtype)
        return x.new_empty(x.shape[0], weight.shape[0]), t

    @torch.library.register_fake(f"seed_fast::{name}_bwd", lib=_lib)
    def _(grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed):
        return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B)

    fwd_op, bwd_op = getattr(torch.ops.seed_fast, f"{name}_fwd"), getattr(torch.ops.seed_fast, f"{name}_bwd")

    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        y, t = fwd_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.has_bias = scaling, dropout_p, seed, bias is not None
        ctx.set_materialize_grads(False)
        return y

    def backward(ctx, grad_y):
        if grad_y is None:
            return (None,) * 8
        x, weight, lora_A, lora_B, t = ctx.saved_tensors
        gx, ga, gb = bwd_op(grad_y, x, weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout_p, ctx.seed)
        gw = grad_y.t() @ x if ctx.needs_input_grad[1] else None
        gbias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gbias, ga, gb, None, None, None

    cls = f"_{''.join(w.title() for w in name.split('_'))}"
    body = {"forward": staticmethod(forward), "backward": staticmethod(backward), "__qualname__": cls}
    return type(cls, (torch.autograd.Function,), body)


_LoraTriton = _lora_op_pair("lora_linear", lora_linear_fwd, lora_linear_bwd, torch.float32)


# --------------------------------------------------------------------------------------- vendor GEMMs + Triton low-rank
def lora_lowrank_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """2-D x (N, in): (y (N, out), t = drop(x) A^T (N, r) in x's dtype). The base product and the
    rank-r update (added in place) are the vendor's GEMMs; under dropout, t comes from one Triton pass
    over x with the mask computed in the kernel (no (N, in) mask or dropped copy of x)."""
    if dropout_p > 0:
        from ..kernels.lora_linear import lora_shrink

        thresh, inv_keep = _keep_args(dropout_p)
        t = lora_shrink(x, lora_A, seed=seed, thresh=thresh, inv_keep=inv_keep)
    else:
        t = x @ lora_A.t()
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y.addmm_(t, lora_B.t(), alpha=scaling)
    return y, t


def lora_lowrank_bwd(grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed):
    """(dx, dA, dB): dx = dy W (vendor) + s drop(u A) added in place by a Triton kernel under dropout
    (u = dy B); dA = s u^T drop(x) by a Triton split-row reduction under dropout; dB = s dy^T t."""
    g = grad_y.contiguous()
    u = g @ lora_B  # (N, r)
    gx = g @ weight
    if dropout_p > 0:
        from ..kernels.lora_linear import lora_da, lora_expand_masked_add_

        thresh, inv_keep = _keep_args(dropout_p)
        lora_expand_masked_add_(gx, u, lora_A, scaling * inv_keep, seed=seed, thresh=thresh)
        ga = lora_da(u.float(), x, seed=seed, thresh=thresh, drop=True) * (scaling * inv_keep)
    else:
        gx.addmm_(u, lora_A, alpha=scaling)
        ga = (u.t() @ x) * scaling
    gb = (g.t() @ t) * scaling
    return gx, ga.to(lora_A.dtype), gb.to(lora_B.dtype)


_LoraLowRank = _lora_op_pair("lora_lowrank", lora_lowrank_fwd, lora_lowrank_bwd, None)


def lora_linear_lowrank(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int | None):
    flat = x.reshape(-1, x.shape[-1])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B))
    if grad:
        y = _LoraLowRank.apply(flat, weight, bias, lora_A, lora_B, scaling, dropout_p, seed or 0)
    else:
        y, _ = torch.ops.seed_fast.lora_lowrank_fwd(flat, weight, bias, lora_A, lora_B, scaling, dropout_p, seed or 0)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int | None):
    flat = x.reshape(-1, x.shape[-1])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B))
    if grad:
        y = _LoraTriton.apply(flat, weight, bias, lora_A, lora_B, scaling, dropout_p, seed or 0)
    else:
        y, _ = torch.ops.seed_fast.lora_linear_fwd(flat, weight, bias, lora_A, lora_B, scaling, dropout_p, seed or 0)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------- dispatch


def not_supported_reasons(impl: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> list[str]:
    """Why backend `impl` cannot run these inputs; empty when it can."""
    if impl in ("ref", "torch"):
        return []
    if impl not in ("triton", "lowrank"):
        return [f"unknown impl {impl!r}; choose from {IMPLS}"]
    reasons = []
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype} not in float32/float16/bfloat16")
    if lora_A.shape[0] > _MAX_RANK:
        reasons.append(f"rank {lora_A.shape[0]} above {_MAX_RANK}")
    return reasons + triton_reasons(x.device, {x.dtype})


def choose_impl(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, impl: str = "auto") -> str:
    if impl not in IMPLS:
        raise ValueError(f"lora_linear: unknown impl {impl!r}; choose from {IMPLS}")
    if impl != "auto":
        reasons = not_supported_reasons(impl, x, weight, lora_A)
        if reasons:
            raise RuntimeError(f"lora_linear: impl={impl!r} cannot run these inputs: " + "; ".join(reasons))
        return impl
    if x.dtype == torch.float64:
        return "ref"
    grad = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or weight.requires_grad)
    case = (("dtype", _table.dtype_name(x.dtype)), ("mode", "fwd+bwd" if grad else "fwd"))
    tokens = x.numel() // max(1, x.shape[-1])
    chosen = _table.choose("lora_linear", x.device, case, tokens, "torch")
    if chosen != "torch" and not_supported_reasons(chosen, x, weight, lora_A):
        return "torch"
    return chosen


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    seed: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear; same contract as `lora_linear_ref`.

    impl: "auto" (the backend measured fastest for the dtype, mode and token count on this class
    of device, seed_fast/ops/dispatch.py; unmeasured: the addmm chain "torch", cuBLAS on a GPU;
    the reference for fp64), "ref", "torch", "lowrank", "triton".
    dropout_p > 0 without a seed draws one from torch's generator (so torch.manual_seed makes runs
    repeatable); under CUDA graph capture it is drawn on the device, so each replay drops different
    elements. seed may be an int or a one-element integer tensor on x's device.
    """
    if dropout_p > 0 and seed is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # drawn on the device, inside the graph: every replay draws a new seed (a host int would
            # be frozen into the graph, and every replay would drop the same elements)
            seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
        else:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    amp = _autocast_dtype(x)
    if (
        amp is not None
    ):  # as torch.nn.Linear under autocast: compute in the autocast dtype (grads reach the fp32 weights)
        x, weight, bias, lora_A, lora_B = _cast(amp, x, weight, bias, lora_A, lora_B)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, seed=seed, impl=impl)
    _check(x, weight, bias, lora_A, lora_B, dropout_p, seed, scaling)
    chosen = choose_impl(x, weight, lora_A, impl)
    if isinstance(seed, torch.Tensor) and dropout_p > 0 and chosen in ("triton", "lowrank"):
        if impl == chosen:
            raise TypeError(
                f"lora_linear: impl={impl!r} takes the dropout seed as a Python int; a tensor seed (as drawn "
                "under CUDA graph capture) runs with impl='auto' or 'torch'"
            )
        chosen = "torch"  # the same mask, computed from the seed tensor on the device
    if _dispatch._logs:
        _dispatch.note("lora_linear", chosen)
    scaling = float(scaling)
    if chosen == "ref":
        return lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, seed=seed)
    if chosen == "torch":
        return _LoraTorch.apply(x, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed)
    if chosen == "lowrank":
        return lora_linear_lowrank(x, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed)
    return lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on for x's device (and x is a float tensor), else None."""
    dev = x.device.type
    if not x.is_floating_point() or dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _cast(dtype: torch.dtype, *tensors):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _check(x, weight, bias, lora_A, lora_B, dropout_p, seed, scaling) -> None:
    if isinstance(scaling, torch.Tensor) or not -float("inf") < float(scaling) < float("inf"):
        raise ValueError(f"lora_linear: scaling must be a finite Python number, got {scaling}")
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a tensor")
        if not t.is_floating_point():
            raise TypeError(f"lora_linear: {name} must be floating point, got {t.dtype}")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"lora_linear: weight (out, in), lora_A (r, in), lora_B (out, r) must be 2-D, got "
            f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"lora_linear: x's last dim must be in_features={in_f}, got shape {tuple(x.shape)}")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_linear: lora_A must be (r, in_features={in_f}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(
            f"lora_linear: lora_B must be (out_features, r) = ({out_f}, {r}) to match weight and lora_A, "
            f"got {tuple(lora_B.shape)}"
        )
    if r < 1:
        raise ValueError("lora_linear: rank must be >= 1")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"lora_linear: bias must be (out_features,) = ({out_f},), got {tuple(bias.shape)}")
    dts = {t.dtype for t in (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())}
    if len(dts) != 1:
        raise TypeError(f"lora_linear: x, weight, bias, lora_A, lora_B must share a dtype, got {sorted(map(str, dts))}")
    devs = {t.device for t in (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"lora_linear: tensors are on different devices: {sorted(map(str, devs))}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and seed is None:
        raise ValueError("lora_linear_ref: dropout_p > 0 needs a seed (the mask is a function of it)")
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise TypeError(
                f"lora_linear: a tensor seed must hold one integer, got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        if seed.device != x.device:
            raise ValueError(f"lora_linear: the seed tensor is on {seed.device}, x on {x.device}")
    elif seed is not None and not isinstance(seed, numbers.Integral):
        raise TypeError(f"lora_linear: seed must be an int or a one-element integer tensor, got {type(seed).__name__}")


# --------------------------------------------------------------------------------------- multi-adapter
def _check_multi(x, weight, bias, A_stack, B_stack, adapter_ids, scalings, check_ids=True) -> torch.Tensor:
    if A_stack.dim() != 3 or B_stack.dim() != 3:
        raise ValueError(
            f"lora_linear_multi: A_stack (n, r, in) and B_stack (n, out, r) must be 3-D, got "
            f"{tuple(A_stack.shape)}, {tuple(B_stack.shape)}"
        )
    n, r, _ = A_stack.shape
    if weight.dim() == 2 and tuple(B_stack.shape) != (n, weight.shape[0], r):
        raise ValueError(
            f"lora_linear_multi: B_stack must be (n_adapters, out, r) = ({n}, {weight.shape[0]}, {r}), "
            f"got {tuple(B_stack.shape)}"
        )
    _check(x, weight, bias, A_stack[0], B_stack[0], 0.0, None, 1.0)
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("lora_linear_multi: adapter_ids must be an int32 / int64 tensor")
    if adapter_ids.dim() != 1 or x.dim() < 2 or adapter_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"lora_linear_multi: adapter_ids must be (B,) for x (B, ..., in), got {tuple(adapter_ids.shape)} "
            f"and {tuple(x.shape)}"
        )
    on_device = isinstance(scalings, torch.Tensor) and scalings.device.type != "cpu"
    s = torch.as_tensor(scalings, dtype=torch.float32, device=x.device).reshape(-1)
    if s.numel() != n:
        raise ValueError(f"lora_linear_multi: need one scaling per adapter ({n}), got {s.numel()}")
    if not on_device:  # Python numbers or a CPU tensor: checked without touching the device
        _check_scalings_finite(torch.as_tensor(scalings, dtype=torch.float32).reshape(-1))
    if check_ids and adapter_ids.numel():
        # one host sync for both bounds (and, for scalings on the device, their finiteness)
        checks = list(torch.aminmax(adapter_ids))
        if on_device:
            checks.append(torch.isfinite(s).all().to(adapter_ids.dtype))
        got = torch.stack(checks).tolist()
        lo, hi = got[:2]
        if lo < -1 or hi >= n:
            raise ValueError(
                f"lora_linear_multi: adapter ids must lie in [-1, {n}) (-1 = base model only), got min {lo}, max {hi}"
            )
        if on_device and not got[2]:
            _check_scalings_finite(s.cpu())
    return s


def _check_scalings_finite(s: torch.Tensor) -> None:
    bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"lora_linear_multi: scalings must be finite, got {s[bad[0]].item()} for adapter {bad[0]}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        )


def lora_linear_multi_ref(x, weight, bias, A_stack, B_stack, adapter_ids, scalings) -> torch.Tensor:
    """Each batch element b uses adapter adapter_ids[b] (-1: none): row-by-row lora_linear_ref.

    x (B, ..., in); A_stack (n, r, in); B_stack (n, out, r); adapter_ids (B,) int; scalings (n,).
    Adapters of different ranks go in one stack zero-padded to the largest rank.
    """
    s = _check_multi(x, weight, bias, A_stack, B_stack, adapter_ids, scalings)
    outs = []
    for b in range(x.shape[0]):
        i = int(adapter_ids[b])
        if i < 0:
            outs.append(lora_linear_ref(x[b], weight, bias, A_stack[0], B_stack[0], 0.0))
        else:
            outs.append(lora_linear_ref(x[b], weight, bias, A_stack[i], B_stack[i], float(s[i])))
    return torch.stack(outs) if outs else x.new_empty(*x.shape[:-1], weight.shape[0])


_lib.define(
    "lora_multi_update_(Tensor(a!) y, Tensor x, Tensor A_stack, Tensor B_stack, Tensor adapter_ids, "
    "Tensor scalings) -> ()"
)


def _lora_multi_update_(y, x, A_stack, B_stack, adapter_ids, scalings):
    from ..kernels.lora_linear import lora_multi_update_

    lora_multi_update_(y, x, A_stack, B_stack, adapter_ids, scalings)


for _key in ("CUDA", "CPU"):  # CPU: the Triton interpreter (TRITON_INTERPRET=1), for testing
    _lib.impl("lora_multi_update_", _lora_multi_update_, _key)


@torch.library.register_fake("seed_fast::lora_multi_update_", lib=_lib)
def _(y, x, A_stack, B_stack, adapter_ids, scalings):
    return None


MULTI_IMPLS = ("auto", "torch", "triton", "ref")


def lora_linear_multi(
    x, weight, bias, A_stack, B_stack, adapter_ids, scalings, *, impl: str = "auto", check_ids: bool = True
) -> torch.Tensor:
    """Mixed-adapter batch (serving): base product once, then every row's rank-r update.

    impl: "torch": batched matmuls on gathered adapters ((B, r, in) and (B, out, r)), no loop over
    adapters; "triton": two kernels in which each row reads its adapter id (-1 = base only) and the
    adapter's weights straight from the stacks (no gathered copies, no sync; forward only, gradients
    take "torch"); "auto": "torch" until a GPU run of benchmarks/bench_lora_linear.py measures
    otherwise; "ref". Same contract as `lora_linear_multi_ref`.
    scalings: a sequence of floats or a float32 tensor on x's device (no copy per call); NaN / inf
    raise ValueError (for a tensor on the GPU, in the check_ids sync).
    check_ids: raise on ids outside [-1, n) (and non-finite scalings on the device); one host sync
    on a GPU. False skips it for callers whose ids are in range by construction (an out-of-range
    id then fails inside the gather, or reads outside the stacks in the Triton kernels).
    """
    if impl not in MULTI_IMPLS:
        raise ValueError(f"lora_linear_multi: unknown impl {impl!r}; choose from {MULTI_IMPLS}")
    amp = _autocast_dtype(x)
    if amp is not None:
        x, weight, bias, A_stack, B_stack = _cast(amp, x, weight, bias, A_stack, B_stack)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear_multi(
                x, weight, bias, A_stack, B_stack, adapter_ids, scalings, impl=impl, check_ids=check_ids
            )
    if impl == "ref":
        return lora_linear_multi_ref(x, weight, bias, A_stack, B_stack, adapter_ids, scalings)
    s = _check_multi(x, weight, bias, A_stack, B_stack, adapter_ids, scalings, check_ids)
    if impl == "triton":
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, A_stack, B_stack)
        )
        reasons = not_supported_reasons("triton", x, weight, A_stack[0]) + (
            ["gradients are wanted (the Triton path is forward only)"] if grad else []
        )
        if reasons:
            raise RuntimeError("lora_linear_multi: impl='triton' cannot run these inputs: " + "; ".join(reasons))
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()  # (B, S, in)
        y = torch.nn.functional.linear(flat, weight, bias)  # (B, S, out), contiguous
        torch.ops.seed_fast.lora_multi_update_(
            y, flat, A_stack.contiguous(), B_stack.contiguous(), adapter_ids.contiguous(), s
        )
        return y.reshape(*x.shape[:-1], weight.shape[0])
    ids = adapter_ids.to(torch.int64)
    active = ids >= 0
    idx = ids.clamp_min(0)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, S, in)
    y = torch.nn.functional.linear(flat, weight, bias)  # (B, S, out)
    t = torch.bmm(flat, A_stack[idx].transpose(1, 2))  # (B, S, r)
    scale = torch.where(active, s[idx], torch.zeros((), device=x.device)).to(x.dtype)  # (B,)
    y.baddbmm_(t * scale[:, None, None], B_stack[idx].transpose(1, 2))  # += s_b t_b B_b^T, in place
    return y.reshape(*x.shape[:-1], weight.shape[0])
