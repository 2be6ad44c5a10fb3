// Nearest-code search on tensor cores (sm_80 and newer), isa "tc" of seed_fast::_codebook_lookup:
// scores 0.5 ||e||^2 - z.e, the dot products from mma.sync m16n8k8 TF32 with fp32 accumulation.
//
// fp32 keeps its contract by the 3xTF32 split (as cuVS's fused L2 nearest neighbour and CUTLASS's
// "fast fp32" GEMMs do): each operand x = hi + lo with hi = tf32(x) and lo = tf32(x - hi), and
// z.e ~ hi.hi + hi.lo + lo.hi, the two small products accumulated first. fp16 and bf16 values are
// exact in TF32 (11 and 8 significant bits against TF32's 11), so they take one product.
// The code norms are summed in fp32 FMAs from the same tile; ||z||^2 only for the overflow check.
//
// A block is 4 warps over 64 rows of z (16 per warp) and a contiguous range of codes. Each warp holds
// its rows' A fragments (hi and lo) in registers for the whole range; the codebook streams through
// shared memory 64 codes at a time, split into hi / lo once per block. Rows keep a running best per
// thread (codes visited in increasing order, strict <), reduced over the 4 lanes sharing a row with
// ties to the lower index; several splits of the codebook merge as in the SIMT kernel (a packed
// 64-bit atomicMax, the last block of a row tile writes indices and z_q). D up to 64 (padded to 32
// or 64 with zeros).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "codebook_lookup_cuda_common.cuh"

namespace seed_fast {
namespace cb_cuda {
namespace {

constexpr int WARPS = 4, THREADS = 32 * WARPS, BM = 16 * WARPS, BN = 64, NT = BN / 8, MAX_D = 64;

// fp32 -> TF32 (round to nearest, ties away from zero), as a 32-bit pattern with the low 13 bits 0.
__device__ __forceinline__ uint32_t tf32_bits(float f) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
#else
  r = __float_as_uint(f);
#endif
  return r;
}

// c += a (16x8, row-major fragment) * b (8x8, column-major fragment), fp32 accumulation.
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// KS = padded D / 8: 4 (D <= 32) or 8 (D <= 64).
template <typename T, int KS>
__global__ void __launch_bounds__(THREADS)
codebook_lookup_tc_kernel(const T* __restrict__ z, const T* __restrict__ cb, int64_t N, int64_t K, int64_t D,
                          int64_t codes_per_split, int splits, unsigned long long* __restrict__ partial,
                          unsigned int* __restrict__ arrivals, int64_t* __restrict__ indices, T* __restrict__ zq,
                          int* error_flag) {
  constexpr bool SPLIT = std::is_same<T, float>::value;
  constexpr int DP = KS * 8, LD = DP + 4;  // row stride 4 (mod 32) banks apart: fragment loads conflict-free
  __shared__ uint32_t cs_hi[BN * LD];
  __shared__ uint32_t cs_lo[SPLIT ? BN * LD : 1];
  __shared__ float hs[BN];
  __shared__ int s_idx[BM];
  __shared__ int s_bad;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;  // the mma fragments' group and thread-in-group
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t ra = row0 + warp * 16 + g, rb = ra + 8;  // this thread's two rows
  const bool va = ra < N, vb = rb < N;
  const int64_t k_start = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(k_start + codes_per_split, K);
  if (threadIdx.x == 0) s_bad = 0;

  // A fragments, read once: a0 (row g, col t), a1 (row g+8, col t), a2 (row g, col t+4), a3 (row g+8, col t+4)
  uint32_t a_hi[KS][4], a_lo[KS][4];
  float zn_a = 0.f, zn_b = 0.f;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int c0 = ks * 8 + t, c1 = c0 + 4;
    float v[4];
    v[0] = (va && c0 < D) ? to_float(z[ra * D + c0]) : 0.f;
    v[1] = (vb && c0 < D) ? to_float(z[rb * D + c0]) : 0.f;
    v[2] = (va && c1 < D) ? to_float(z[ra * D + c1]) : 0.f;
    v[3] = (vb && c1 < D) ? to_float(z[rb * D + c1]) : 0.f;
    zn_a = fmaf(v[2], v[2], fmaf(v[0], v[0], zn_a));
    zn_b = fmaf(v[3], v[3], fmaf(v[1], v[1], zn_b));
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      a_hi[ks][q] = tf32_bits(v[q]);
      a_lo[ks][q] = SPLIT ? tf32_bits(v[q] - __uint_as_float(a_hi[ks][q])) : 0u;
    }
  }
  // the 4 lanes of a group hold all of a row's columns: its squared norm, for the overflow check
  zn_a += __shfl_xor_sync(0xffffffffu, zn_a, 1);
  zn_a += __shfl_xor_sync(0xffffffffu, zn_a, 2);
  zn_b += __shfl_xor_sync(0xffffffffu, zn_b, 1);
  zn_b += __shfl_xor_sync(0xffffffffu, zn_b, 2);
  bool bad = (va && !isfinite(zn_a)) || (vb && !isfinite(zn_b));

