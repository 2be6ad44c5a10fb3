"""Multi-head attention as the Q-Former, ViT and de-tokenizer use it.

`qformer_attention_ref` is the specification: plain torch, scores and softmax in fp32 (fp64 for fp64
inputs), output in the input dtype.

Backends behind `qformer_attention(impl=...)`:
  "triton"  kernels/qformer_attention.py: forward + backward for small Lq (the 32 queries), registered
            as the ops `seed_fast::qformer_attention_fwd` / `_bwd` (fake impls; autograd through an
            autograd.Function) so torch.compile(fullgraph=True) and torch.export see single nodes. CUDA tensors, or CPU
            tensors under TRITON_INTERPRET=1 (testing only).
  "sdpa"    torch's scaled_dot_product_attention with a boolean mask, fully masked rows zeroed,
            with torch's own choice of backend.
  "sdpa_efficient", "sdpa_cudnn", "sdpa_flash"
            the same call with one SDPA backend preferred (CUDA; math stays on as torch's fallback
            where that backend cannot run the inputs). torch's default on Hopper is cuDNN, which
            is half as fast as the memory-efficient kernel on the 32-query causal self-attention.
  "ref"     the specification above.
"auto" takes the backend measured fastest for the case (dtype, causal self- or cross-attention,
forward only or with backward, batch) on this class of device (seed_fast/ops/dispatch.py); where
the table has no measurement, "sdpa" (the reference for fp64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import dispatch as _table
from . import dispatch_log as _dispatch
from ._triton_support import triton_reasons

IMPLS = ("auto", "ref", "sdpa", "sdpa_efficient", "sdpa_cudnn", "sdpa_flash", "triton")
_SDPA_BACKENDS = ("sdpa_efficient", "sdpa_cudnn", "sdpa_flash")
_TABLE_MAX_LQ = 64  # the table measures SEED's 32 queries; longer query sets use the vendor default
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def qformer_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v.

    q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh); fp32 / fp16 / bf16 / fp64.
    causal: query i attends to keys 0..i (needs Lq == Lk; the 32-query self-attention).
    key_padding_mask: (B, Lk) bool, True = attend (keep), False = padding.
    Returns (B, H, Lq, Dh) in q's dtype. A query row with no key to attend gives zeros. NaN in
    the inputs gives NaN in the rows whose query or attended keys hold it, and (as in any product
    with v) in the columns of every row where v holds it.
    """
    _check_qkv(q, k, v, causal, key_padding_mask)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    keep = None
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(torch.bool)
        keep = pad if keep is None else keep & pad
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:  # a row with no key to attend gives zeros; NaN from NaN inputs stays NaN
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


# --------------------------------------------------------------------------------------- SDPA
def _empty_rows(key_padding_mask: torch.Tensor, lq: int, causal: bool) -> torch.Tensor:
    """(B, Lq) bool: rows with no key to attend."""
    keep = key_padding_mask.to(torch.bool)
    if causal:
        return ~(keep.cumsum(-1)[:, :lq] > 0)  # row i sees keys 0..i
    return ~keep.any(-1, keepdim=True).expand(-1, lq)


def qformer_attention_sdpa(
    q, k, v, *, causal=False, key_padding_mask=None, scale=None, backend: str | None = None
) -> torch.Tensor:
    """torch's scaled_dot_product_attention under the reference's contract (fully masked rows give
    zeros and zero gradients instead of NaN). backend: None (torch's choice) or one of
    "sdpa_efficient", "sdpa_cudnn", "sdpa_flash" to prefer that kernel on CUDA."""
    _check_qkv(q, k, v, causal, key_padding_mask)
    with _prefer_sdpa_backend(backend if q.is_cuda else None):
        return _sdpa(q, k, v, causal, key_padding_mask, scale)


