// The op schemas of the `resattn_fast` namespace and the Python module resattn_fast._C.
//
// Schemas are declared once (csrc/schemas.h) and defined here; each backend registers
// its kernels under the same names (csrc/cpu/<op>.cpp for CPU, kernels/<op>.cu for
// CUDA), so the dispatcher picks by device. Fake (meta) kernels and autograd are registered from Python
// (resattn_fast/ops/_registry.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "cpu/dispatch.h"
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
  // The CPU kernel table chosen at run time (capped by ATEN_CPU_CAPABILITY): "DEFAULT",
  // "AVX2" or "AVX512".
  info["cpu_isa"] = std::string(resattn::cpu::cpu_kernels().isa);
  py::list built;  // the tables this compiler could build, whether or not this CPU runs them
  for (const auto* k : {resattn::cpu::kernels_default(), resattn::cpu::kernels_avx2(),
                        resattn::cpu::kernels_avx512()}) {
    if (k != nullptr) built.append(std::string(k->isa));
  }
  info["cpu_isas_built"] = built;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resattn_fast compiled kernels (CPU and, when built, CUDA)";
  m.def("build_info", &build_info, "What this build of the extension contains.");
}
