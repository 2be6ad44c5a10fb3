"""Triton LoRA linear: the rank-r product rides in the base matmul's pass.

`_lora_mm_kernel` computes one (BM, BN) tile of  y = x W^T + b + s * drop(x A^T ... ) B^T:
while the K loop streams x tiles for the base product, the same registers feed x A^T (BM x r),
so x is read once for both; the epilogue adds s * t B^T and the bias before the single store.
The t = x A^T part is recomputed by every column tile (r / BN extra FLOP, 1/8 at r = 16 and
BN = 128) instead of a second launch and a round trip of t through memory.

The same kernel computes the backward dx = dy W + s * drop(dy B A) on transposed operands
(strides are arguments); `_lora_da_kernel` reduces dA = s * u^T drop(x) over row splits.

Dropout masks are a pure function of (seed, row, column): `_keep` is murmur3's finalizer on
row * cols + col, matching seed_fast.ops.lora_linear.lora_dropout_mask bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32 (acc may be None): exact fp32 products when IEEE (fp32 inputs), else a
    cast to b's dtype (fp16 / bf16 tensor cores)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _keep(rows, cols, ncols, seed, thresh):
    """(len(rows), len(cols)) bool: hash32(row * ncols + col, seed) >= thresh."""
    idx = (rows[:, None].to(tl.int64) * ncols + cols[None, :].to(tl.int64)).to(tl.uint64) & 0xFFFFFFFF
    h = (idx * 0x9E3779B1 + seed) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return h >= thresh


@triton.jit
def _lora_mm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    t_ptr,
    M,
    N,
    K,
    R,
    sxm,
    sxk,
    swn,
    swk,
    sar,
    sak,
    sbn,
    sbr,
    sym,
    syn,
    scaling,
    seed,
    thresh,
    inv_keep,
    HAS_BIAS: tl.constexpr,
    DROP_IN: tl.constexpr,
    DROP_OUT: tl.constexpr,
    STORE_T: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    mmask = rm < M
    nmask = rn < N
    rmask = rr < R
    acc = tl.zeros((BM, BN), tl.float32)
    tacc = tl.zeros((BM, BR), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * swn + rk[:, None] * swk, mask=kmask[:, None] & nmask[None, :], other=0.0)
        a = tl.load(a_ptr + rr[None, :] * sar + rk[:, None] * sak, mask=kmask[:, None] & rmask[None, :], other=0.0)
        xd = x
        if DROP_IN:
            xd = tl.where(_keep(rm, rk, K, seed, thresh), x, 0.0)
        acc = _dot(x, w, acc, IEEE)
        tacc = _dot(xd, a, tacc, IEEE)
    if DROP_IN:
        tacc = tacc * inv_keep
    if STORE_T:  # t (M, R) fp32, written once (by the first column tile) for the backward
        if pid_n == 0:
            tl.store(t_ptr + rm[:, None] * R + rr[None, :], tacc, mask=mmask[:, None] & rmask[None, :])
    b = tl.load(b_ptr + rn[None, :] * sbn + rr[:, None] * sbr, mask=rmask[:, None] & nmask[None, :], other=0.0)
    lora = _dot(tacc, b, None, IEEE)
    if DROP_OUT:
        lora = tl.where(_keep(rm, rn, N, seed, thresh), lora * inv_keep, 0.0)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None] * sym + rn[None, :] * syn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


@triton.jit
def _lora_da_kernel(
    u_ptr,
    x_ptr,
    part_ptr,
    M,
    K,
    R,
    sxm,
    sxk,
    rows_per_split,
    seed,
    thresh,
    DROP: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    """part[split] (R, K) fp32 = u[rows]^T drop(x[rows]) over this split's rows; u is (M, R) fp32."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    kmask = rk < K
    rmask = rr < R
    acc = tl.zeros((BR, BK), tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    for m0 in range(m_start, m_end, BM):
        rm = m0 + tl.arange(0, BM)
        mm = rm < m_end
        u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=mm[:, None] & rmask[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=mm[:, None] & kmask[None, :], other=0.0)
        if DROP:
            x = tl.where(_keep(rm, rk, K, seed, thresh), x, 0.0)
        acc = _dot(tl.trans(u), x, acc, IEEE)
    tl.store(part_ptr + pid_s * R * K + rr[:, None] * K + rk[None, :], acc, mask=rmask[:, None] & kmask[None, :])


# --------------------------------------------------------------------------------------- launchers
def _blocks(m: int, n: int, k: int, r: int) -> tuple[int, int, int, int]:
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 64 if n <= 64 else 128
    bk = 32 if k <= 32 else 64
    br = max(16, triton.next_power_of_2(r))
    return bm, bn, bk, br


def lora_mm(
    x: torch.Tensor,
    w_t: tuple,
    a_t: tuple,
    b_t: tuple,
    bias: torch.Tensor | None,
    n: int,
    r: int,
    scaling: float,
    *,
    seed: int,
    thresh: int,
    inv_keep: float,
    drop_in: bool,
    drop_out: bool,
    store_t: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y (M, n) = x W'^T + bias + scaling * drop(x A'^T) B'^T with operands given as
    (tensor, stride_out, stride_in) triples (so transposed views cost nothing).
    Returns (y, t (M, r) fp32 or None)."""
    m, k = x.shape
    w, swn, swk = w_t
    a, sar, sak = a_t
    b, sbn, sbr = b_t
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    t = torch.empty(m, r, dtype=torch.float32, device=x.device) if store_t else y
    if m == 0 or n == 0:
        return y, (t if store_t else None)
    bm, bn, bk, br = _blocks(m, n, k, r)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _lora_mm_kernel[grid](
        x,
        w,
        bias if bias is not None else y,
        a,
        b,
        y,
        t,
        m,
        n,
        k,
        r,
        x.stride(0),
        x.stride(1),
        swn,
        swk,
        sar,
        sak,
        sbn,
        sbr,
        y.stride(0),
        y.stride(1),
        scaling,
        seed,
        thresh,
        inv_keep,
        HAS_BIAS=bias is not None,
        DROP_IN=drop_in,
        DROP_OUT=drop_out,
        STORE_T=store_t,
        IEEE=x.dtype == torch.float32,
        BM=bm,
        BN=bn,
        BK=bk,
        BR=br,
    )
    return y, (t if store_t else None)


def lora_da(u: torch.Tensor, x: torch.Tensor, *, seed: int, thresh: int, drop: bool) -> torch.Tensor:
    """(R, K) fp32 = u^T drop(x) (u (M, R) fp32, x (M, K)), split over rows to fill the GPU."""
    m, k = x.shape
    r = u.shape[1]
    if m == 0:
        return torch.zeros(r, k, dtype=torch.float32, device=x.device)
    bm, bk, br = 64 if m > 32 else (32 if m > 16 else 16), 64, max(16, triton.next_power_of_2(r))
    k_tiles = triton.cdiv(k, bk)
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = max(1, min(triton.cdiv(m, bm), triton.cdiv(2 * sms, k_tiles)))
    else:
        splits = min(2, triton.cdiv(m, bm))  # exercise the split reduction under the interpreter too
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    _lora_da_kernel[(k_tiles, splits)](
        u.contiguous(),
        x,
        part,
        m,
        k,
        r,
        x.stride(0),
        x.stride(1),
        rows_per_split,
        seed,
        thresh,
        DROP=drop,
        IEEE=x.dtype == torch.float32,
        BM=bm,
        BK=bk,
        BR=br,
    )
    return part.sum(0)


# --------------------------------------------------------------------------------------- low-rank kernels
# For "lowrank" (seed_fast.ops.lora_linear): the base products stay in cuBLAS; only the parts that
# need the dropout mask run here, each reading its big operand once with the mask computed in-kernel.


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    M,
    K,
    R,
    sxm,
    sxk,
    sar,
    sak,
    inv_keep,
    seed,
    thresh,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    """t (M, R) = inv_keep * (keep(x) A^T): one pass over x."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rmask = rows < M
    acc = tl.zeros((BM, BR), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        xt = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxk, mask=rmask[:, None] & cmask[None, :], other=0.0)
        xt = tl.where(_keep(rows, cols, K, seed, thresh), xt, 0.0)
        at = tl.load(
            a_ptr + rr[None, :] * sar + cols[:, None] * sak, mask=cmask[:, None] & (rr < R)[None, :], other=0.0
        )
        acc = _dot(xt, at, acc, IEEE)
    out = acc * inv_keep
    tl.store(
        t_ptr + rows[:, None] * R + rr[None, :], out.to(t_ptr.dtype.element_ty), mask=rmask[:, None] & (rr < R)[None, :]
    )


@triton.jit
def _lora_expand_masked_add_kernel(
    out_ptr,
    u_ptr,
    a_ptr,
    M,
    K,
    R,
    som,
    sok,
    sum_,
    sur,
    sar,
    sak,
    alpha,
    seed,
    thresh,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    """out (M, K) += alpha * keep(u A) in place: the low-rank part of dx under dropout."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    rmask = rows < M
    cmask = cols < K
    ut = tl.load(u_ptr + rows[:, None] * sum_ + rr[None, :] * sur, mask=rmask[:, None] & (rr < R)[None, :], other=0.0)
    at = tl.load(a_ptr + rr[:, None] * sar + cols[None, :] * sak, mask=(rr < R)[:, None] & cmask[None, :], other=0.0)
    low = _dot(ut, at, None, IEEE)
    low = tl.where(_keep(rows, cols, K, seed, thresh), low * alpha, 0.0)
    m = rmask[:, None] & cmask[None, :]
    ptrs = out_ptr + rows[:, None] * som + cols[None, :] * sok
    cur = tl.load(ptrs, mask=m, other=0.0)
    tl.store(ptrs, (cur.to(tl.float32) + low).to(out_ptr.dtype.element_ty), mask=m)


def _lowrank_blocks(m: int, r: int) -> tuple[int, int, int]:
    return (64 if m > 32 else (32 if m > 16 else 16)), 64, max(16, triton.next_power_of_2(r))


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, *, seed: int, thresh: int, inv_keep: float) -> torch.Tensor:
    """t (M, R) in x's dtype = inv_keep * (drop(x) A^T), x (M, K) any strides, A (R, K); fp32 accumulation."""
    m, k = x.shape
    r = lora_A.shape[0]
    t = torch.empty(m, r, dtype=x.dtype, device=x.device)
    if m == 0:
        return t
    bm, bk, br = _lowrank_blocks(m, r)
    _lora_shrink_kernel[(triton.cdiv(m, bm),)](
        x,
        lora_A,
        t,
        m,
        k,
        r,
        x.stride(0),
        x.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        inv_keep,
        seed,
        thresh,
        IEEE=x.dtype == torch.float32,
        BM=bm,
        BK=bk,
        BR=br,
    )
    return t


def lora_expand_masked_add_(
    out: torch.Tensor, u: torch.Tensor, lora_A: torch.Tensor, alpha: float, *, seed: int, thresh: int
) -> torch.Tensor:
    """out (M, K) += alpha * drop(u A) in place (u (M, R), A (R, K)); returns out."""
    m, k = out.shape
    r = lora_A.shape[0]
    if m == 0 or k == 0:
        return out
    bm, bk, br = _lowrank_blocks(m, r)
    _lora_expand_masked_add_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
        out,
        u,
        lora_A,
        m,
        k,
        r,
        out.stride(0),
        out.stride(1),
        u.stride(0),
        u.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        alpha,
        seed,
        thresh,
        IEEE=out.dtype == torch.float32,
        BM=bm,
        BK=bk,
        BR=br,
    )
    return out


# --------------------------------------------------------------------------------------- mixed adapters
# lora_linear_multi (serving): each row reads its adapter id in the kernel (-1 = base only) and the
# adapter's A / B straight from the stacks: no gathered copies of the weights, no host sync, so the
# update can be captured in a decode step's CUDA graph. Rows of the same adapter share it from L2.


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    ids_ptr,
    s_ptr,
    t_ptr,
    K,
    R,
    S,
    sxr,
    sak_n,
    sak_r,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    """t[row] (R,) fp32 = scaling[id] * (x[row] A[id]^T); zeros where id < 0. row = b * S + s."""
    row = tl.program_id(0)
    aid = tl.load(ids_ptr + row // S).to(tl.int64)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BR,), tl.float32)
    if aid >= 0:
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < K
            xv = tl.load(x_ptr + row * sxr + cols, mask=cmask, other=0.0).to(tl.float32)
            at = tl.load(
                a_ptr + aid * sak_n + rr[:, None] * sak_r + cols[None, :],
                mask=(rr < R)[:, None] & cmask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(at * xv[None, :], axis=1)
        acc = acc * tl.load(s_ptr + aid)
    tl.store(t_ptr + row * R + rr, acc, mask=rr < R)


@triton.jit
def _bgmv_expand_kernel(
    y_ptr,
    t_ptr,
    b_ptr,
    ids_ptr,
    N,
    R,
    S,
    syr,
    sbn_n,
    sbn_o,
    BN: tl.constexpr,
    BR: tl.constexpr,
):
    """y[row, cols] += B[id][cols] t[row] in place; nothing where id < 0."""
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    aid = tl.load(ids_ptr + row // S).to(tl.int64)
    if aid >= 0:
        rr = tl.arange(0, BR)
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < N
        tv = tl.load(t_ptr + row * R + rr, mask=rr < R, other=0.0)
        bt = tl.load(
            b_ptr + aid * sbn_n + cols[:, None] * sbn_o + rr[None, :],
            mask=cmask[:, None] & (rr < R)[None, :],
            other=0.0,
        ).to(tl.float32)
        up = tl.sum(bt * tv[None, :], axis=1)
        ptrs = y_ptr + row * syr + cols
        cur = tl.load(ptrs, mask=cmask, other=0.0)
        tl.store(ptrs, (cur.to(tl.float32) + up).to(y_ptr.dtype.element_ty), mask=cmask)


def lora_multi_update_(
    y: torch.Tensor,
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
) -> torch.Tensor:
    """y (B, S, out) += scalings[id_b] * (x_b A[id_b]^T) B[id_b]^T for every row of batch element b
    (id -1: nothing), in place. x (B, S, in) with contiguous rows; A_stack (n, r, in) and B_stack
    (n, out, r) contiguous; adapter_ids (B,) int; scalings (n,) fp32. Two launches, no sync."""
    bsz, seq, k = x.shape
    n_out = y.shape[-1]
    r = A_stack.shape[1]
    rows = bsz * seq
    if rows == 0 or r == 0:
        return y
    t = torch.empty(rows, r, dtype=torch.float32, device=x.device)
    br = max(16, triton.next_power_of_2(r))
    _bgmv_shrink_kernel[(rows,)](
        x,
        A_stack,
        adapter_ids,
        scalings,
        t,
        k,
        r,
        seq,
        x.stride(1),
        A_stack.stride(0),
        A_stack.stride(1),
        BK=128,
        BR=br,
    )
    bn = 128
    _bgmv_expand_kernel[(rows, triton.cdiv(n_out, bn))](
        y, t, B_stack, adapter_ids, n_out, r, seq, y.stride(1), B_stack.stride(0), B_stack.stride(1), BN=bn, BR=br
    )
    return y
