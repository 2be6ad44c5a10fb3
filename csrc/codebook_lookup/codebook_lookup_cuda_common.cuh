// What the CUDA nearest-code kernels share: element conversion, the packed (score, index) key that
// merges codebook splits with one 64-bit atomicMax, a block's final step (merge, error flag,
// indices, z_q) and the host-side launch geometry (codebook splits, zeroed workspace).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

namespace seed_fast {
namespace cb_cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Monotone map of float bits to unsigned: a < b  <=>  key(a) < key(b) (for non-NaN floats).
__device__ __forceinline__ unsigned int ordered_key(float f) {
  const unsigned int u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Smaller (score, index) packs to a larger value: atomicMax over a zeroed word keeps the minimum.
__device__ __forceinline__ unsigned long long pack_best(float v, int idx) {
  return (static_cast<unsigned long long>(~ordered_key(v)) << 32) | static_cast<unsigned int>(~idx);
}

// (v, idx) <- the better of itself and the lane `off` away within groups of `width` lanes; equal
// scores keep the lower index.
__device__ __forceinline__ void shfl_min(float& v, int& idx, int off, int width) {
  const float ov = __shfl_xor_sync(0xffffffffu, v, off, width);
  const int oi = __shfl_xor_sync(0xffffffffu, idx, off, width);
  if (ov < v || (ov == v && oi < idx)) {
    v = ov;
    idx = oi;
  }
}

// A block's last step, called by all its threads once every row's winner is in s_idx (one split)
// or merged into `partial` (several). With several splits only the last block of the row tile to
// arrive goes on: it reads the merged winners. The error flag is raised when any block saw a bad
// score (s_bad); then the indices and z_q of the tile's rows are written.
template <typename T>
__device__ __forceinline__ void finish_rows(int bm, int64_t row0, int64_t N, int64_t D, int splits,
                                            unsigned long long* partial, unsigned int* arrivals,
                                            int64_t* indices, T* zq, const T* cb, int* error_flag, int* s_idx,
                                            const int& s_bad) {
  __shared__ bool s_last;
  if (splits > 1) {
    __threadfence();  // this block's atomicMax results before its arrival
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(arrivals + blockIdx.x, 1u) == static_cast<unsigned int>(splits - 1);
    __syncthreads();
    if (!s_last) {
      if (threadIdx.x == 0 && s_bad && error_flag) *reinterpret_cast<volatile int*>(error_flag) = 1;
      return;
    }
    __threadfence();
    for (int r = threadIdx.x; r < bm; r += blockDim.x) {
      if (row0 + r < N) s_idx[r] = static_cast<int>(~static_cast<unsigned int>(atomicOr(partial + row0 + r, 0ull)));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && s_bad && error_flag) *reinterpret_cast<volatile int*>(error_flag) = 1;
  for (int r = threadIdx.x; r < bm; r += blockDim.x) {
    if (row0 + r < N) indices[row0 + r] = s_idx[r];
  }
  if (zq != nullptr) {
    const int64_t rows = min(static_cast<int64_t>(bm), N - row0);
    for (int64_t e = threadIdx.x; e < rows * D; e += blockDim.x) {
      const int64_t r = e / D, d = e - r * D;
      zq[(row0 + r) * D + d] = cb[static_cast<int64_t>(s_idx[r]) * D + d];
    }
  }
}

// How a launch covers (N rows) x (K codes): row tiles of bm, the codebook cut into `splits` ranges
// of codes_per_split (a multiple of bn) so that about two blocks per SM run when rows are few.
struct Geometry {
  int64_t row_tiles, splits, codes_per_split;
  unsigned long long* partial = nullptr;
  unsigned int* arrivals = nullptr;
  at::Tensor workspace;
};

inline Geometry plan(const at::Tensor& z, int64_t N, int64_t K, int bm, int bn, int blocks_per_sm) {
  Geometry g;
  g.row_tiles = (N + bm - 1) / bm;
  const int64_t k_tiles = (K + bn - 1) / bn;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = static_cast<int64_t>(blocks_per_sm) * sms;
  g.splits = std::max<int64_t>(1, std::min<int64_t>(k_tiles, (want + g.row_tiles - 1) / g.row_tiles));
  g.codes_per_split = ((k_tiles + g.splits - 1) / g.splits) * bn;
  g.splits = (K + g.codes_per_split - 1) / g.codes_per_split;
  TORCH_CHECK(g.row_tiles <= std::numeric_limits<int>::max() && g.splits <= 65535,
              "codebook_lookup_cuda: grid too large");
  if (g.splits > 1) {  // N packed winners, then one arrival counter per row tile; all zero
    g.workspace = at::empty({N + (g.row_tiles + 1) / 2}, z.options().dtype(at::kLong));
    C10_CUDA_CHECK(cudaMemsetAsync(g.workspace.data_ptr(), 0, g.workspace.nbytes(), at::cuda::getCurrentCUDAStream()));
    g.partial = reinterpret_cast<unsigned long long*>(g.workspace.data_ptr<int64_t>());
    g.arrivals = reinterpret_cast<unsigned int*>(g.partial + N);
  }
  return g;
}

// The tensor-core variant (codebook_lookup_cuda_tc.cu): why it cannot run on z's device with this
// D ("" when it can), and its launch (z and cb contiguous, in the compute dtype).
std::string tc_unsupported(const at::Tensor& z);
void launch_tc(const at::Tensor& z, const at::Tensor& cb, at::Tensor& indices, void* zq, int* error_flag);

}  // namespace cb_cuda
}  // namespace seed_fast
