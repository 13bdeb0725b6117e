// Bilinear interpolation index and weight math shared by the CPU backend
// (csrc/cpu/*.cpp) and the CUDA backend (kernels/*.cu).
//
// It reproduces PyTorch's formula for F.interpolate(mode="bilinear") when an output
// size (not a scale factor) is given, so the fused ops match the reference exactly:
//   align_corners=True : src = dst * (in - 1) / (out - 1)      (0 when out == 1)
//   align_corners=False: src = max((dst + 0.5) * in / out - 0.5, 0)
//   i0 = floor(src), i1 = min(i0 + 1, in - 1), w1 = src - i0, w0 = 1 - w1.
// Because i0 and i1 are non-decreasing in dst, the output indices that read a given
// input index form one contiguous range; the backward gathers over that range, so
// each input element sums its own contributions (deterministic, no atomics).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RESATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RESATTN_HOST_DEVICE inline
#endif

namespace resattn {

// The source-index step for one axis (PyTorch's area_pixel_compute_scale without
// an explicit scale factor).
template <typename acc_t>
RESATTN_HOST_DEVICE acc_t bilinear_scale(int64_t in_size, int64_t out_size, bool align_corners) {
  if (align_corners) {
    return out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1)
                        : static_cast<acc_t>(0);
  }
  return static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
}

// The two input taps and their weights for one output index along one axis.
template <typename acc_t>
struct LinearTap {
  int64_t i0;
  int64_t i1;
  acc_t w0;
  acc_t w1;
};

template <typename acc_t>
RESATTN_HOST_DEVICE LinearTap<acc_t> linear_tap(int64_t dst, int64_t in_size, acc_t scale,
                                                bool align_corners) {
  acc_t src;
  if (align_corners) {
    src = scale * static_cast<acc_t>(dst);
  } else {
    src = scale * (static_cast<acc_t>(dst) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
    src = src < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : src;
  }
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0, so truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  const acc_t w1 = src - static_cast<acc_t>(i0);
  LinearTap<acc_t> tap;
  tap.i0 = i0;
  tap.i1 = i1;
  tap.w0 = static_cast<acc_t>(1) - w1;
  tap.w1 = w1;
  return tap;
}

// Weight with which output index `dst` reads input index `src_index` (0 if it does not).
template <typename acc_t>
RESATTN_HOST_DEVICE acc_t tap_weight(const LinearTap<acc_t>& tap, int64_t src_index) {
  acc_t w = static_cast<acc_t>(0);
  if (tap.i0 == src_index) w += tap.w0;
  if (tap.i1 == src_index) w += tap.w1;
  return w;
}

// The half-open range [*lo, *hi) of output indices whose taps include input index
// `src_index`: the first dst with i1(dst) >= src_index up to the last with
// i0(dst) <= src_index. Binary search, O(log out_size), on the exact forward formula,
// so forward and backward can never disagree about which pixels touch.
template <typename acc_t>
RESATTN_HOST_DEVICE void output_range(int64_t src_index, int64_t in_size, int64_t out_size,
                                      acc_t scale, bool align_corners, int64_t* lo,
                                      int64_t* hi) {
  int64_t a = 0, b = out_size;  // first dst with i1 >= src_index
  while (a < b) {
    const int64_t mid = a + (b - a) / 2;
    if (linear_tap<acc_t>(mid, in_size, scale, align_corners).i1 >= src_index) {
      b = mid;
    } else {
      a = mid + 1;
    }
  }
  *lo = a;
  b = out_size;  // first dst with i0 > src_index
  while (a < b) {
    const int64_t mid = a + (b - a) / 2;
    if (linear_tap<acc_t>(mid, in_size, scale, align_corners).i0 > src_index) {
      b = mid;
    } else {
      a = mid + 1;
    }
  }
  *hi = a;
}

}  // namespace resattn
