// Nearest-code search on CUDA: argmin_k ||z - e_k||^2 per row of z, fp32 accumulation.
//
// A block owns BM rows of z and a contiguous range of codes (the codebook is split across
// blockIdx.y when there are few row tiles, e.g. one image = 32 rows). z and code tiles pass
// through shared memory in BD-wide slices of D; each of the 256 threads accumulates a TM x TN
// tile of dot products (and the norms of its TN codes) in registers. Score = 0.5 ||e||^2 - z.e.
// Each thread keeps a running best per row; 16-lane shuffles reduce across the codes of a row,
// and one 64-bit atomicMin per row and block merges splits: the high word is an order-preserving
// key of the fp32 score, the low word the code index, so equal scores resolve to the lowest index.
// Extra memory: O(N) for the packed results; nothing of size N x K.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>

#include "codebook_lookup.h"

namespace seed_fast {
namespace {

constexpr int BM = 64, BN = 64, BD = 16, TM = 4, TN = 4, THREADS = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Monotone map of float bits to unsigned: a < b  <=>  key(a) < key(b) (no NaN: callers reject it).
__device__ __forceinline__ unsigned int ordered_key(float f) {
  const unsigned int u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
codebook_argmin_kernel(const T* __restrict__ z, const T* __restrict__ cb, int64_t N, int64_t K, int64_t D,
                       int64_t codes_per_split, unsigned long long* __restrict__ out) {
  __shared__ float zs[BD][BM + 1];
  __shared__ float cs[BD][BN + 1];
  const int tx = threadIdx.x % 16;  // codes tx, tx+16, tx+32, tx+48 of the tile
  const int ty = threadIdx.x / 16;  // rows ty, ty+16, ty+32, ty+48 of the tile
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k_start = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(k_start + codes_per_split, K);

  // Start from this split's first code at +inf: a row whose scores are all NaN (possible only with
  // check_finite=False) still gets a valid index, and any real score replaces it.
  float best_v[TM];
  int best_i[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    best_v[i] = INFINITY;
    best_i[i] = static_cast<int>(k_start);
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
      const float h = code < k_end ? 0.5f * nrm[j] : INFINITY;
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float s = h - acc[i][j];
        if (s < best_v[i]) {
          best_v[i] = s;
          best_i[i] = static_cast<int>(code);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    float v = best_v[i];
    int idx = best_i[i];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {  // the 16 lanes sharing these rows
      const float ov = __shfl_xor_sync(0xffffffffu, v, off, 16);
      const int oi = __shfl_xor_sync(0xffffffffu, idx, off, 16);
      if (ov < v || (ov == v && oi < idx)) {
        v = ov;
        idx = oi;
      }
    }
    const int64_t row = row0 + ty + 16 * i;
    if (tx == 0 && row < N) {
      const unsigned long long packed =
          (static_cast<unsigned long long>(ordered_key(v)) << 32) | static_cast<unsigned int>(idx);
      atomicMin(out + row, packed);
    }
  }
}

template <typename T>
void launch(const at::Tensor& z, const at::Tensor& cb, at::Tensor& packed) {
  const int64_t N = z.size(0), K = cb.size(0), D = z.size(1);
  const int64_t row_tiles = (N + BM - 1) / BM;
  const int64_t k_tiles = (K + BN - 1) / BN;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(k_tiles, (2 * sms + row_tiles - 1) / row_tiles));
  const int64_t codes_per_split = ((k_tiles + splits - 1) / splits) * BN;
  splits = (K + codes_per_split - 1) / codes_per_split;
  TORCH_CHECK(row_tiles <= std::numeric_limits<int>::max() && splits <= 65535, "codebook_argmin_cuda: grid too large");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
  codebook_argmin_kernel<T><<<grid, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(z.data_ptr()), reinterpret_cast<const T*>(cb.data_ptr()), N, K, D, codes_per_split,
      reinterpret_cast<unsigned long long*>(packed.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor codebook_argmin_cuda(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa) {
  TORCH_CHECK(isa == "auto", "codebook_argmin_cuda: isa must be 'auto' on CUDA, got '", isa, "'");
  TORCH_CHECK_VALUE(z.is_cuda() && codebook.is_cuda(), "codebook_argmin_cuda: tensors must be on a CUDA device, got ",
                    z.device(), " and ", codebook.device());
  TORCH_CHECK_VALUE(z.device() == codebook.device(), "codebook_argmin_cuda: z is on ", z.device(), " but codebook on ",
                    codebook.device());
  TORCH_CHECK_VALUE(z.dim() == 2 && codebook.dim() == 2,
                    "codebook_argmin_cuda: need z (N, D) and codebook (K, D), got ", z.sizes(), " and ",
                    codebook.sizes());
  TORCH_CHECK_VALUE(z.size(1) == codebook.size(1), "codebook_argmin_cuda: z has D=", z.size(1),
                    " but codebook has D=", codebook.size(1));
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, "codebook_argmin_cuda: the codebook is empty");
  TORCH_CHECK_VALUE(codebook.size(0) < std::numeric_limits<int32_t>::max() - BN,
                    "codebook_argmin_cuda: K=", codebook.size(0), " is above the int32 index range");
  const auto st = at::promote_types(z.scalar_type(), codebook.scalar_type());
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "codebook_argmin_cuda: inputs must be float32, float16 or bfloat16, got ", z.scalar_type(),
                   " and ", codebook.scalar_type());
  const c10::cuda::CUDAGuard guard(z.device());
  const auto zc = z.to(st).contiguous();
  const auto cc = codebook.to(st).contiguous();
  auto packed = at::full({z.size(0)}, -1, z.options().dtype(at::kLong));  // all bits set = "none yet"
  if (z.size(0) == 0) return packed;
  if (st == at::kFloat) {
    launch<float>(zc, cc, packed);
  } else if (st == at::kHalf) {
    launch<__half>(zc, cc, packed);
  } else {
    launch<__nv_bfloat16>(zc, cc, packed);
  }
  return packed.bitwise_and(0xffffffffLL);
}

}  // namespace seed_fast
