"""Triton attention for the Q-Former's shapes: few queries (32), up to a few hundred keys (257).

Forward: one program per (query tile, batch * head). The tile's queries stay in registers while
key/value tiles stream by with an online softmax (running max and sum in fp32, base-2 exponentials).
The whole 257-key row is a handful of tiles, so there is no split over keys. Outputs are written
(B, Lq, H, Dh) in memory and returned as a (B, H, Lq, Dh) view, so the caller's merge of heads,
`out.transpose(1, 2).flatten(2)`, needs no copy. The row's log-sum-exp is kept for the backward.

Backward: two kernels in FlashAttention-2's split. dK/dV: one program per (key tile, batch * head)
loops over the query tiles (one or two for the Q-Former); dQ: one program per (query tile,
batch * head) loops over the key tiles. Neither needs atomics. delta = rowsum(dO * O) is recomputed
in both from the tiles they load anyway, instead of a separate launch.

A row with no key to attend (padding mask all False, or causal with a padded prefix) gets zeros
out and zero gradients: its log-sum-exp is stored as +inf, so every probability exp2(s - lse) is 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _qformer_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    o_ptr,
    lse_ptr,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    smb,
    smn,
    sob,
    soh,
    som,
    sod,
    H,
    LQ,
    LK,
    DH,
    qk_scale,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < LQ
    dmask = offs_d < DH
    q = _load_tile(q_ptr, b, h, sqb, sqh, sqm, sqd, offs_m, offs_d, mmask[:, None] & dmask[None, :])
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < LK
        kt = _load_tile(k_ptr, b, h, skb, skh, skn, skd, offs_n, offs_d, nmask[:, None] & dmask[None, :])
        vt = _load_tile(v_ptr, b, h, svb, svh, svn, svd, offs_n, offs_d, nmask[:, None] & dmask[None, :])
        s = _mm(q, tl.trans(kt), IEEE)
        s = s * qk_scale  # base-2 logits
        valid = nmask[None, :] & mmask[:, None]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * smb + offs_n * smn, mask=nmask, other=0)
            valid = valid & (keep[None, :] != 0)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p, vt, IEEE)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(
        o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        out.to(o_ptr.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )
    tl.store(lse_ptr + pid_bh * LQ + offs_m, lse, mask=mmask)


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation: exact fp32 products for fp32 inputs (IEEE), else a cast to b's
    dtype (fp16 / bf16 tensor cores)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _load_tile(ptr, b, h, sb, sh, sr, sd, rows, cols, mask):
    """The (rows, cols) tile of head h of batch b of a strided (B, H, L, Dh) tensor; 0 outside mask."""
    return tl.load(ptr + b * sb + h * sh + rows[:, None] * sr + cols[None, :] * sd, mask=mask, other=0.0)


@triton.jit
def _scores_to_probs(
    q,
    kt,
    lse,
    offs_m,
    offs_n,
    mmask,
    nmask,
    mask_ptr,
    b,
    smb,
    smn,
    qk_scale,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Recompute the (BLOCK_M, BLOCK_N) probabilities of the forward from the saved lse."""
    s = _mm(q, tl.trans(kt), IEEE)
    p = tl.exp2(s * qk_scale - lse[:, None])
    valid = nmask[None, :] & mmask[:, None]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * smb + offs_n * smn, mask=nmask, other=0)
        valid = valid & (keep[None, :] != 0)
    return tl.where(valid, p, 0.0)


