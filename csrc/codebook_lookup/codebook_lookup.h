#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace seed_fast {
// The kernels of the operator seed_fast::_codebook_lookup_indices(Tensor z, Tensor codebook, str isa="auto").
// (N, D) x (K, D) -> (N,) int64 nearest-code indices, fp32 accumulation, ties to the lowest index.
// NaN / inf in the inputs raise ValueError on the CPU; the CUDA kernel leaves that check to its caller.
// isa picks the CPU micro-kernel: "auto" (AVX-512 when the CPU has it), "avx512" or "generic"
// (compiler-vectorized); the small-N path (N <= 64) is the same for all. CUDA takes "auto" only.
at::Tensor codebook_argmin_cpu(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa);
// Which micro-kernel isa="auto" runs on this CPU: "avx512" or "generic".
std::string codebook_argmin_cpu_isa();
// The kernels of seed_fast::_codebook_lookup(Tensor z, Tensor codebook, Tensor? error_flag=None,
// str isa="auto") -> (indices, z_q): the indices above and z_q = codebook[indices] in the codebook's
// dtype. On CUDA one kernel does both, and NaN / inf scores set error_flag[0] = 1 (when given)
// instead of raising, so the call never waits for the GPU; the CPU raises ValueError as above.
std::tuple<at::Tensor, at::Tensor> codebook_lookup_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                       const std::optional<at::Tensor>& error_flag,
                                                       c10::string_view isa);
#ifdef SEED_FAST_WITH_CUDA
at::Tensor codebook_argmin_cuda(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa);
std::tuple<at::Tensor, at::Tensor> codebook_lookup_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                        const std::optional<at::Tensor>& error_flag,
                                                        c10::string_view isa);
#endif
}  // namespace seed_fast
