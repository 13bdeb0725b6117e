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
  // relu(batch_norm(x)) with the statistics it normalised with: (out, mean, var), mean and
  // var (C,) in the accumulation dtype (float32; float64 for float64 x). training: the
  // batch's mean and biased variance over (N, H, W); else running_mean / running_var
  // (required). Running statistics are never written here (batch_norm_update_stats).
  m.def(
      "batch_norm_relu(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias) from grad and the forward's inputs and statistics; the
  // ReLU mask and x_hat are recomputed. grad_residual (x's shape), when given, is added to
  // grad_x in the same pass (the identity shortcut's gradient). weight_grads=false: the
  // last two are empty and, in eval, the reduction pass is skipped.
  m.def(
      "batch_norm_relu_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor var, bool training, float eps, Tensor? grad_residual, "
      "bool weight_grads) -> (Tensor, Tensor, Tensor)");
  // running = (1 - momentum) * running + momentum * batch, with the unbiased variance
  // (var * count / (count - 1)) into running_var, and num_batches_tracked (int64, one
  // value), when not None, incremented by one: one launch for all three (nn.BatchNorm2d's
  // separate `num_batches_tracked += 1` is folded in). No default for it: torch 2.11's
  // custom-op autograd layer indexes every mutable argument positionally.
  m.def(
      "batch_norm_update_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
      "Tensor var, float momentum, int count, Tensor(c!)? num_batches_tracked) -> ()");
  // Training batch_norm_relu and batch_norm_update_stats in one call: (out, mean, var) as
  // batch_norm_relu(training=true), and the running statistics (and num_batches_tracked)
  // updated from the batch's statistics in the same launches (the CUDA kernels: by the
  // normalise kernel's first block; no launch of its own), with count = N*H*W; an
  // empty x leaves them unchanged and still counts the batch. Forward only (mutable ops
  // take no register_autograd): resattn_fast.ops.batch_norm_relu differentiates it with
  // batch_norm_relu_backward.
  m.def(
      "batch_norm_relu_with_update(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, float momentum, float eps, Tensor(c!)? num_batches_tracked) -> "
      "(Tensor, Tensor, Tensor)");
}

}  // namespace resattn
