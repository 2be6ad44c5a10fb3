// Nearest-code search on CUDA: argmin_k ||z - e_k||^2 per row of z, fp32 accumulation, and the
// gather z_q = codebook[argmin], in one kernel launch.
//
// A block owns BM rows of z and a contiguous range of codes (the codebook is split across
// blockIdx.y when there are few row tiles, e.g. one image = 32 rows). z and code tiles pass
// through shared memory in BD-wide slices of D; each of the 256 threads accumulates a TM x TN
// tile of dot products (and the norms of its TN codes) in registers. Score = 0.5 ||e||^2 - z.e.
// Each thread keeps a running best per row; 16-lane shuffles reduce across the codes of a row.
// With one split the block writes its rows' indices and z_q directly. With several, each block
// merges its winners with one 64-bit atomicMax per row into a zeroed workspace (the high word an
// order-reversed key of the fp32 score, the low word the complemented code index, so equal scores
// resolve to the lowest index), and the last block of a row tile to arrive (a per-tile arrival
// counter in the same workspace) writes the indices and z_q. The workspace (O(N)) is cleared by
// one cudaMemsetAsync; nothing of size N x K is ever held.
// A NaN / inf score (NaN or inf in the inputs, or distances beyond fp32), or a row of z whose squared
// norm overflows fp32 (summed while the first code tile is read; its scores alone can stay finite),
// sets an int32 error flag the caller passes (or not): seed_fast.ops.codebook_lookup reads it
// without synchronizing. The tensor-core variant (isa "tc") is in codebook_lookup_cuda_tc.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "codebook_lookup.h"
#include "codebook_lookup_cuda_common.cuh"

namespace seed_fast {
namespace {

using cb_cuda::pack_best;
using cb_cuda::to_float;

constexpr int BM = 64, BN = 64, BD = 16, TM = 4, TN = 4, THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(THREADS)
codebook_lookup_kernel(const T* __restrict__ z, const T* __restrict__ cb, int64_t N, int64_t K, int64_t D,
                       int64_t codes_per_split, int splits, unsigned long long* __restrict__ partial,
                       unsigned int* __restrict__ arrivals, int64_t* __restrict__ indices, T* __restrict__ zq,
                       int* error_flag) {
  __shared__ float zs[BD][BM + 1];
  __shared__ float cs[BD][BN + 1];
  __shared__ int s_idx[BM];
  __shared__ int s_bad;
  const int tx = threadIdx.x % 16;  // codes tx, tx+16, tx+32, tx+48 of the tile
  const int ty = threadIdx.x / 16;  // rows ty, ty+16, ty+32, ty+48 of the tile
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k_start = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(k_start + codes_per_split, K);
  if (threadIdx.x == 0) s_bad = 0;

  // Start from this split's first code at +inf: a row whose scores are all NaN still gets a valid
  // index (the error flag reports it), and any real score replaces it.
  float best_v[TM];
  int best_i[TM];
  float zn[TM];  // ||z||^2 of this thread's rows, summed over the first code tile only
  bool bad = false;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    best_v[i] = INFINITY;
    best_i[i] = static_cast<int>(k_start);
    zn[i] = 0.f;
  }
  for (int64_t k0 = k_start; k0 < k_end; k0 += BN) {
    float acc[TM][TN];
    float nrm[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      nrm[j] = 0.f;
#pragma unroll
      for (int i = 0; i < TM; ++i) acc[i][j] = 0.f;
    }
    for (int64_t d0 = 0; d0 < D; d0 += BD) {
      for (int e = threadIdx.x; e < BM * BD; e += THREADS) {
        const int r = e / BD, dd = e % BD;
        const int64_t row = row0 + r, d = d0 + dd;
        zs[dd][r] = (row < N && d < D) ? to_float(z[row * D + d]) : 0.f;
      }
      for (int e = threadIdx.x; e < BN * BD; e += THREADS) {
        const int c = e / BD, dd = e % BD;
        const int64_t code = k0 + c, d = d0 + dd;
        cs[dd][c] = (code < k_end && d < D) ? to_float(cb[code * D + d]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < BD; ++dd) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = zs[dd][ty + 16 * i];
        if (k0 == k_start) {  // uniform across the block
#pragma unroll
          for (int i = 0; i < TM; ++i) zn[i] = fmaf(a[i], a[i], zn[i]);
        }
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          b[j] = cs[dd][tx + 16 * j];
          nrm[j] = fmaf(b[j], b[j], nrm[j]);
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < TN; ++j) {  // codes in increasing order: strict < keeps the lowest index
      const int64_t code = k0 + tx + 16 * j;
      const bool code_ok = code < k_end;
      const float h = code_ok ? 0.5f * nrm[j] : INFINITY;
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float s = h - acc[i][j];
        bad |= code_ok && row0 + ty + 16 * i < N && !isfinite(s);
        if (s < best_v[i]) {
          best_v[i] = s;
          best_i[i] = static_cast<int>(code);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) bad |= row0 + ty + 16 * i < N && !isfinite(zn[i]);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    float v = best_v[i];
    int idx = best_i[i];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) cb_cuda::shfl_min(v, idx, off, 16);  // the 16 lanes sharing these rows
    const int r = ty + 16 * i;
    if (tx == 0 && row0 + r < N) {
      if (splits == 1) {
        s_idx[r] = idx;
      } else {
        atomicMax(partial + row0 + r, pack_best(v, idx));
      }
    }
  }
  if (bad) s_bad = 1;  // every writer stores the same value
  cb_cuda::finish_rows<T>(BM, row0, N, D, splits, partial, arrivals, indices, zq, cb, error_flag, s_idx, s_bad);
}

template <typename T>
void launch(const at::Tensor& z, const at::Tensor& cb, at::Tensor& indices, T* zq, int* error_flag) {
  const int64_t N = z.size(0), K = cb.size(0), D = z.size(1);
  const auto g = cb_cuda::plan(z, N, K, BM, BN, 2);
  const dim3 grid(static_cast<unsigned>(g.row_tiles), static_cast<unsigned>(g.splits));
  codebook_lookup_kernel<T><<<grid, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(z.data_ptr()), reinterpret_cast<const T*>(cb.data_ptr()), N, K, D,
      g.codes_per_split, static_cast<int>(g.splits), g.partial, g.arrivals, indices.data_ptr<int64_t>(), zq,
      error_flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Checks the inputs; returns the dtype both are computed in.
at::ScalarType check_inputs(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                            const std::optional<at::Tensor>& error_flag) {
  TORCH_CHECK(z.is_cuda() && codebook.is_cuda(), op, ": tensors must be on a CUDA device, got ", z.device(),
              " and ", codebook.device());
  TORCH_CHECK(z.device() == codebook.device(), op, ": z is on ", z.device(), " but codebook on ",
              codebook.device());
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, op, ": need z (N, D) and codebook (K, D), got ", z.sizes(),
              " and ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), op, ": z has D=", z.size(1), " but codebook has D=",
              codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, op, ": the codebook is empty");
  TORCH_CHECK(codebook.size(0) < std::numeric_limits<int32_t>::max() - BN, op, ": K=", codebook.size(0),
              " is above the int32 index range");
  if (error_flag.has_value()) {
    TORCH_CHECK(error_flag->is_cuda() && error_flag->device() == z.device() &&
                error_flag->scalar_type() == at::kInt && error_flag->numel() >= 1,
                op, ": error_flag must be an int32 tensor on ", z.device(), ", got ",
                error_flag->scalar_type(), " on ", error_flag->device());
  }
  const auto st = at::promote_types(z.scalar_type(), codebook.scalar_type());
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": inputs must be float32, float16 or bfloat16, got ", z.scalar_type(), " and ",
              codebook.scalar_type());
  return st;
}

// One launch (plus a memset when the codebook is split); z_q is gathered in-kernel when want_zq
// and the codebook is already in the compute dtype, else left undefined for the caller.
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& z, const at::Tensor& codebook, at::ScalarType st,
                                       bool want_zq, const std::optional<at::Tensor>& error_flag, bool tc) {
  const c10::cuda::CUDAGuard guard(z.device());
  const auto zc = z.to(st).contiguous();
  const auto cc = codebook.to(st).contiguous();
  auto indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor zq;
  const bool fused_zq = want_zq && codebook.scalar_type() == st;
  if (fused_zq) zq = at::empty({z.size(0), z.size(1)}, cc.options());
  if (z.size(0) == 0) return {indices, zq};
  int* flag = error_flag.has_value() ? error_flag->data_ptr<int>() : nullptr;
  if (tc) {
    cb_cuda::launch_tc(zc, cc, indices, fused_zq ? zq.data_ptr() : nullptr, flag);
  } else if (st == at::kFloat) {
    launch<float>(zc, cc, indices, fused_zq ? zq.data_ptr<float>() : nullptr, flag);
  } else if (st == at::kHalf) {
    launch<__half>(zc, cc, indices, fused_zq ? reinterpret_cast<__half*>(zq.data_ptr()) : nullptr, flag);
  } else {
    launch<__nv_bfloat16>(zc, cc, indices, fused_zq ? reinterpret_cast<__nv_bfloat16*>(zq.data_ptr()) : nullptr,
                          flag);
  }
  return {indices, zq};
}

