// The raw-pointer interface between the tensor-level CPU ops (upsample_bilinear_add.cpp,
// attention_residual.cpp, batch_norm_relu.cpp) and the vectorised kernels, which are compiled once per
// instruction set (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp) and picked
// at run time by cpu_kernels(). Only plain structs cross this boundary: no at::Tensor,
// so the ISA-specific translation units instantiate as little shared inline code as
// possible (see isa_prelude.h for why that matters).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace resattn {
namespace cpu {

// Forward taps of one axis (resattn::linear_tap per output index). Weights are acc_t
// arrays: double for float64 tensors, float otherwise.
struct AxisTaps {
  const int64_t* i0;
  const int64_t* i1;
  const void* w0;
  const void* w1;
};

// Backward gather of one axis: input index i is read by the output indices [lo[i], hi[i])
// with weights w[off[i] + (o - lo[i])] (resattn::output_range / tap_weight); acc_t as above.
struct AxisGather {
  const int64_t* lo;
  const int64_t* hi;
  const int64_t* off;
  const void* w;
};

// x (N, C, h, w) [+ skip (N, C, H, W)] -> out (N, C, H, W); all three dense in one format.
struct UpsampleForwardArgs {
  c10::ScalarType dtype;
  bool channels_last;
  int64_t N, C, h, w, H, W;
  const void* x;
  const void* skip;  // nullptr: plain upsample
  void* out;
  AxisTaps rows;  // H entries
  AxisTaps cols;  // W entries
};

// grad (N, C, H, W) -> grad_x (N, C, h, w); both dense in one format.
struct UpsampleBackwardArgs {
  c10::ScalarType dtype;
  bool channels_last;
  int64_t N, C, h, w, H, W;
  const void* grad;
  void* grad_x;
  AxisGather rows;  // h entries
  AxisGather cols;  // w entries
};

// Elementwise over n elements of tensors that share one dense layout.
struct AttentionForwardArgs {
  c10::ScalarType dtype;
  int64_t n;
  const void* mask_logits;
  const void* trunk;
  void* out;
};

struct AttentionBackwardArgs {
  c10::ScalarType dtype;
  int64_t n;
  const void* grad;
  const void* mask_logits;
  const void* trunk;
  void* grad_mask_logits;
  void* grad_trunk;
};

// batch_norm_relu: x (N, C, H, W) dense, NCHW or channels_last (then rows of C contiguous
// values); HW = H * W. The per-channel arrays are acc_t (double for float64 x, float
// otherwise), C values each, contiguous; x, grad, residual and the outputs have x's dtype
// and one layout.
struct BatchNormShape {
  c10::ScalarType dtype;
  bool channels_last;
  int64_t N, C, HW;
};

// Batch mean and biased variance over (N, H, W) per channel.
struct BatchNormStatsArgs {
  BatchNormShape s;
  const void* x;
  void* mean;
  void* var;
};

// out = relu((x - mean) * scale + bias).
struct BatchNormForwardArgs {
  BatchNormShape s;
  const void* x;
  void* out;
  const void* mean;
  const void* scale;
  const void* bias;
};

// Per channel, with dy = grad where (x - mean) * scale + bias > 0, else 0:
// sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)).
struct BatchNormBackwardReduceArgs {
  BatchNormShape s;
  const void* grad;
  const void* x;
  const void* mean;
  const void* scale;
  const void* bias;
  void* sum_dy;
  void* sum_dy_xmu;
};

// grad_x = scale * (dy - k_mean - (x - mean) * k_xmu) [+ residual]; k_mean and k_xmu
// nullptr: grad_x = scale * dy [+ residual] (eval).
struct BatchNormBackwardApplyArgs {
  BatchNormShape s;
  const void* grad;
  const void* x;
  const void* residual;  // nullptr: none
  void* grad_x;
  const void* mean;
  const void* scale;
  const void* bias;
  const void* k_mean;
  const void* k_xmu;
};

struct CpuKernels {
  const char* isa;  // "DEFAULT", "AVX2" or "AVX512"
  void (*upsample_forward)(const UpsampleForwardArgs&);
  void (*upsample_backward)(const UpsampleBackwardArgs&);
  void (*attention_forward)(const AttentionForwardArgs&);
  void (*attention_backward)(const AttentionBackwardArgs&);
  void (*bn_stats)(const BatchNormStatsArgs&);
  void (*bn_forward)(const BatchNormForwardArgs&);
  void (*bn_backward_reduce)(const BatchNormBackwardReduceArgs&);
  void (*bn_backward_apply)(const BatchNormBackwardApplyArgs&);
};

// Kernel tables, one per ISA; kernels_avx2()/kernels_avx512() return nullptr when the
// compiler could not build them (non-GCC or non-x86 builds).
const CpuKernels* kernels_default();
const CpuKernels* kernels_avx2();
const CpuKernels* kernels_avx512();

// The table for this machine, chosen once: the best ISA that both PyTorch's own choice
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY=default|avx2|avx512) and
// the CPU itself allow.
const CpuKernels& cpu_kernels();

}  // namespace cpu
}  // namespace resattn
