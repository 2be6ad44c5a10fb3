#pragma once
#include <torch/extension.h>

#include <string>

namespace seed_fast {
// (N, D) x (K, D) -> (N,) int64 nearest-code indices, fp32 accumulation, ties to the lowest index.
// isa: "auto" (AVX-512 micro-kernel when the CPU has it), "avx512" or "generic" (compiler-vectorized);
// the small-N path (N <= 64) is the same for all.
torch::Tensor codebook_argmin_cpu(const torch::Tensor& z, const torch::Tensor& codebook, const std::string& isa);
// Which micro-kernel isa="auto" runs on this CPU: "avx512" or "generic".
std::string codebook_argmin_cpu_isa();
#ifdef SEED_FAST_WITH_CUDA
torch::Tensor codebook_argmin_cuda(const torch::Tensor& z, const torch::Tensor& codebook);
#endif
}  // namespace seed_fast