@triton.jit
def _qformer_attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,
    dk_ptr,
    dv_ptr,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    smb,
    smn,
    sob,
    soh,
    som,
    sod,
    sdob,
    sdoh,
    sdom,
    sdod,
    H,
    LQ,
    LK,
    DH,
    qk_scale,
    sm_scale,
    sdkb,
    sdkh,
    sdkn,
    sdkd,
    sdvb,
    sdvh,
    sdvn,
    sdvd,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < LK
    dmask = offs_d < DH
    kt = _load_tile(k_ptr, b, h, skb, skh, skn, skd, offs_n, offs_d, nmask[:, None] & dmask[None, :])
    vt = _load_tile(v_ptr, b, h, svb, svh, svn, svd, offs_n, offs_d, nmask[:, None] & dmask[None, :])
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # queries before the tile's first key see none of it
    for start_m in range(lo, LQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mmask = offs_m < LQ
        md = mmask[:, None] & dmask[None, :]
        q = _load_tile(q_ptr, b, h, sqb, sqh, sqm, sqd, offs_m, offs_d, md)
        do = _load_tile(do_ptr, b, h, sdob, sdoh, sdom, sdod, offs_m, offs_d, md)
        o = _load_tile(o_ptr, b, h, sob, soh, som, sod, offs_m, offs_d, md)
        lse = tl.load(lse_ptr + pid_bh * LQ + offs_m, mask=mmask, other=float("inf"))
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        p = _scores_to_probs(
            q, kt, lse, offs_m, offs_n, mmask, nmask, mask_ptr, b, smb, smn, qk_scale, CAUSAL, HAS_MASK, IEEE
        )
        dv += _mm(tl.trans(p), do, IEEE)
        ds = p * (_mm(do, tl.trans(vt), IEEE) - delta[:, None])
        dk += _mm(tl.trans(ds), q, IEEE)
    dk = dk * sm_scale
    out_mask = nmask[:, None] & dmask[None, :]
    # dK / dV are written in the layout of their buffers (the inputs' layout where it is dense)
    dk_off = b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
    dv_off = b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd
    tl.store(dk_ptr + dk_off, dk.to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + dv_off, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _qformer_attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,
    dq_ptr,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    smb,
    smn,
    sob,
    soh,
    som,
    sod,
    sdob,
    sdoh,
    sdom,
    sdod,
    H,
    LQ,
    LK,
    DH,
    qk_scale,
    sm_scale,
    sdqb,
    sdqh,
    sdqm,
    sdqd,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < LQ
    dmask = offs_d < DH
    md = mmask[:, None] & dmask[None, :]
    q = _load_tile(q_ptr, b, h, sqb, sqh, sqm, sqd, offs_m, offs_d, md)
    do = _load_tile(do_ptr, b, h, sdob, sdoh, sdom, sdod, offs_m, offs_d, md)
    o = _load_tile(o_ptr, b, h, sob, soh, som, sod, offs_m, offs_d, md)
    lse = tl.load(lse_ptr + pid_bh * LQ + offs_m, mask=mmask, other=float("inf"))
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < LK
        nd = nmask[:, None] & dmask[None, :]
        kt = _load_tile(k_ptr, b, h, skb, skh, skn, skd, offs_n, offs_d, nd)
        vt = _load_tile(v_ptr, b, h, svb, svh, svn, svd, offs_n, offs_d, nd)
        p = _scores_to_probs(
            q, kt, lse, offs_m, offs_n, mmask, nmask, mask_ptr, b, smb, smn, qk_scale, CAUSAL, HAS_MASK, IEEE
        )
        ds = p * (_mm(do, tl.trans(vt), IEEE) - delta[:, None])
        dq += _mm(ds, kt, IEEE)
    dq = dq * sm_scale
    dq_off = b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd
    tl.store(dq_ptr + dq_off, dq.to(dq_ptr.dtype.element_ty), mask=md)


@triton.jit
def _qformer_attention_bwd_fused_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    smb,
    smn,
    sob,
    soh,
    som,
    sod,
    sdob,
    sdoh,
    sdom,
    sdod,
    H,
    LQ,
    LK,
    DH,
    qk_scale,
    sm_scale,
    sdqb,
    sdqh,
    sdqm,
    sdqd,
    sdkb,
    sdkh,
    sdkn,
    sdkd,
    sdvb,
    sdvh,
    sdvn,
    sdvd,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The whole backward of one (batch, head) when all its queries fit one tile (LQ <= BLOCK_M):
    K and V stream through once; each tile's dK and dV are final when computed (no other program
    holds queries), dQ accumulates in registers. One launch, no atomics."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < LQ
    dmask = offs_d < DH
    md = mmask[:, None] & dmask[None, :]
    q = _load_tile(q_ptr, b, h, sqb, sqh, sqm, sqd, offs_m, offs_d, md)
    do = _load_tile(do_ptr, b, h, sdob, sdoh, sdom, sdod, offs_m, offs_d, md)
    o = _load_tile(o_ptr, b, h, sob, soh, som, sod, offs_m, offs_d, md)
    lse = tl.load(lse_ptr + pid_bh * LQ + offs_m, mask=mmask, other=float("inf"))
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, LQ)  # keys past the last query are seen by none
    for start_n in range(0, LK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < LK
        nd = nmask[:, None] & dmask[None, :]
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        if start_n < hi:
            kt = _load_tile(k_ptr, b, h, skb, skh, skn, skd, offs_n, offs_d, nd)
            vt = _load_tile(v_ptr, b, h, svb, svh, svn, svd, offs_n, offs_d, nd)
            p = _scores_to_probs(
                q, kt, lse, offs_m, offs_n, mmask, nmask, mask_ptr, b, smb, smn, qk_scale, CAUSAL, HAS_MASK, IEEE
            )
            dv = _mm(tl.trans(p), do, IEEE)
            ds = p * (_mm(do, tl.trans(vt), IEEE) - delta[:, None])
            dk = _mm(tl.trans(ds), q, IEEE)
            dq += _mm(ds, kt, IEEE)
        # dK / dV in the layout of their buffers (the inputs' layout where it is dense); zeros for
        # keys no query attends to
        dk_off = b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
        dv_off = b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd
        tl.store(dk_ptr + dk_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=nd)
        tl.store(dv_ptr + dv_off, dv.to(dv_ptr.dtype.element_ty), mask=nd)
    dq_off = b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd
    tl.store(dq_ptr + dq_off, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=md)


# --------------------------------------------------------------------------------------- launchers
MAX_HEAD_DIM = 128
FUSED_BWD_MAX_LQ = 64  # the one-launch backward holds every query of a (batch, head) in one program


def _blocks(lq: int, dh: int) -> tuple[int, int, int]:
    block_m = 16 if lq <= 16 else 32  # the Q-Former's 32 queries are one tile
    block_n = 64
    block_d = max(16, triton.next_power_of_2(dh))
    return block_m, block_n, block_d


def _mask_args(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    if key_padding_mask is None:
        return q, 0, 0, False  # any pointer: the kernel never reads it
    m = key_padding_mask.to(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _check(q, k, v):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"qformer_attention_triton: float32/float16/bfloat16 only, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"qformer_attention_triton: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"qformer_attention_triton: head dim {q.shape[-1]} above {MAX_HEAD_DIM}")


def qformer_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, Dh), k / v (B, H, Lk, Dh), any strides -> (out (B, H, Lq, Dh) view of a
    (B, Lq, H, Dh) buffer, lse (B, H, Lq) fp32 base-2 log-sum-exp, +inf for rows with no key)."""
    _check(q, k, v)
    bsz, heads, lq, dh = q.shape
    lk = k.shape[2]
    out = torch.empty(bsz, lq, heads, dh, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(bsz, heads, lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_m, block_n, block_d = _blocks(lq, dh)
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    grid = (triton.cdiv(lq, block_m), bsz * heads)
    _qformer_attention_fwd_kernel[grid](
        q,
        k,
        v,
        mask,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        smb,
        smn,
        *out.stride(),
        heads,
        lq,
        lk,
        dh,
        scale * _LOG2E,
        CAUSAL=causal,
        HAS_MASK=has_mask,
        IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out, lse


def qformer_attention_bwd_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in q's dtype, each in its input's layout where that layout is dense
    (a (B, L, H, Dh) buffer viewed as (B, H, L, Dh) gets a gradient of the same strides, so autograd
    copies nothing), contiguous otherwise.

    fused: one launch with all queries of a (batch, head) in one program (default for Lq <=
    FUSED_BWD_MAX_LQ), or the two-kernel backward (dK / dV by key tile, then dQ by query tile)."""
    _check(q, k, v)
    bsz, heads, lq, dh = q.shape
    lk = k.shape[2]
    grad_out = grad_out.to(q.dtype)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_m, block_n, block_d = _blocks(lq, dh)
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    common = (
        *q.stride(),
        *k.stride(),
        *v.stride(),
        smb,
        smn,
        *out.stride(),
        *grad_out.stride(),
        heads,
        lq,
        lk,
        dh,
        scale * _LOG2E,
        scale,
    )
    meta = dict(
        CAUSAL=causal,
        HAS_MASK=has_mask,
        IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    if fused is None:
        fused = lq <= FUSED_BWD_MAX_LQ
    if fused:  # one launch: every query of a (batch, head) in one program
        meta["BLOCK_M"] = max(16, triton.next_power_of_2(lq))
        _qformer_attention_bwd_fused_kernel[(bsz * heads,)](
            q, k, v, mask, out, grad_out, lse, dq, dk, dv, *common, *dq.stride(), *dk.stride(), *dv.stride(), **meta
        )
        return dq, dk, dv
    _qformer_attention_bwd_dkdv_kernel[(triton.cdiv(lk, block_n), bsz * heads)](
        q, k, v, mask, out, grad_out, lse, dk, dv, *common, *dk.stride(), *dv.stride(), **meta
    )
    _qformer_attention_bwd_dq_kernel[(triton.cdiv(lq, block_m), bsz * heads)](
        q, k, v, mask, out, grad_out, lse, dq, *common, *dq.stride(), **meta
    )
    return dq, dk, dv


def default_scale(dh: int) -> float:
    return 1.0 / math.sqrt(dh)
