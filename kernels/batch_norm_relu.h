// The batch_norm_relu math shared by the CPU backend (csrc/cpu/batch_norm_relu*.{h,cpp})
// and the CUDA backend (kernels/batch_norm_relu.cu), evaluated in acc_t (float32, or
// float64 for float64 tensors) so half types round once, at the store.
//
//   invstd = 1 / sqrt(var + eps)                           (var: biased, per channel)
//   scale  = weight * invstd                               (weight = 1 when absent)
//   y      = (x - mean) * scale + bias;  out = relu(y)     (bias = 0 when absent)
//
// Backward, from x and the per-channel mean / var only (never the output):
//   x_hat = (x - mean) * invstd;  dy = grad if y > 0 else 0    (the recomputed ReLU mask)
//   grad_bias = sum(dy);  grad_weight = sum(dy * x_hat)        (sums over N, H, W)
//   training: grad_x = scale * (dy - grad_bias / M - x_hat * grad_weight / M)   M = N*H*W
//   eval    : grad_x = scale * dy
//   (+ grad_residual, the identity shortcut's gradient, in the same pass)
// Running statistics: running = (1 - momentum) * running + momentum * batch, with the
// unbiased variance var * M / (M - 1) into running_var.
#pragma once

#include <cmath>
#include <cstdint>

#include "bilinear.h"  // RESATTN_HOST_DEVICE

namespace resattn {

// On a GPU, rsqrt (as PyTorch's own CUDA batch norm): a hardware approximation refined to
// within 2 ulp of 1 / sqrt, without the IEEE sqrt and division's slow-path subroutine calls
// (which cost the elementwise kernels a stack frame). Elsewhere 1 / sqrt, correctly rounded.
template <typename acc_t>
RESATTN_HOST_DEVICE acc_t bn_invstd(acc_t var, acc_t eps) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    return rsqrtf(var + eps);
  } else {
    return rsqrt(var + eps);
  }
#else
  return static_cast<acc_t>(1) / sqrt(var + eps);
#endif
}

// relu((x - mean) * scale + bias): y < 0 -> 0, NaN propagates (as torch.relu).
template <typename acc_t>
RESATTN_HOST_DEVICE acc_t bn_relu_forward(acc_t x, acc_t mean, acc_t scale, acc_t bias) {
  const acc_t y = (x - mean) * scale + bias;
  return y < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : y;
}

// The gradient reaching the batch norm's output: grad where the ReLU passed (y > 0).
template <typename acc_t>
RESATTN_HOST_DEVICE acc_t bn_relu_dy(acc_t grad, acc_t x, acc_t mean, acc_t scale, acc_t bias) {
  const acc_t y = (x - mean) * scale + bias;
  return y > static_cast<acc_t>(0) ? grad : static_cast<acc_t>(0);
}

// grad_x of one element, training mode. k_mean = grad_bias / M, k_xhat = grad_weight / M.
template <typename acc_t>
RESATTN_HOST_DEVICE acc_t bn_relu_grad_x_train(acc_t dy, acc_t x, acc_t mean, acc_t invstd,
                                               acc_t scale, acc_t k_mean, acc_t k_xhat) {
  const acc_t x_hat = (x - mean) * invstd;
  return scale * (dy - k_mean - x_hat * k_xhat);
}

// Chan et al.'s parallel combination of two (count, mean, M2) partial statistics into a:
// numerically stable, and with a fixed combination order the result is bit-identical
// run to run.
template <typename acc_t>
RESATTN_HOST_DEVICE void welford_combine(acc_t& n_a, acc_t& mean_a, acc_t& m2_a, acc_t n_b,
                                         acc_t mean_b, acc_t m2_b) {
  if (n_b == static_cast<acc_t>(0)) return;
  if (n_a == static_cast<acc_t>(0)) {
    n_a = n_b;
    mean_a = mean_b;
    m2_a = m2_b;
    return;
  }
  const acc_t n = n_a + n_b;
  const acc_t delta = mean_b - mean_a;
  const acc_t frac_b = n_b / n;
  mean_a = mean_a + delta * frac_b;
  m2_a = m2_a + m2_b + delta * delta * n_a * frac_b;
  n_a = n;
}

// One running-statistics update (nn.BatchNorm2d's formula; momentum is the
// exponential_average_factor, 1 / num_batches_tracked when momentum=None).
template <typename acc_t>
RESATTN_HOST_DEVICE void bn_update_running(acc_t& running_mean, acc_t& running_var, acc_t mean,
                                           acc_t var, acc_t momentum, int64_t count) {
  const acc_t unbiased = var * static_cast<acc_t>(count) / static_cast<acc_t>(count - 1);
  running_mean = momentum * mean + (static_cast<acc_t>(1) - momentum) * running_mean;
  running_var = momentum * unbiased + (static_cast<acc_t>(1) - momentum) * running_var;
}

}  // namespace resattn
