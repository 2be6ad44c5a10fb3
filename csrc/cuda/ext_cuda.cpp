// seed_fast._C_cuda: the CUDA kernels. One registration file; kernels live in csrc/<op>/*.cu.
#include <torch/extension.h>
#include <cuda_runtime_api.h>

#include "codebook_lookup/codebook_lookup.h"

#ifndef SEED_FAST_CUDA_ARCHS
#define SEED_FAST_CUDA_ARCHS "unknown"
#endif

namespace seed_fast {

pybind11::dict cuda_build_info() {
  pybind11::dict d;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  d["archs"] = std::string(SEED_FAST_CUDA_ARCHS);
  return d;
}

}  // namespace seed_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seed_fast CUDA kernels";
  m.def("build_info", &seed_fast::cuda_build_info, "CUDA version and architectures of this build");
  m.def("codebook_argmin", &seed_fast::codebook_argmin_cuda, "nearest-code indices (N, D) x (K, D) -> (N,)",
        pybind11::arg("z"), pybind11::arg("codebook"));
}