def _sdpa(q, k, v, causal, key_padding_mask, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if key_padding_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        return _with_inputs_nan(out, q, k, v, causal, None, None) if not q.is_cuda else out
    lq, lk = q.shape[-2], k.shape[-2]
    keep = key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        keep = keep & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    empty = _empty_rows(key_padding_mask, lq, causal)[:, None, :, None]  # (B, 1, Lq, 1)
    keep = keep | empty  # let empty rows attend to everything (finite), then zero them below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    out = out.masked_fill(empty, 0.0)
    return _with_inputs_nan(out, q, k, v, causal, key_padding_mask, empty) if not q.is_cuda else out


def _with_inputs_nan(out, q, k, v, causal, key_padding_mask, empty):
    """torch's CPU SDPA kernel gives zeros for a query row whose scores are NaN, where the reference
    (and SDPA's math backend) give NaN. Add 0 x (the row's query and the keys it attends to, plus
    every value per column, as the reference's probs @ v multiplies even masked values by 0) so NaN /
    inf in the inputs reach exactly the elements the reference makes NaN: a few reductions, no
    gradient (the added term is zero where the inputs are finite)."""
    with torch.no_grad():
        row = q.sum(-1, keepdim=True)  # (B, H, Lq, 1)
        ks = k.sum(-1, keepdim=True)  # (B, H, Lk, 1): a NaN key the row attends to makes it NaN
        if key_padding_mask is not None:
            ks = ks.masked_fill(~key_padding_mask.to(torch.bool)[:, None, :, None], 0.0)
            row = row.masked_fill(empty, 0.0)  # no key to attend: the reference gives zeros
        ks = ks.cumsum(-2)[..., : q.shape[-2], :] if causal else ks.sum(-2, keepdim=True)
        term = row + ks + v.sum(-2, keepdim=True)
    return torch.add(out, term, alpha=0)  # out + 0 * term: NaN where term is NaN / inf


class _prefer_sdpa_backend:
    """Enable one SDPA backend (plus math as the fallback) for the calls inside, then restore the
    flags. Uses torch's global switches directly (well under a microsecond, against ~10 for
    `torch.nn.attention.sdpa_kernel`); another thread calling SDPA meanwhile may see the same
    preference, which changes its speed, never its result. A no-op under torch.compile."""

    _SETTERS = (
        ("sdpa_flash", torch._C._get_flash_sdp_enabled, torch._C._set_sdp_use_flash),
        ("sdpa_efficient", torch._C._get_mem_efficient_sdp_enabled, torch._C._set_sdp_use_mem_efficient),
        ("sdpa_cudnn", torch._C._get_cudnn_sdp_enabled, torch._C._set_sdp_use_cudnn),
    )

    def __init__(self, backend: str | None):
        self.backend = None if backend is None or torch.compiler.is_compiling() else backend
        self.saved = None

    def __enter__(self):
        if self.backend is not None:
            self.saved = [get() for _, get, _ in self._SETTERS] + [torch._C._get_math_sdp_enabled()]
            for name, _, set_ in self._SETTERS:
                set_(name == self.backend)
            torch._C._set_sdp_use_math(True)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            for (_, _, set_), was in zip(self._SETTERS, self.saved):
                set_(was)
            torch._C._set_sdp_use_math(self.saved[-1])
        return False


# --------------------------------------------------------------------------------------- ops
# The Triton kernels are registered directly (`Library.define` + `impl`, a few microseconds per call
# against 10-20 for `torch.library.custom_op`), with fake impls so torch.compile(fullgraph=True) and
# torch.export see single nodes; autograd is an `autograd.Function` around them.
_lib = torch.library.Library("seed_fast", "FRAGMENT")
_lib.define(
    "qformer_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale)"
    " -> (Tensor, Tensor)"
)
_lib.define(
    "qformer_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? key_padding_mask, bool causal, float scale) -> (Tensor, Tensor, Tensor)"
)


def _fwd_triton(q, k, v, key_padding_mask, causal, scale):
    """Triton forward: (out (B, H, Lq, Dh), lse (B, H, Lq) fp32 base-2 log-sum-exp)."""
    from ..kernels.qformer_attention import qformer_attention_fwd_triton

    return qformer_attention_fwd_triton(q, k, v, key_padding_mask, causal, scale)


def _bwd_triton(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale):
    """Triton backward: (dq, dk, dv), each in its input's layout where that is dense."""
    from ..kernels.qformer_attention import qformer_attention_bwd_triton

    return qformer_attention_bwd_triton(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale)


for _key in ("CUDA", "CPU"):  # CPU: the Triton interpreter (TRITON_INTERPRET=1), for testing
    _lib.impl("qformer_attention_fwd", _fwd_triton, _key)
    _lib.impl("qformer_attention_bwd", _bwd_triton, _key)


@torch.library.register_fake("seed_fast::qformer_attention_fwd", lib=_lib)
def _(q, k, v, key_padding_mask, causal, scale):
    b, h, lq, dh = q.shape
    out = q.new_empty(b, lq, h, dh).transpose(1, 2)  # the kernel's layout: heads merge for free
    return out, q.new_empty(b, h, lq, dtype=torch.float32)


@torch.library.register_fake("seed_fast::qformer_attention_bwd", lib=_lib)
def _(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale):
        out, lse = torch.ops.seed_fast.qformer_attention_fwd(q, k, v, key_padding_mask, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None, None
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.seed_fast.qformer_attention_bwd(
            grad_out, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale
        )
        return dq, dk, dv, None, None, None


# --------------------------------------------------------------------------------------- dispatch


def not_supported_reasons(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why backend `impl` cannot run these inputs; empty when it can."""
    reasons: list[str] = []
    if impl in ("ref", "sdpa"):
        return reasons
    if impl in _SDPA_BACKENDS:
        if q.device.type != "cuda":
            reasons.append(f"{impl} chooses among CUDA kernels; tensors are on {q.device}")
        return reasons
    if impl != "triton":
        return [f"unknown impl {impl!r}; choose from {IMPLS}"]
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) != 1 or not dtypes <= set(_KERNEL_DTYPES):
        reasons.append(f"dtypes {sorted(map(str, dtypes))}: need one of float32/float16/bfloat16 for q, k and v")
    if q.shape[-1] > 128:
        reasons.append(f"head dim {q.shape[-1]} above 128")
    return reasons + triton_reasons(q.device, dtypes)


def choose_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    impl: str = "auto",
    *,
    causal: bool = False,
    masked: bool = False,
) -> str:
    """The backend `qformer_attention(impl=...)` would use; raises with the reasons when it cannot."""
    if impl not in IMPLS:
        raise ValueError(f"qformer_attention: unknown impl {impl!r}; choose from {IMPLS}")
    if impl != "auto":
        reasons = not_supported_reasons(impl, q, k, v)
        if reasons:
            raise RuntimeError(f"qformer_attention: impl={impl!r} cannot run these inputs: " + "; ".join(reasons))
        return impl
    if q.dtype == torch.float64:
        return "ref"
    if q.shape[-2] > _TABLE_MAX_LQ:
        return "sdpa"
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    case = (
        ("dtype", _table.dtype_name(q.dtype)),
        ("attention", "self" if causal else "cross"),
        ("mode", "fwd+bwd" if grad else "fwd"),
    )
    if masked:
        case += (("mask", True),)  # not measured: the vendor default
    chosen = _table.choose("qformer_attention", q.device, case, q.shape[0], "sdpa")
    if chosen != "sdpa" and not_supported_reasons(chosen, q, k, v):
        return "sdpa"
    return chosen


def qformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Dispatching entry point; same contract as `qformer_attention_ref`.

    impl: "auto" (the backend measured fastest for this case on this class of device, see the
    module docstring), "ref", "sdpa", "sdpa_efficient", "sdpa_cudnn", "sdpa_flash", "triton".
    The Triton output is a (B, H, Lq, Dh) view of a (B, Lq, H, Dh) buffer, so
    `out.transpose(1, 2).flatten(2)` merges the heads without a copy.
    """
    _check_qkv(q, k, v, causal, key_padding_mask)
    chosen = choose_impl(q, k, v, impl, causal=causal, masked=key_padding_mask is not None)
    if _dispatch._logs:
        _dispatch.note("qformer_attention", chosen)
    if chosen == "ref":
        return qformer_attention_ref(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if chosen == "sdpa":
        return _sdpa(q, k, v, causal, key_padding_mask, scale)
    if chosen in _SDPA_BACKENDS:
        with _prefer_sdpa_backend(chosen):
            return _sdpa(q, k, v, causal, key_padding_mask, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(torch.bool)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _TritonAttention.apply(q, k, v, key_padding_mask, causal, scale)
    return torch.ops.seed_fast.qformer_attention_fwd(q, k, v, key_padding_mask, causal, scale)[0]


def _check_qkv(q, k, v, causal, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"qformer_attention: {name} must be (B, H, L, Dh), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"qformer_attention: {name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"qformer_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"qformer_attention: q {tuple(q.shape)} does not match k {tuple(k.shape)} in batch, heads or Dh"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"qformer_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"qformer_attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"qformer_attention: causal needs Lq == Lk, got {q.shape[-2]} and {k.shape[-2]}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[-2]):
        raise ValueError(
            f"qformer_attention: key_padding_mask must be (B, Lk) = {(k.shape[0], k.shape[-2])}, "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.dtype.is_floating_point:
        raise TypeError(
            "qformer_attention: key_padding_mask must be bool (True = attend), got "
            f"{key_padding_mask.dtype}; an additive float mask is not accepted"
        )
