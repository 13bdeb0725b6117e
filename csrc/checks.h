// Input checks shared by the CPU and CUDA kernels of every op: a wrong call raises a
// clear error that names the argument (TORCH_CHECK -> RuntimeError in Python), never a
// crash inside a kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace resattn {

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "resattn_fast: ", name, " must be float32, float64, float16 or bfloat16, got ",
              dt);
}

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "resattn_fast: ", name, " must be a 4-D (N, C, H, W) tensor, got ",
              t.dim(), "-D with shape ", t.sizes());
}

inline void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "resattn_fast: ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "resattn_fast: ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// upsample_bilinear_add(x, skip?, size, align_corners): x (N, C, h, w) -> (N, C, H, W).
inline void check_upsample_args(const at::Tensor& x, const std::optional<at::Tensor>& skip,
                                at::IntArrayRef size) {
  check_4d(x, "x");
  check_floating(x, "x");
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "resattn_fast: x must have a non-empty spatial size, got ",
              x.sizes());
  TORCH_CHECK(size.size() == 2, "resattn_fast: size must have two entries (H, W), got ", size);
  TORCH_CHECK(size[0] >= 1 && size[1] >= 1, "resattn_fast: size must be >= 1 in each dimension, got ",
              size);
  if (skip.has_value()) {
    const at::Tensor& s = *skip;
    check_4d(s, "skip");
    check_same(x, "x", s, "skip");
    TORCH_CHECK(s.size(0) == x.size(0) && s.size(1) == x.size(1),
                "resattn_fast: skip must have the same batch and channel sizes as x, got x ",
                x.sizes(), " and skip ", s.sizes());
    TORCH_CHECK(s.size(2) == size[0] && s.size(3) == size[1], "resattn_fast: size ", size,
                " does not match skip's spatial size ", s.sizes());
  }
}

// upsample_bilinear_add_backward(grad, input_size, align_corners): grad (N, C, H, W).
inline void check_upsample_backward_args(const at::Tensor& grad, at::IntArrayRef input_size) {
  check_4d(grad, "grad");
  check_floating(grad, "grad");
  TORCH_CHECK(input_size.size() == 2, "resattn_fast: input_size must have two entries (h, w), got ",
              input_size);
  TORCH_CHECK(input_size[0] >= 1 && input_size[1] >= 1,
              "resattn_fast: input_size must be >= 1 in each dimension, got ", input_size);
  TORCH_CHECK(grad.size(2) >= 1 && grad.size(3) >= 1,
              "resattn_fast: grad must have a non-empty spatial size, got ", grad.sizes());
}

// attention_residual(mask_logits, trunk): two tensors of one shape.
inline void check_attention_args(const at::Tensor& mask_logits, const at::Tensor& trunk) {
  check_floating(mask_logits, "mask_logits");
  check_same(mask_logits, "mask_logits", trunk, "trunk");
  TORCH_CHECK(mask_logits.sizes() == trunk.sizes(),
              "resattn_fast: mask_logits and trunk must have the same shape, got ",
              mask_logits.sizes(), " and ", trunk.sizes());
}

// attention_residual_backward(grad, mask_logits, trunk): grad has trunk's shape, dtype
// and device.
inline void check_attention_grad(const at::Tensor& grad, const at::Tensor& trunk) {
  check_floating(grad, "grad");
  check_same(grad, "grad", trunk, "trunk");
  TORCH_CHECK(grad.sizes() == trunk.sizes(), "resattn_fast: grad must have trunk's shape, got ",
              grad.sizes(), " and ", trunk.sizes());
}

// A per-channel vector of batch_norm_relu: (C,), on x's device, float32 or x's dtype
// (float64 for float64 x). Half x under autocast comes with float32 parameters and
// statistics, as nn.BatchNorm2d accepts.
inline void check_channel_vector(const at::Tensor& v, const char* name, const at::Tensor& x) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "resattn_fast: ", name,
              " must be a 1-D tensor of C = ", x.size(1), " values, got shape ", v.sizes());
  TORCH_CHECK(v.device() == x.device(), "resattn_fast: ", name, " must be on x's device (",
              x.device(), "), got ", v.device());
  const auto dt = v.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == x.scalar_type(), "resattn_fast: ", name,
              " must be float32 or x's dtype (", x.scalar_type(), "), got ", dt);
}

