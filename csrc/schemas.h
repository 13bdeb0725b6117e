// The op schemas of resattn_fast, declared once: csrc/ops.cpp defines them in the
// `resattn_fast` namespace, and the emulated CUDA build (csrc/emulation/module.cpp) defines
// the same schemas in `resattn_fast_emulated`, where its kernels register for CPU tensors.
#pragma once

#include <torch/library.h>

namespace resattn {

inline void define_schemas(torch::Library& m) {
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

}  // namespace resattn
