// Vectorised kernels of attention_residual and its backward, compiled once per ISA
// (included by kernels_<isa>.cpp after <ATen/cpu/vec/vec.h>). One pass over memory each.
//
// The vector body evaluates the formulas of kernels/sigmoid.h on Vectorized<acc_t>
// lanes, in the same order of operations (float32 lanes with a faster exp, see
// sigmoid_vec):
//   s = 1 / (1 + exp(-m));  out = (1 + s) * trunk
//   grad_trunk = g * (1 + s);  grad_m = g * trunk * s * (1 - s)
// and the scalar remainder of every task calls sigmoid.h itself.
#pragma once

#include "vec_io.h"

namespace resattn {
namespace cpu {
namespace CPU_CAPABILITY {

// Elements per at::parallel_for task (about 128 KiB of float32 per input).
constexpr int64_t kAttentionGrain = 1 << 15;

template <typename Vec>
inline Vec sigmoid_vec(const Vec& m) {
  const Vec one(1);
  if constexpr (std::is_same<typename Vec::value_type, float>::value) {
    // float32: at::vec's inline polynomial exp (PyTorch's CPU flash attention uses it):
    // a few ulp, far inside float32's test tolerance, and no out-of-line SLEEF call that
    // spills every live vector register. It saturates like sigmoid.h: exp(-m) is 0
    // below -87.3 (s = 1) and FLT_MAX above 88.7 (s ~ 3e-39 instead of 0).
    return one / (one + m.neg().exp_u20());
  } else {
    // exp(-m) overflows to inf for m << 0 and 1 / inf = 0, as in sigmoid.h.
    return one / (one + m.neg().exp());
  }
}

template <typename scalar_t>
void attention_forward_typed(const AttentionForwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const auto* m = static_cast<const scalar_t*>(a.mask_logits);
  const auto* f = static_cast<const scalar_t*>(a.trunk);
  auto* out = static_cast<scalar_t*>(a.out);
  const bool stream = want_stream(a.n * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, a.n, kAttentionGrain, [&](int64_t begin, int64_t end) {
    const Vec one(1);
    const int64_t head = stream ? align_index(out, begin, end) : begin;
    for (int64_t i = begin; i < head; ++i) {
      out[i] = static_cast<scalar_t>(resattn::attention_residual_forward<acc_t>(
          static_cast<acc_t>(m[i]), static_cast<acc_t>(f[i])));
    }
    int64_t i = head;
    for (; i + kChunk <= end; i += kChunk) {
      Vec m0, m1, f0, f1;
      IO::load(m + i, m0, m1);
      IO::load(f + i, f0, f1);
      store_chunk<scalar_t>(out + i, (one + sigmoid_vec(m0)) * f0, (one + sigmoid_vec(m1)) * f1,
                            stream);
    }
    for (; i < end; ++i) {
      out[i] = static_cast<scalar_t>(resattn::attention_residual_forward<acc_t>(
          static_cast<acc_t>(m[i]), static_cast<acc_t>(f[i])));
    }
    if (stream) stream_fence();
  });
}

template <typename scalar_t>
void attention_backward_typed(const AttentionBackwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const auto* g = static_cast<const scalar_t*>(a.grad);
  const auto* m = static_cast<const scalar_t*>(a.mask_logits);
  const auto* f = static_cast<const scalar_t*>(a.trunk);
  auto* gm = static_cast<scalar_t*>(a.grad_mask_logits);
  auto* gf = static_cast<scalar_t*>(a.grad_trunk);
  const bool stream = want_stream(a.n * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, a.n, kAttentionGrain, [&](int64_t begin, int64_t end) {
    const Vec one(1);
    // gm and gf are both fresh allocations (64-byte aligned), so one offset aligns both.
    const int64_t head = stream ? align_index(gf, begin, end) : begin;
    auto scalar = [&](int64_t i) {
      acc_t grad_m, grad_f;
      resattn::attention_residual_backward<acc_t>(static_cast<acc_t>(g[i]),
                                                  static_cast<acc_t>(m[i]),
                                                  static_cast<acc_t>(f[i]), &grad_m, &grad_f);
      gm[i] = static_cast<scalar_t>(grad_m);
      gf[i] = static_cast<scalar_t>(grad_f);
    };
    for (int64_t i = begin; i < head; ++i) scalar(i);
    int64_t i = head;
    for (; i + kChunk <= end; i += kChunk) {
      Vec g0, g1, m0, m1, f0, f1;
      IO::load(g + i, g0, g1);
      IO::load(m + i, m0, m1);
      IO::load(f + i, f0, f1);
      const Vec s0 = sigmoid_vec(m0);
      const Vec s1 = sigmoid_vec(m1);
      store_chunk<scalar_t>(gf + i, g0 * (one + s0), g1 * (one + s1), stream);
      store_chunk<scalar_t>(gm + i, g0 * f0 * s0 * (one - s0), g1 * f1 * s1 * (one - s1), stream);
    }
    for (; i < end; ++i) scalar(i);
    if (stream) stream_fence();
  });
}

// dtype was validated by the caller (csrc/checks.h); anything else is unreachable.
inline void attention_forward(const AttentionForwardArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return attention_forward_typed<float>(a);
    case c10::ScalarType::Double: return attention_forward_typed<double>(a);
    case c10::ScalarType::Half: return attention_forward_typed<c10::Half>(a);
    case c10::ScalarType::BFloat16: return attention_forward_typed<c10::BFloat16>(a);
    default: return;
  }
}

inline void attention_backward(const AttentionBackwardArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return attention_backward_typed<float>(a);
    case c10::ScalarType::Double: return attention_backward_typed<double>(a);
    case c10::ScalarType::Half: return attention_backward_typed<c10::Half>(a);
    case c10::ScalarType::BFloat16: return attention_backward_typed<c10::BFloat16>(a);
    default: return;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace resattn
