// seed_fast._C: the C++ CPU kernels, registered as PyTorch operators under torch.ops.seed_fast.
// One registration file; kernels live in csrc/<op>/. seed_fast._C_cuda adds CUDA kernels to the
// operators defined here.
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "codebook_lookup/codebook_lookup.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace seed_fast {

// What this build is: reported by `python -m seed_fast.info` and checked by the build tests.
std::tuple<std::string, bool, int64_t, int64_t> cpu_build_info() {
#if defined(__clang__)
  const std::string compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  const std::string compiler = "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#elif defined(_MSC_VER)
  const std::string compiler = "msvc " + std::to_string(_MSC_VER);
#else
  const std::string compiler = "unknown";
#endif
#ifdef _OPENMP
  const bool openmp = true;
  const int64_t threads = omp_get_max_threads();
#else
  const bool openmp = false;
  const int64_t threads = 1;
#endif
  return {compiler, openmp, threads, static_cast<int64_t>(_GLIBCXX_USE_CXX11_ABI)};
}

// Shapes only, for fake tensors (torch.compile, torch.export); sizes may be symbolic.
at::Tensor codebook_lookup_indices_meta(const at::Tensor& z, const at::Tensor& codebook, c10::string_view /*isa*/) {
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2,
              "_codebook_lookup_indices: need z (N, D) and codebook (K, D), got ", z.sym_sizes(), " and ",
              codebook.sym_sizes());
  TORCH_CHECK(z.sym_size(1).sym_eq(codebook.sym_size(1)).expect_true(__FILE__, __LINE__),
              "_codebook_lookup_indices: z has D=", z.sym_size(1), " but codebook has D=", codebook.sym_size(1));
  for (const auto* t : {&z, &codebook}) {
    const auto st = t->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                "_codebook_lookup_indices: inputs must be float32, float16 or bfloat16, got ", st);
  }
  return at::empty_symint({z.sym_size(0)}, z.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> codebook_lookup_meta(const at::Tensor& z, const at::Tensor& codebook,
                                                        const std::optional<at::Tensor>& /*error_flag*/,
                                                        c10::string_view isa) {
  auto indices = codebook_lookup_indices_meta(z, codebook, isa);
  return {indices, at::empty_symint({z.sym_size(0), codebook.sym_size(1)}, codebook.options())};
}

}  // namespace seed_fast

TORCH_LIBRARY(seed_fast, m) {
  // Nearest-code indices (N, D) x (K, D) -> (N,) int64, ties to the lowest index. The CPU kernel
  // raises ValueError on NaN / inf (found in-kernel); the CUDA kernel does not look for them.
  // isa: the CPU micro-kernel, "auto", "avx512" or "generic"; on CUDA "auto" / "simt" (FFMA) or "tc"
  // (tensor cores, sm_80+).
  m.def("_codebook_lookup_indices(Tensor z, Tensor codebook, str isa=\"auto\") -> Tensor");
  // The indices and z_q = codebook[indices] (the codebook's dtype) in one call: one kernel launch on
  // CUDA, where NaN / inf scores set error_flag[0] = 1 (an int32 tensor on the device) when given
  // instead of raising, so that the call never waits for the GPU; the CPU kernel raises ValueError.
  m.def(
      "_codebook_lookup(Tensor z, Tensor codebook, Tensor(a!)? error_flag=None, str isa=\"auto\") -> "
      "(Tensor indices, Tensor z_q)");
  // Which CPU micro-kernel isa="auto" runs on this machine: "avx512" or "generic".
  m.def("_codebook_lookup_cpu_isa() -> str", &seed_fast::codebook_argmin_cpu_isa);
  m.def("_cpu_build_info() -> (str compiler, bool openmp, int threads, int torch_abi)", &seed_fast::cpu_build_info);
}

TORCH_LIBRARY_IMPL(seed_fast, CPU, m) {
  m.impl("_codebook_lookup_indices", &seed_fast::codebook_argmin_cpu);
  m.impl("_codebook_lookup", &seed_fast::codebook_lookup_cpu);
}

TORCH_LIBRARY_IMPL(seed_fast, Meta, m) {
  m.impl("_codebook_lookup_indices", &seed_fast::codebook_lookup_indices_meta);
  m.impl("_codebook_lookup", &seed_fast::codebook_lookup_meta);
}

// Importing seed_fast._C runs the registrations above; the module itself holds nothing.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "seed_fast's CPU operators, under torch.ops.seed_fast", -1,
                               nullptr};
  return PyModule_Create(&module);
}
