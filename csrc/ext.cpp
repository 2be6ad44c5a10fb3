// seed_fast._C: the C++ CPU kernels. One registration file; kernels live in csrc/<op>/.
#include <torch/extension.h>

#include "codebook_lookup/codebook_lookup.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace seed_fast {

// What this build is: reported by `python -m seed_fast.info` and checked by the build tests.
pybind11::dict build_info() {
  pybind11::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#elif defined(_MSC_VER)
  d["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
  d["compiler"] = std::string("unknown");
#endif
#ifdef _OPENMP
  d["openmp"] = true;
  d["threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["threads"] = 1;
#endif
  d["torch_abi"] = static_cast<int>(_GLIBCXX_USE_CXX11_ABI);
  return d;
}

}  // namespace seed_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seed_fast C++ CPU kernels";
  m.def("build_info", &seed_fast::build_info, "compiler, OpenMP and ABI of this build");
  m.def("codebook_argmin", &seed_fast::codebook_argmin_cpu, "nearest-code indices (N, D) x (K, D) -> (N,)",
        pybind11::arg("z"), pybind11::arg("codebook"), pybind11::arg("isa") = "auto");
  m.def("codebook_argmin_isa", &seed_fast::codebook_argmin_cpu_isa,
        "the CPU micro-kernel codebook_argmin(isa='auto') runs here: 'avx512' or 'generic'");
}
