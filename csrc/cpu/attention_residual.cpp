// CPU kernels of resattn_fast::attention_residual and its backward (schemas in
// csrc/ops.cpp): input checks and memory layouts; the fused vectorised loops live in
// attention_residual_kernel.h and the math in kernels/sigmoid.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cpu/dispatch.h"

namespace resattn {
namespace cpu {
namespace {

// `t` laid out exactly like `like` (same sizes and strides; `like` is dense), copying
// only when it is not already. Makes every operand of the elementwise kernels share one
// flat index space.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;  // same sizes and strides as a dense tensor
  at::Tensor copy = at::empty_like(like);
  copy.copy_(t);
  return copy;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "resattn_fast: ", name, " must be a CPU tensor for the cpu backend, got ",
              t.device());
}

// out = (1 + sigmoid(mask_logits)) * trunk, laid out like trunk (empty_like's
// preserve_format: trunk's strides when it is dense, else its suggested memory format).
at::Tensor attention_residual_cpu(const at::Tensor& mask_logits, const at::Tensor& trunk) {
  check_attention_args(mask_logits, trunk);
  check_cpu(trunk, "trunk");
  at::Tensor out = at::empty_like(trunk);
  if (out.numel() == 0) return out;
  const at::Tensor f = in_layout_of(trunk, out);
  const at::Tensor m = in_layout_of(mask_logits, out);
  AttentionForwardArgs args{};
  args.dtype = out.scalar_type();
  args.n = out.numel();
  args.mask_logits = m.const_data_ptr();
  args.trunk = f.const_data_ptr();
  args.out = out.mutable_data_ptr();
  cpu_kernels().attention_forward(args);
  return out;
}

// (grad_mask_logits like mask_logits, grad_trunk like trunk), one pass over the inputs.
std::tuple<at::Tensor, at::Tensor> attention_residual_backward_cpu(const at::Tensor& grad,
                                                                   const at::Tensor& mask_logits,
                                                                   const at::Tensor& trunk) {
  check_attention_args(mask_logits, trunk);
  check_attention_grad(grad, trunk);
  check_cpu(trunk, "trunk");
  at::Tensor grad_trunk = at::empty_like(trunk);
  at::Tensor grad_m = at::empty_like(mask_logits);
  if (grad_trunk.numel() == 0) return {grad_m, grad_trunk};
  // Compute in grad_trunk's layout; grad_m gets it too unless mask_logits is laid out
  // differently, in which case one extra copy puts it in mask_logits' layout.
  const bool direct = grad_m.strides() == grad_trunk.strides();
  at::Tensor grad_m_work = direct ? grad_m : at::empty_like(grad_trunk);
  const at::Tensor g = in_layout_of(grad, grad_trunk);
  const at::Tensor m = in_layout_of(mask_logits, grad_trunk);
  const at::Tensor f = in_layout_of(trunk, grad_trunk);
  AttentionBackwardArgs args{};
  args.dtype = trunk.scalar_type();
  args.n = trunk.numel();
  args.grad = g.const_data_ptr();
  args.mask_logits = m.const_data_ptr();
  args.trunk = f.const_data_ptr();
  args.grad_mask_logits = grad_m_work.mutable_data_ptr();
  args.grad_trunk = grad_trunk.mutable_data_ptr();
  cpu_kernels().attention_backward(args);
  if (!direct) grad_m.copy_(grad_m_work);
  return {grad_m, grad_trunk};
}

}  // namespace
}  // namespace cpu
}  // namespace resattn

TORCH_LIBRARY_IMPL(resattn_fast, CPU, m) {
  m.impl("attention_residual", &resattn::cpu::attention_residual_cpu);
  m.impl("attention_residual_backward", &resattn::cpu::attention_residual_backward_cpu);
}
