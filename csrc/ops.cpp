// The op schemas of the `resattn_fast` namespace and the Python module resattn_fast._C.
//
// Schemas are declared once (csrc/schemas.h) and defined here; each backend registers
// its kernels under the same names (csrc/cpu/<op>.cpp for CPU, kernels/<op>.cu for
// CUDA), so the dispatcher picks by device. Fake (meta) kernels and autograd are registered from Python
// (resattn_fast/ops/_registry.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "schemas.h"

#ifndef RESATTN_CUDA_ARCHS
#define RESATTN_CUDA_ARCHS ""
#endif
#ifndef RESATTN_CUDA_VERSION
#define RESATTN_CUDA_VERSION ""
#endif

TORCH_LIBRARY(resattn_fast, m) { resattn::define_schemas(m); }

namespace {

py::dict build_info() {
  py::dict info;
#ifdef RESATTN_WITH_CUDA
  info["built_with_cuda"] = true;
#else
  info["built_with_cuda"] = false;
#endif
  info["cuda_archs"] = std::string(RESATTN_CUDA_ARCHS);
  info["cuda_version"] = std::string(RESATTN_CUDA_VERSION);
  info["torch_version"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resattn_fast compiled kernels (CPU and, when built, CUDA)";
  m.def("build_info", &build_info, "What this build of the extension contains.");
}
