#pragma once
#include <torch/extension.h>

namespace seed_fast {
// (N, D) x (K, D) -> (N,) int64 nearest-code indices, fp32 accumulation, ties to the lowest index.
torch::Tensor codebook_argmin_cpu(const torch::Tensor& z, const torch::Tensor& codebook);
#ifdef SEED_FAST_WITH_CUDA
torch::Tensor codebook_argmin_cuda(const torch::Tensor& z, const torch::Tensor& codebook);
#endif
}  // namespace seed_fast
