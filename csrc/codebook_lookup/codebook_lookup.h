#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

// Errors: every check here is TORCH_CHECK, whose exception is thrown inside libc10 and reaches
// Python as RuntimeError naming the problem. Not TORCH_CHECK_VALUE / TORCH_CHECK_TYPE: those throw
// from this library's own code, and on an H200 machine (Ubuntu 24.04, gcc 13.3, Python 3.12,
// torch 2.11) such a throw killed the process with SIGSEGV. The Python wrappers check the inputs
// first and raise ValueError / TypeError; tests/test_build.py keeps the typed macros out of csrc/.

namespace seed_fast {
// The kernels of the operator seed_fast::_codebook_lookup_indices(Tensor z, Tensor codebook, str isa="auto").
// (N, D) x (K, D) -> (N,) int64 nearest-code indices, fp32 accumulation, ties to the lowest index.
// NaN / inf in the inputs raise (RuntimeError) on the CPU; the CUDA kernel leaves that check to its caller.
// isa picks the CPU micro-kernel: "auto" (AVX-512 when the CPU has it), "avx512" or "generic"
// (compiler-vectorized); the small-N path (N <= 64) is the same for all. On CUDA: "auto" / "simt"
// (FFMA, every arch) or "tc" (tensor cores, sm_80+, D <= 64; fp32 by the 3xTF32 split).
at::Tensor codebook_argmin_cpu(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa);
// Which micro-kernel isa="auto" runs on this CPU: "avx512" or "generic".
std::string codebook_argmin_cpu_isa();
// The kernels of seed_fast::_codebook_lookup(Tensor z, Tensor codebook, Tensor? error_flag=None,
// str isa="auto") -> (indices, z_q): the indices above and z_q = codebook[indices] in the codebook's
// dtype. On CUDA one kernel does both, and NaN / inf scores set error_flag[0] = 1 (when given)
// instead of raising, so the call never waits for the GPU. On the CPU a given error_flag is set
// the same way (indices then 0), else the call raises as above.
std::tuple<at::Tensor, at::Tensor> codebook_lookup_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                       const std::optional<at::Tensor>& error_flag,
                                                       c10::string_view isa);
#ifdef SEED_FAST_WITH_CUDA
at::Tensor codebook_argmin_cuda(const at::Tensor& z, const at::Tensor& codebook, c10::string_view isa);
std::tuple<at::Tensor, at::Tensor> codebook_lookup_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                        const std::optional<at::Tensor>& error_flag,
                                                        c10::string_view isa);
std::string codebook_tc_unsupported_cuda(const at::Tensor& z);
#endif
}  // namespace seed_fast