// batch_norm_relu(x, weight?, bias?, running_mean?, running_var?, training, eps).
inline void check_batch_norm_relu_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& running_mean,
                                       const std::optional<at::Tensor>& running_var,
                                       bool training, double eps) {
  check_4d(x, "x");
  check_floating(x, "x");
  TORCH_CHECK(x.size(1) >= 1, "resattn_fast: x must have at least one channel, got ", x.sizes());
  TORCH_CHECK(eps >= 0, "resattn_fast: eps must be >= 0, got ", eps);
  if (weight.has_value()) check_channel_vector(*weight, "weight", x);
  if (bias.has_value()) check_channel_vector(*bias, "bias", x);
  if (running_mean.has_value()) check_channel_vector(*running_mean, "running_mean", x);
  if (running_var.has_value()) check_channel_vector(*running_var, "running_var", x);
  if (training) {
    // PyTorch's own rule and words (torch.nn.functional._verify_batch_size).
    TORCH_CHECK(x.numel() == 0 || x.numel() / x.size(1) > 1,
                "Expected more than 1 value per channel when training, got input size ",
                x.sizes());
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                "resattn_fast: running_mean and running_var are required when training=False");
  }
}

// batch_norm_relu_backward: grad and grad_residual have x's shape, dtype and device;
// mean and var are (C,) in the accumulation dtype.
inline void check_batch_norm_relu_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                                const at::Tensor& mean, const at::Tensor& var,
                                                const std::optional<at::Tensor>& grad_residual) {
  check_4d(x, "x");
  check_floating(x, "x");
  check_same(grad, "grad", x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes(), "resattn_fast: grad must have x's shape, got ",
              grad.sizes(), " and ", x.sizes());
  if (grad_residual.has_value()) {
    check_same(*grad_residual, "grad_residual", x, "x");
    TORCH_CHECK(grad_residual->sizes() == x.sizes(),
                "resattn_fast: grad_residual must have x's shape, got ", grad_residual->sizes(),
                " and ", x.sizes());
  }
  check_channel_vector(mean, "mean", x);
  check_channel_vector(var, "var", x);
}

// num_batches_tracked, when given: one int64 value on running_mean's device.
inline void check_num_batches_tracked(const std::optional<at::Tensor>& num_batches_tracked,
                                      const at::Tensor& running_mean) {
  if (!num_batches_tracked.has_value() || !num_batches_tracked->defined()) return;
  const at::Tensor& n = *num_batches_tracked;
  TORCH_CHECK(n.scalar_type() == at::kLong && n.numel() == 1,
              "resattn_fast: num_batches_tracked must hold one int64 value, got ", n.scalar_type(),
              " of shape ", n.sizes());
  TORCH_CHECK(n.device() == running_mean.device(),
              "resattn_fast: num_batches_tracked must be on running_mean's device (",
              running_mean.device(), "), got ", n.device());
}

// batch_norm_relu_with_update(x, weight?, bias?, running_mean!, running_var!, momentum, eps,
// num_batches_tracked!?): batch_norm_relu's training checks, and the running tensors'.
inline void check_batch_norm_relu_with_update_args(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps,
    const std::optional<at::Tensor>& num_batches_tracked) {
  check_batch_norm_relu_args(x, weight, bias, running_mean, running_var, true, eps);
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
              "resattn_fast: running_mean and running_var must have the same dtype, got ",
              running_mean.scalar_type(), " and ", running_var.scalar_type());
  check_num_batches_tracked(num_batches_tracked, running_mean);
}

// batch_norm_update_stats(running_mean!, running_var!, mean, var, momentum, count,
// num_batches_tracked!?).
inline void check_batch_norm_update_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                         const at::Tensor& mean, const at::Tensor& var,
                                         int64_t count,
                                         const std::optional<at::Tensor>& num_batches_tracked) {
  check_num_batches_tracked(num_batches_tracked, running_mean);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{running_mean, "running_mean"},
                                {running_var, "running_var"}, {mean, "mean"}, {var, "var"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == running_mean.size(0), "resattn_fast: ", name,
                " must be a 1-D tensor of ", running_mean.size(0), " values, got shape ", t.sizes());
    TORCH_CHECK(t.device() == running_mean.device(), "resattn_fast: ", name,
                " must be on running_mean's device (", running_mean.device(), "), got ", t.device());
    check_floating(t, name);
  }
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
              "resattn_fast: running_mean and running_var must have the same dtype, got ",
              running_mean.scalar_type(), " and ", running_var.scalar_type());
  TORCH_CHECK(count > 1, "resattn_fast: count must be > 1 (values per channel), got ", count);
}

// The memory format a 4-D result should take to follow `t` (channels_last stays
// channels_last; anything else becomes contiguous NCHW).
inline at::MemoryFormat follow_format(const at::Tensor& t) {
  if (t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

}  // namespace resattn
