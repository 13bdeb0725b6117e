// The attention-residual math shared by the CPU backend (csrc/cpu/attention_residual.cpp)
// and the CUDA backend (kernels/attention_residual.cu). Always evaluated in float32 (or
// float64) so half types round once, at the store.
//   forward : out = (1 + s) * trunk,                 s = sigmoid(m)
//   backward: grad_trunk = g * (1 + s), grad_m = g * trunk * s * (1 - s)
#pragma once

#include <cmath>

#include "bilinear.h"  // RESATTN_HOST_DEVICE

namespace resattn {

template <typename acc_t>
RESATTN_HOST_DEVICE acc_t sigmoid(acc_t x) {
  // 1 / (1 + exp(-x)) saturates cleanly to 0 or 1 for large |x| (exp overflows to inf,
  // 1/inf = 0), and never produces NaN for finite x.
  return static_cast<acc_t>(1) / (static_cast<acc_t>(1) + exp(-x));
}

template <typename acc_t>
RESATTN_HOST_DEVICE acc_t attention_residual_forward(acc_t m, acc_t trunk) {
  return (static_cast<acc_t>(1) + sigmoid(m)) * trunk;
}

template <typename acc_t>
RESATTN_HOST_DEVICE void attention_residual_backward(acc_t g, acc_t m, acc_t trunk,
                                                     acc_t* grad_m, acc_t* grad_trunk) {
  const acc_t s = sigmoid(m);
  *grad_trunk = g * (static_cast<acc_t>(1) + s);
  *grad_m = g * trunk * s * (static_cast<acc_t>(1) - s);
}

}  // namespace resattn
