// seed_fast._C_cuda: the CUDA kernels of the operators seed_fast._C defines (torch.ops.seed_fast).
// One registration file; kernels live in csrc/<op>/*.cu. Either library may be loaded first.
#include <ATen/ATen.h>
#include <Python.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "codebook_lookup/codebook_lookup.h"

#ifndef SEED_FAST_CUDA_ARCHS
#define SEED_FAST_CUDA_ARCHS "unknown"
#endif

namespace seed_fast {

std::tuple<std::string, std::string> cuda_build_info() {
  return {std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10),
          SEED_FAST_CUDA_ARCHS};
}

}  // namespace seed_fast

TORCH_LIBRARY_FRAGMENT(seed_fast, m) {
  // The CUDA version and the GPU architectures this library was compiled for.
  m.def("_cuda_build_info() -> (str cuda_version, str archs)", &seed_fast::cuda_build_info);
  // Why isa="tc" (tensor cores) cannot run for this CUDA z ("" when it can): the GPU's arch, the
  // arches compiled in, D.
  m.def("_codebook_tc_unsupported(Tensor z) -> str", &seed_fast::codebook_tc_unsupported_cuda);
}

TORCH_LIBRARY_IMPL(seed_fast, CUDA, m) {
  m.impl("_codebook_lookup_indices", &seed_fast::codebook_argmin_cuda);
  m.impl("_codebook_lookup", &seed_fast::codebook_lookup_cuda);
}

// Importing seed_fast._C_cuda runs the registrations above; the module itself holds nothing.
PyMODINIT_FUNC PyInit__C_cuda() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                               "seed_fast's CUDA kernels, under torch.ops.seed_fast", -1, nullptr};
  return PyModule_Create(&module);
}