// isa: "auto" and "simt" take the FFMA kernel above (every arch), "tc" the tensor-core one (sm_80+).
bool use_tensor_cores(const char* op, c10::string_view isa, const at::Tensor& z) {
  TORCH_CHECK(isa == "auto" || isa == "simt" || isa == "tc", op,
              ": isa must be 'auto', 'simt' or 'tc' on CUDA, got '", isa, "'");
  if (isa != "tc") return false;
  const auto why = cb_cuda::tc_unsupported(z);
  TORCH_CHECK(why.empty(), op, ": isa 'tc' cannot run: ", why);
  return true;
}

}  // namespace

at::Tensor codebook_argmin_cuda(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa) {
  const auto st = check_inputs("codebook_argmin_cuda", z, codebook, std::nullopt);
  const bool tc = use_tensor_cores("codebook_argmin_cuda", isa, z);
  return std::get<0>(run(z, codebook, st, false, std::nullopt, tc));
}

std::tuple<at::Tensor, at::Tensor> codebook_lookup_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                        const std::optional<at::Tensor>& error_flag,
                                                        c10::string_view isa) {
  const auto st = check_inputs("codebook_lookup_cuda", z, codebook, error_flag);
  const bool tc = use_tensor_cores("codebook_lookup_cuda", isa, z);
  auto [indices, zq] = run(z, codebook, st, true, error_flag, tc);
  if (!zq.defined()) zq = at::embedding(codebook, indices);  // mixed dtypes: gather in the codebook's own
  return {indices, zq};
}

// Why isa "tc" cannot run on z's device with z's D ("" when it can).
std::string codebook_tc_unsupported_cuda(const at::Tensor& z) {
  TORCH_CHECK(z.is_cuda(), "codebook_tc_unsupported: z must be a CUDA tensor, got ", z.device());
  return cb_cuda::tc_unsupported(z);
}

}  // namespace seed_fast
