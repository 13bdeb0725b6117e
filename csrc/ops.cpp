// The op schemas of the `resattn_fast` namespace and the Python module resattn_fast._C.
//
// Schemas are declared once here; each backend registers its kernels under the same
// names (csrc/cpu/<op>.cpp for CPU, kernels/<op>.cu for CUDA), so the dispatcher picks
// by device. Fake (meta) kernels and autograd are registered from Python
// (resattn_fast/ops/_registry.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#ifndef RESATTN_CUDA_ARCHS
#define RESATTN_CUDA_ARCHS ""
#endif
#ifndef RESATTN_CUDA_VERSION
#define RESATTN_CUDA_VERSION ""
#endif

TORCH_LIBRARY(resattn_fast, m) {
  // out = bilinear_upsample(x, size, align_corners) (+ skip when given); size == skip's H, W.
  m.def("upsample_bilinear_add(Tensor x, Tensor? skip, int[] size, bool align_corners) -> Tensor");
  // grad_x = adjoint of the interpolation applied to grad (N, C, H, W) -> (N, C, h, w).
  m.def(
      "upsample_bilinear_add_backward(Tensor grad, int[] input_size, bool align_corners) -> "
      "Tensor");
  // out = (1 + sigmoid(mask_logits)) * trunk.
  m.def("attention_residual(Tensor mask_logits, Tensor trunk) -> Tensor");
  // (grad_mask_logits, grad_trunk).
  m.def(
      "attention_residual_backward(Tensor grad, Tensor mask_logits, Tensor trunk) -> "
      "(Tensor, Tensor)");
}

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
