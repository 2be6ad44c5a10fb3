"""Triton nearest-code search: indices and z_q = codebook[indices] in one launch.

Each program holds a BLOCK_N x BLOCK_K tile of dot products, streams codebook tiles through it
(looping over D in BLOCK_D chunks, the codes' squared norms summed from the same tiles), and keeps
the best score per row. Score = 0.5 ||e||^2 - z.e in fp32. fp32 inputs use 3xTF32 tensor-core dots
on GPUs that have TF32 (each operand split into a TF32 high part and a TF32 remainder, three
products summed in fp32: the error of an fp32 dot, as cuVS's fused L2 nearest-neighbour does) and
IEEE fp32 dots elsewhere; fp16 / bf16 inputs use tensor-core dots whose products are exact in fp32.
When there are few row tiles (one image: N = 32) the codebook is split across programs along grid
axis 1: each program merges its winners into a per-row 64-bit word with an atomic max (the high
word an order-reversed key of the fp32 score, the low word the complemented index, so the lowest
score and then the lowest index win), counts itself in on a per-row-tile counter, and the last to
arrive writes the indices and z_q and resets the words and the counter for the next call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT64_MIN = -(2**63)


@triton.jit
def _codebook_lookup_kernel(
    z_ptr,
    cb_ptr,
    idx_ptr,
    zq_ptr,
    ws_ptr,
    cnt_ptr,
    flag_ptr,
    N,
    K,
    D,
    stride_z,
    stride_c,
    stride_q,
    codes_per_split,
    splits,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    CHECK: tl.constexpr,
    WRITE_ZQ: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    k_start = pid_s * codes_per_split
    k_end = tl.minimum(k_start + codes_per_split, K)
    best_v = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_i = tl.zeros((BLOCK_N,), tl.int32) + k_start
    bad = tl.zeros((BLOCK_N,), tl.int32)
    if CHECK:  # rows whose squared norm overflows fp32: their scores alone can stay finite
        zsq = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            zt = tl.load(
                z_ptr + rows[:, None] * stride_z + ds[None, :], mask=rmask[:, None] & (ds < D)[None, :], other=0.0
            ).to(tl.float32)
            zsq += tl.sum(zt * zt, axis=1)
        bad = (rmask & ~(zsq < float("inf"))).to(tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < k_end
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        norm = tl.zeros((BLOCK_K,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            zt = tl.load(
                z_ptr + rows[:, None] * stride_z + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0
            )
            ct = tl.load(
                cb_ptr + cols[:, None] * stride_c + ds[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0
            )
            acc = tl.dot(zt, tl.trans(ct), acc, input_precision=PRECISION)
            cf = ct.to(tl.float32)
            norm += tl.sum(cf * cf, axis=1)
        score = tl.where(cmask, 0.5 * norm, float("inf"))[None, :] - acc
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
    last = True
    if SPLIT:
        bits = best_v.to(tl.uint32, bitcast=True)
        key = tl.where((bits & 0x80000000) != 0, ~bits, bits | 0x80000000)  # a < b <=> key(a) < key(b)
        packed = ((~key).to(tl.uint64) << 32) | (~best_i.to(tl.uint32)).to(tl.uint64)
        packed = (packed ^ 0x8000000000000000).to(tl.int64, bitcast=True)  # unsigned order as signed
        tl.atomic_max(ws_ptr + rows, packed, mask=rmask)
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1)  # acq_rel: the maxima above are visible to the last
        last = arrived == splits - 1
        if last:
            merged = tl.atomic_xchg(ws_ptr + rows, -0x8000000000000000, mask=rmask)  # read, and reset
            best_i = ~((merged.to(tl.uint64, bitcast=True) & 0xFFFFFFFF).to(tl.uint32))
            best_i = best_i.to(tl.int32, bitcast=True)
            tl.store(cnt_ptr + pid_n, 0)
    if last:
        tl.store(idx_ptr + rows, best_i.to(tl.int64), mask=rmask)
        if WRITE_ZQ:
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                m = rmask[:, None] & (ds < D)[None, :]
                e = tl.load(cb_ptr + best_i[:, None].to(tl.int64) * stride_c + ds[None, :], mask=m, other=0.0)
                tl.store(zq_ptr + rows[:, None] * stride_q + ds[None, :], e, mask=m)


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(x))


# Per (device, stream): the split path's merge words (INT64_MIN = "nothing yet") and arrival
# counters (0). The kernel leaves both reset, so they are allocated and initialized once.
_workspaces: dict = {}


def _workspace(device: torch.device, n: int, row_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:  # a graph gets its own (initialized by nodes in the graph), never a shared one
        return torch.full((n,), _INT64_MIN, dtype=torch.int64, device=device), torch.zeros(
            row_tiles, dtype=torch.int32, device=device
        )
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _workspaces.get(key)
    if ws is None or ws[0].numel() < n or ws[1].numel() < row_tiles:
        size = max(n, 64 if ws is None else 2 * ws[0].numel())
        ws = _workspaces[key] = (
            torch.full((size,), _INT64_MIN, dtype=torch.int64, device=device),
            torch.zeros(max(row_tiles, size // 16), dtype=torch.int32, device=device),
        )
    return ws


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype != torch.float32:
        return "tf32"  # fp16 / bf16 tensor-core dots: exact products, fp32 accumulation
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return "ieee"  # no TF32 before Ampere
    return "tf32x3"


def codebook_lookup_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    splits: int | None = None,
    error_flag: torch.Tensor | None = None,
    want_zq: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D) x (K, D) -> ((N,) int64 nearest-code indices, z_q (N, D) in the compute dtype or None).
    fp32 / fp16 / bf16 (same dtype for both after promotion); CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1. One kernel launch.

    splits: how many programs share the codebook per row tile (default: enough to fill the GPU).
    error_flag: an int32 tensor on z's device; error_flag[0] is set to 1 when a score is NaN / inf
    (NaN / inf inputs, or distances beyond fp32). None: no check.
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"codebook_lookup_triton: need (N, D) and (K, D), got {tuple(z.shape)}, {tuple(codebook.shape)}"
        )
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"codebook_lookup_triton: float32/float16/bfloat16 only, got {dtype}")
    z = z.to(dtype).contiguous()
    codebook = codebook.to(dtype).contiguous()
    n, d = z.shape
    k = codebook.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    zq = torch.empty(n, d, dtype=dtype, device=z.device) if want_zq else None
    if n == 0:
        return indices, zq
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
    ws, cnt = _workspace(z.device, n, row_tiles) if splits > 1 else (indices, indices)
    _codebook_lookup_kernel[(row_tiles, splits)](
        z,
        codebook,
        indices,
        indices if zq is None else zq,
        ws,
        cnt,
        indices if error_flag is None else error_flag,
        n,
        k,
        d,
        z.stride(0),
        codebook.stride(0),
        d,
        codes_per_split,
        splits,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        PRECISION=_precision(dtype, z.device),
        CHECK=error_flag is not None,
        WRITE_ZQ=zq is not None,
        SPLIT=splits > 1,
    )
    return indices, zq
