"""Triton nearest-code search: one pass over the codebook, running (min, argmin) per row.

Each program holds a BLOCK_N x BLOCK_K tile of dot products, streams codebook tiles through it
(looping over D in BLOCK_D chunks), and keeps the best score per row. Score = 0.5 ||e||^2 - z.e in
fp32: fp32 inputs use IEEE fp32 dots (never TF32), fp16 / bf16 inputs use tensor-core dots whose
products are exact in fp32 and accumulate in fp32. When there are few row tiles (one image: N = 32)
the codebook is split across programs along grid axis 1 and the per-split winners are merged on the
host (the first minimum over splits keeps ties on the lowest index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _codebook_argmin_kernel(
    z_ptr,
    cb_ptr,
    hn_ptr,
    best_v_ptr,
    best_i_ptr,
    flag_ptr,
    N,
    K,
    D,
    stride_z,
    stride_c,
    codes_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    CHECK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    k_start = pid_s * codes_per_split
    k_end = tl.minimum(k_start + codes_per_split, K)
    best_v = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_i = tl.zeros((BLOCK_N,), tl.int32)
    bad = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < k_end
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            zt = tl.load(
                z_ptr + rows[:, None] * stride_z + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0
            )
            ct = tl.load(
                cb_ptr + cols[:, None] * stride_c + ds[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0
            )
            if IEEE:
                acc = tl.dot(zt, tl.trans(ct), acc, input_precision="ieee")
            else:
                acc = tl.dot(zt, tl.trans(ct), acc)
        hn = tl.load(hn_ptr + cols, mask=cmask, other=float("inf"))
        score = hn[None, :] - acc
        if CHECK:  # NaN / inf in the inputs, or distances beyond fp32, on real rows and codes
            finite = (score == score) & (tl.abs(score) < float("inf"))
            real = rmask[:, None] & cmask[None, :]
            bad = tl.maximum(bad, tl.max((real & ~finite).to(tl.int32), axis=1))
        # padded codes and NaN scores never win
        score = tl.where(cmask[None, :] & (score == score), score, float("inf"))
        tile_v, tile_i = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_v < best_v
        best_v = tl.where(better, tile_v, best_v)
        best_i = tl.where(better, tile_i.to(tl.int32) + k0, best_i)
    if CHECK:
        if tl.max(bad, axis=0) > 0:
            tl.store(flag_ptr, 1)
    tl.store(best_v_ptr + pid_s * N + rows, best_v, mask=rmask)
    tl.store(best_i_ptr + pid_s * N + rows, best_i, mask=rmask)


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(x))


def codebook_argmin_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    splits: int | None = None,
    error_flag: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, D) x (K, D) -> (N,) int64 nearest-code indices. fp32 / fp16 / bf16 (same dtype for both
    after promotion); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

    splits: how many programs share the codebook per row tile (default: enough to fill the GPU).
    error_flag: an int32 tensor on z's device; error_flag[0] is set to 1 when a score is NaN / inf
    (NaN / inf inputs, or distances beyond fp32). None: no check.
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"codebook_argmin_triton: need (N, D) and (K, D), got {tuple(z.shape)}, {tuple(codebook.shape)}"
        )
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"codebook_argmin_triton: float32/float16/bfloat16 only, got {dtype}")
    z = z.to(dtype).contiguous()
    codebook = codebook.to(dtype).contiguous()
    n, d = z.shape
    k = codebook.shape[0]
    half_norm = 0.5 * codebook.float().square().sum(1)  # (K,) fp32
    block_n = 16 if n <= 16 else (32 if n <= 32 else 64)
    block_k = 64 if k >= 64 else 16
    block_d = _pow2_at_least(min(d, 64), 16)
    row_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    if splits is None:
        if z.is_cuda:
            sms = torch.cuda.get_device_properties(z.device).multi_processor_count
            splits = max(1, min(k_tiles, triton.cdiv(2 * sms, row_tiles)))
        else:
            splits = 1
    splits = max(1, min(int(splits), k_tiles))
    codes_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, codes_per_split)
    best_v = torch.empty(splits, n, dtype=torch.float32, device=z.device)
    best_i = torch.empty(splits, n, dtype=torch.int32, device=z.device)
    _codebook_argmin_kernel[(row_tiles, splits)](
        z,
        codebook,
        half_norm,
        best_v,
        best_i,
        best_i if error_flag is None else error_flag,
        n,
        k,
        d,
        z.stride(0),
        codebook.stride(0),
        codes_per_split,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        IEEE=dtype == torch.float32,
        CHECK=error_flag is not None,
    )
    if splits == 1:
        return best_i[0].long()
    winner = best_v.argmin(dim=0, keepdim=True)  # first minimum: the lowest split, so the lowest index
    return best_i.gather(0, winner)[0].long()
