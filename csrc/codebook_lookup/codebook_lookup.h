#pragma once
#include <ATen/ATen.h>

#include <string>

namespace seed_fast {
// The kernels of the operator seed_fast::_codebook_lookup_indices(Tensor z, Tensor codebook, str isa="auto").
// (N, D) x (K, D) -> (N,) int64 nearest-code indices, fp32 accumulation, ties to the lowest index.
// NaN / inf in the inputs raise ValueError on the CPU; the CUDA kernel leaves that check to its caller.
// isa picks the CPU micro-kernel: "auto" (AVX-512 when the CPU has it), "avx512" or "generic"
// (compiler-vectorized); the small-N path (N <= 64) is the same for all. CUDA takes "auto" only.
at::Tensor codebook_argmin_cpu(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa);
// Which micro-kernel isa="auto" runs on this CPU: "avx512" or "generic".
std::string codebook_argmin_cpu_isa();
#ifdef SEED_FAST_WITH_CUDA
at::Tensor codebook_argmin_cuda(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa);
#endif
}  // namespace seed_fast