  float best_a = INFINITY, best_b = INFINITY;  // at +inf from the first code: all-NaN rows get a valid index
  int idx_a = static_cast<int>(k_start), idx_b = static_cast<int>(k_start);
  for (int64_t k0 = k_start; k0 < k_end; k0 += BN) {
    __syncthreads();  // the previous tile is consumed
    for (int e = threadIdx.x; e < BN * DP; e += THREADS) {
      const int c = e / DP, d = e % DP;
      const int64_t code = k0 + c;
      const float v = (code < k_end && d < D) ? to_float(cb[code * D + d]) : 0.f;
      const uint32_t hi = tf32_bits(v);
      cs_hi[c * LD + d] = hi;
      if (SPLIT) cs_lo[c * LD + d] = tf32_bits(v - __uint_as_float(hi));
    }
    {  // half squared norms in fp32: two threads per code, each over half of the dimensions
      const int c = threadIdx.x >> 1, part = threadIdx.x & 1;
      const int64_t code = k0 + c;
      float s = 0.f;
      if (code < k_end) {
        for (int64_t d = part; d < D; d += 2) {
          const float v = to_float(cb[code * D + d]);
          s = fmaf(v, v, s);
        }
      }
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      if (part == 0) hs[c] = code < k_end ? 0.5f * s : INFINITY;
    }
    __syncthreads();
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {  // B fragment: b0 (k t, code g), b1 (k t+4, code g)
        const int base = (j * 8 + g) * LD + ks * 8 + t;
        const uint32_t bh0 = cs_hi[base], bh1 = cs_hi[base + 4];
        if (SPLIT) {
          mma_tf32(acc[j], a_lo[ks], bh0, bh1);
          mma_tf32(acc[j], a_hi[ks], cs_lo[base], cs_lo[base + 4]);
        }
        mma_tf32(acc[j], a_hi[ks], bh0, bh1);
      }
    }
    // C fragment: c0 / c1 (row g, codes 2t / 2t+1), c2 / c3 (row g+8, the same codes)
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int cl = j * 8 + 2 * t + q;
        const int64_t code = k0 + cl;
        const bool ok = code < k_end;
        const float h = hs[cl];
        const float sa = h - acc[j][q], sb = h - acc[j][2 + q];
        bad |= ok && ((va && !isfinite(sa)) || (vb && !isfinite(sb)));
        if (sa < best_a) {
          best_a = sa;
          idx_a = static_cast<int>(code);
        }
        if (sb < best_b) {
          best_b = sb;
          idx_b = static_cast<int>(code);
        }
      }
    }
  }
  shfl_min(best_a, idx_a, 1, 4);
  shfl_min(best_a, idx_a, 2, 4);
  shfl_min(best_b, idx_b, 1, 4);
  shfl_min(best_b, idx_b, 2, 4);
  if (t == 0) {
    const int r = warp * 16 + g;
    if (splits == 1) {
      s_idx[r] = idx_a;
      s_idx[r + 8] = idx_b;
    } else {
      if (va) atomicMax(partial + ra, pack_best(best_a, idx_a));
      if (vb) atomicMax(partial + rb, pack_best(best_b, idx_b));
    }
  }
  if (bad) s_bad = 1;  // every writer stores the same value
  finish_rows<T>(BM, row0, N, D, splits, partial, arrivals, indices, zq, cb, error_flag, s_idx, s_bad);
}

template <typename T, int KS>
void launch_typed(const at::Tensor& z, const at::Tensor& cb, at::Tensor& indices, T* zq, int* error_flag) {
  const int64_t N = z.size(0), K = cb.size(0), D = z.size(1);
  const auto geo = plan(z, N, K, BM, BN, 4);
  const dim3 grid(static_cast<unsigned>(geo.row_tiles), static_cast<unsigned>(geo.splits));
  codebook_lookup_tc_kernel<T, KS><<<grid, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(z.data_ptr()), reinterpret_cast<const T*>(cb.data_ptr()), N, K, D,
      geo.codes_per_split, static_cast<int>(geo.splits), geo.partial, geo.arrivals, indices.data_ptr<int64_t>(),
      zq, error_flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_d(const at::Tensor& z, const at::Tensor& cb, at::Tensor& indices, void* zq, int* error_flag) {
  if (z.size(1) <= 32) {
    launch_typed<T, 4>(z, cb, indices, static_cast<T*>(zq), error_flag);
  } else {
    launch_typed<T, 8>(z, cb, indices, static_cast<T*>(zq), error_flag);
  }
}

}  // namespace

std::string tc_unsupported(const at::Tensor& z) {
  const auto* prop = at::cuda::getDeviceProperties(z.device().index());
  if (prop->major < 8) {
    return "TF32 tensor cores need sm_80 or newer; " + std::string(prop->name) + " is sm_" +
           std::to_string(prop->major) + std::to_string(prop->minor);
  }
  const c10::cuda::CUDAGuard guard(z.device());
  cudaFuncAttributes attr;  // the code this GPU would run: compiled for a virtual arch below 8.0, it has no mma
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, codebook_lookup_tc_kernel<float, 4>));
  if (attr.ptxVersion < 80) {
    return "the extension holds no sm_80+ code for this GPU (compiled for compute_" + std::to_string(attr.ptxVersion) +
           "); rebuild with TORCH_CUDA_ARCH_LIST including 8.0 or 9.0";
  }
  if (z.dim() == 2 && z.size(1) > MAX_D) {
    return "D=" + std::to_string(z.size(1)) + " is above the tensor-core kernel's " + std::to_string(MAX_D);
  }
  return "";
}

void launch_tc(const at::Tensor& z, const at::Tensor& cb, at::Tensor& indices, void* zq, int* error_flag) {
  const auto st = z.scalar_type();
  if (st == at::kFloat) {
    launch_d<float>(z, cb, indices, zq, error_flag);
  } else if (st == at::kHalf) {
    launch_d<__half>(z, cb, indices, zq, error_flag);
  } else {
    launch_d<__nv_bfloat16>(z, cb, indices, zq, error_flag);
  }
}

}  // namespace cb_cuda
}  // namespace seed_fast
