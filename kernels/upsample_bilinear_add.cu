// CUDA kernels of resattn_fast::upsample_bilinear_add and its backward.
//
//   forward : out = bilinear_upsample(x, (H, W), align_corners) (+ skip)
//   backward: grad_x = adjoint of the interpolation applied to grad, as a gather
//
// Layouts. The result follows skip's memory format (x's without skip); x and skip are
// made contiguous in that format first. NCHW: one thread per VEC outputs along a row
// (vector skip loads and output stores of up to 128 bits: the widest that divides W and
// suits the pointers' alignment). channels_last: one thread per VEC channels of an
// output pixel, every load and store a 128-bit vector when C is a multiple of VEC
// (else VEC = 1).
//
// Backward. One thread per input element (per VEC channels in channels_last) sums, in
// float32 (float64 for double), every output that reads it: the rows and columns of
// that set are the ranges resattn::output_range returns, and each term's weight is
// resattn::tap_weight of the forward's own taps. Each output of the kernel is written
// exactly once, by one thread, in a fixed order: deterministic, no atomics, no
// zero-fill pass. The per-axis ranges and taps are computed once per block into shared
// memory (when they fit; else in-thread from the same functions).
//
// The index and weight math is kernels/bilinear.h, which the CPU backend runs too.
// Index arithmetic is 32-bit when every offset fits, else 64-bit; all loops are
// grid-stride with a 64-bit counter.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "bilinear.h"
#include "checks.h"
#include "cuda_common.cuh"  // also the spellings shared with the emulated build (csrc/emulation/)

namespace resattn {
namespace cuda {
namespace {

// Shared memory a block may use for the backward's axis tables without opting in.
constexpr int64_t kMaxTableBytes = 48 * 1024;
// The backward's gather loops would otherwise take 70-96 registers a thread (3 blocks of
// 256 per SM); capping them at 64 keeps 4 blocks resident for more loads in flight. The
// channels_last kernel's rare paths (64-bit indices for huge tensors, in-thread tables for
// huge planes) need more than 64 and would spill there: they get 3 blocks' worth (~80).
constexpr int kBackwardBlocksPerSM = 4;
template <typename index_t, bool kTabled>
constexpr int backward_cl_blocks_per_sm() {
  return sizeof(index_t) == 4 && kTabled ? kBackwardBlocksPerSM : 3;
}

// One spatial axis of the interpolation (input size -> output size), with optional
// block-shared tables of its output ranges (per input index) and taps (per output index).
template <typename acc_t>
struct Axis {
  int64_t in_size;
  int64_t out_size;
  acc_t scale;
  bool align_corners;
  bool tabled;  // host-side choice; kernels take it as the template flag kTabled
  int32_t* lo;  // [in_size]  first output index reading input j
  int32_t* hi;  // [in_size]  one past the last
  int32_t* i0;  // [out_size] taps of output o
  int32_t* i1;
  acc_t* w0;
  acc_t* w1;

  template <bool kTabled>
  __device__ __forceinline__ void range(int64_t j, int64_t* a, int64_t* b) const {
    if constexpr (kTabled) {
      *a = lo[j];
      *b = hi[j];
    } else {
      output_range<acc_t>(j, in_size, out_size, scale, align_corners, a, b);
    }
  }

  // Weight with which output o reads input j.
  template <bool kTabled>
  __device__ __forceinline__ acc_t weight(int64_t o, int64_t j) const {
    LinearTap<acc_t> tap;
    if constexpr (kTabled) {
      tap.i0 = i0[o];
      tap.i1 = i1[o];
      tap.w0 = w0[o];
      tap.w1 = w1[o];
    } else {
      tap = linear_tap<acc_t>(o, in_size, scale, align_corners);
    }
    return tap_weight<acc_t>(tap, j);
  }

  // Block-cooperative fill of the tables (caller synchronises).
  __device__ void fill() {
    for (int64_t j = threadIdx.x; j < in_size; j += blockDim.x) {
      int64_t a, b;
      output_range<acc_t>(j, in_size, out_size, scale, align_corners, &a, &b);
      lo[j] = static_cast<int32_t>(a);
      hi[j] = static_cast<int32_t>(b);
    }
    for (int64_t o = threadIdx.x; o < out_size; o += blockDim.x) {
      const LinearTap<acc_t> tap = linear_tap<acc_t>(o, in_size, scale, align_corners);
      i0[o] = static_cast<int32_t>(tap.i0);
      i1[o] = static_cast<int32_t>(tap.i1);
      w0[o] = tap.w0;
      w1[o] = tap.w1;
    }
  }
};

template <typename acc_t>
Axis<acc_t> make_axis(int64_t in_size, int64_t out_size, bool align_corners) {
  Axis<acc_t> a{};
  a.in_size = in_size;
  a.out_size = out_size;
  a.scale = bilinear_scale<acc_t>(in_size, out_size, align_corners);
  a.align_corners = align_corners;
  a.tabled = false;
  return a;
}

template <typename acc_t>
int64_t table_bytes(const Axis<acc_t>& ay, const Axis<acc_t>& ax) {
  const int64_t outs = ay.out_size + ax.out_size;
  const int64_t ins = ay.in_size + ax.in_size;
  return 2 * outs * static_cast<int64_t>(sizeof(acc_t)) + 4 * (2 * outs + 2 * ins);
}

// Points both axes' tables into dynamic shared memory and fills them (all threads of the
// block must call this: it synchronises).
template <typename acc_t, bool kTabled>
__device__ __forceinline__ void setup_tables(Axis<acc_t>& ay, Axis<acc_t>& ax, unsigned char* smem) {
  if constexpr (!kTabled) return;
  acc_t* a = reinterpret_cast<acc_t*>(smem);
  ay.w0 = a; a += ay.out_size;
  ay.w1 = a; a += ay.out_size;
  ax.w0 = a; a += ax.out_size;
  ax.w1 = a; a += ax.out_size;
  int32_t* q = reinterpret_cast<int32_t*>(a);
  ay.i0 = q; q += ay.out_size;
  ay.i1 = q; q += ay.out_size;
  ax.i0 = q; q += ax.out_size;
  ax.i1 = q; q += ax.out_size;
  ay.lo = q; q += ay.in_size;
  ay.hi = q; q += ay.in_size;
  ax.lo = q; q += ax.in_size;
  ax.hi = q;
  ay.fill();
  ax.fill();
  __syncthreads();
}

// ---------------------------------------------------------------------------- forward
// NCHW: item li covers outputs [li*VEC, li*VEC + VEC) of the flat (N*C, H, W) output.
template <typename scalar_t, typename index_t, int VEC>
__global__ void upsample_forward_nchw_kernel(const scalar_t* __restrict__ x,
                                             const scalar_t* __restrict__ skip,
                                             scalar_t* __restrict__ out, int64_t items,
                                             index_t h, index_t w, index_t H, index_t W,
                                             at::opmath_type<scalar_t> scale_h,
                                             at::opmath_type<scalar_t> scale_w,
                                             bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const index_t wv = W / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += stride) {
    const index_t li = static_cast<index_t>(i);
    const index_t xv = li % wv;
    const index_t t = li / wv;
    const index_t oy = t % H;
    const index_t plane = t / H;
    const LinearTap<acc_t> ty = linear_tap<acc_t>(oy, h, scale_h, align_corners);
    const scalar_t* r0 = x + (plane * h + static_cast<index_t>(ty.i0)) * w;
    const scalar_t* r1 = x + (plane * h + static_cast<index_t>(ty.i1)) * w;
    vec_t sv;
    if (skip != nullptr) sv = reinterpret_cast<const vec_t*>(skip)[li];
    vec_t ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const LinearTap<acc_t> tx = linear_tap<acc_t>(xv * VEC + k, w, scale_w, align_corners);
      // PyTorch's order of operations (upsample_bilinear2d), in acc_t.
      acc_t v = ty.w0 * (tx.w0 * static_cast<acc_t>(r0[tx.i0]) + tx.w1 * static_cast<acc_t>(r0[tx.i1])) +
                ty.w1 * (tx.w0 * static_cast<acc_t>(r1[tx.i0]) + tx.w1 * static_cast<acc_t>(r1[tx.i1]));
      if (skip != nullptr) v += static_cast<acc_t>(sv.val[k]);
      ov.val[k] = static_cast<scalar_t>(v);
    }
    reinterpret_cast<vec_t*>(out)[li] = ov;
  }
}

// channels_last: item li covers channels [cv*VEC, cv*VEC + VEC) of one output pixel.
template <typename scalar_t, typename index_t, int VEC>
__global__ void upsample_forward_cl_kernel(const scalar_t* __restrict__ x,
                                           const scalar_t* __restrict__ skip,
                                           scalar_t* __restrict__ out, int64_t items, index_t C,
                                           index_t h, index_t w, index_t H, index_t W,
                                           at::opmath_type<scalar_t> scale_h,
                                           at::opmath_type<scalar_t> scale_w,
                                           bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const index_t cvs = C / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += stride) {
    const index_t li = static_cast<index_t>(i);
    const index_t cv = li % cvs;
    index_t t = li / cvs;
    const index_t ox = t % W;
    t /= W;
    const index_t oy = t % H;
    const index_t n = t / H;
    const LinearTap<acc_t> ty = linear_tap<acc_t>(oy, h, scale_h, align_corners);
    const LinearTap<acc_t> tx = linear_tap<acc_t>(ox, w, scale_w, align_corners);
    const scalar_t* xn = x + n * h * w * C + cv * VEC;
    const index_t y0 = static_cast<index_t>(ty.i0) * w, y1 = static_cast<index_t>(ty.i1) * w;
    const index_t x0 = static_cast<index_t>(tx.i0), x1 = static_cast<index_t>(tx.i1);
    const vec_t v00 = *reinterpret_cast<const vec_t*>(xn + (y0 + x0) * C);
    const vec_t v01 = *reinterpret_cast<const vec_t*>(xn + (y0 + x1) * C);
    const vec_t v10 = *reinterpret_cast<const vec_t*>(xn + (y1 + x0) * C);
    const vec_t v11 = *reinterpret_cast<const vec_t*>(xn + (y1 + x1) * C);
    vec_t sv;
    if (skip != nullptr) sv = reinterpret_cast<const vec_t*>(skip)[li];
    vec_t ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t v = ty.w0 * (tx.w0 * static_cast<acc_t>(v00.val[k]) + tx.w1 * static_cast<acc_t>(v01.val[k])) +
                ty.w1 * (tx.w0 * static_cast<acc_t>(v10.val[k]) + tx.w1 * static_cast<acc_t>(v11.val[k]));
      if (skip != nullptr) v += static_cast<acc_t>(sv.val[k]);
      ov.val[k] = static_cast<scalar_t>(v);
    }
    reinterpret_cast<vec_t*>(out)[li] = ov;
  }
}

// --------------------------------------------------------------------------- backward
// NCHW: item i is input element i of the flat (N*C, h, w) grad_x.
template <typename scalar_t, typename index_t, bool kTabled>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSM) upsample_backward_nchw_kernel(const scalar_t* __restrict__ grad,
                                              scalar_t* __restrict__ grad_x, int64_t items,
                                              index_t h, index_t w, index_t H, index_t W,
                                              Axis<at::opmath_type<scalar_t>> ay,
                                              Axis<at::opmath_type<scalar_t>> ax) {
  using acc_t = at::opmath_type<scalar_t>;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  setup_tables<acc_t, kTabled>(ay, ax, resattn_smem);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += stride) {
    const index_t li = static_cast<index_t>(i);
    const index_t ix = li % w;
    const index_t t = li / w;
    const index_t iy = t % h;
    const index_t plane = t / h;
    int64_t ylo, yhi, xlo, xhi;
    ay.template range<kTabled>(iy, &ylo, &yhi);
    ax.template range<kTabled>(ix, &xlo, &xhi);
    const scalar_t* gp = grad + plane * H * W;
    acc_t sum = 0;
    for (index_t oy = static_cast<index_t>(ylo); oy < static_cast<index_t>(yhi); ++oy) {
      const acc_t wy = ay.template weight<kTabled>(oy, iy);
      const scalar_t* row = gp + oy * W;
      acc_t row_sum = 0;
      for (index_t ox = static_cast<index_t>(xlo); ox < static_cast<index_t>(xhi); ++ox) {
        row_sum += ax.template weight<kTabled>(ox, ix) * static_cast<acc_t>(row[ox]);
      }
      sum += wy * row_sum;
    }
    grad_x[li] = static_cast<scalar_t>(sum);
  }
}

// channels_last: item li covers channels [cv*VEC, cv*VEC + VEC) of one input pixel.
template <typename scalar_t, typename index_t, int VEC, bool kTabled>
__global__ void __launch_bounds__(kThreads, (backward_cl_blocks_per_sm<index_t, kTabled>())) upsample_backward_cl_kernel(const scalar_t* __restrict__ grad,
                                            scalar_t* __restrict__ grad_x, int64_t items,
                                            index_t C, index_t h, index_t w, index_t H,
                                            index_t W, Axis<at::opmath_type<scalar_t>> ay,
                                            Axis<at::opmath_type<scalar_t>> ax) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  setup_tables<acc_t, kTabled>(ay, ax, resattn_smem);
  const index_t cvs = C / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += stride) {
    const index_t li = static_cast<index_t>(i);
    const index_t cv = li % cvs;
    index_t t = li / cvs;
    const index_t ix = t % w;
    t /= w;
    const index_t iy = t % h;
    const index_t n = t / h;
    int64_t ylo, yhi, xlo, xhi;
    ay.template range<kTabled>(iy, &ylo, &yhi);
    ax.template range<kTabled>(ix, &xlo, &xhi);
    const scalar_t* gn = grad + n * H * W * C + cv * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0;
    for (index_t oy = static_cast<index_t>(ylo); oy < static_cast<index_t>(yhi); ++oy) {
      const acc_t wy = ay.template weight<kTabled>(oy, iy);
      for (index_t ox = static_cast<index_t>(xlo); ox < static_cast<index_t>(xhi); ++ox) {
        const acc_t wgt = wy * ax.template weight<kTabled>(ox, ix);
        const vec_t gv = *reinterpret_cast<const vec_t*>(gn + (oy * W + ox) * C);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += wgt * static_cast<acc_t>(gv.val[k]);
      }
    }
    vec_t ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) ov.val[k] = static_cast<scalar_t>(acc[k]);
    reinterpret_cast<vec_t*>(grad_x)[li] = ov;
  }
}

// ------------------------------------------------------------------------------- host
// The widest power of two <= max_vec elements that divides `row` and at which both
// pointers are aligned (1 if none).
int row_vec_width(int64_t row, int max_vec, size_t elem_size, const void* a, const void* b) {
  for (int v = max_vec; v > 1; v /= 2) {
    const std::uintptr_t bytes = static_cast<std::uintptr_t>(v) * elem_size;
    if (row % v == 0 && reinterpret_cast<std::uintptr_t>(a) % bytes == 0 &&
        reinterpret_cast<std::uintptr_t>(b) % bytes == 0) {
      return v;
    }
  }
  return 1;
}

// Runs `body` with constexpr bool `kTabled` (axis tables in shared memory, or in-thread).
#define RESATTN_DISPATCH_TABLED(tabled, ...) \
  [&] {                                      \
    if (tabled) {                            \
      constexpr bool kTabled = true;         \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr bool kTabled = false;        \
      return __VA_ARGS__();                  \
    }                                        \
  }()

at::Tensor upsample_bilinear_add_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& skip_in,
                                      at::IntArrayRef size, bool align_corners) {
  check_upsample_args(x_in, skip_in, size);
  check_on_device(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const bool has_skip = skip_in.has_value();
  const at::MemoryFormat fmt = follow_format(has_skip ? *skip_in : x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  const int64_t H = size[0], W = size[1];
  at::Tensor out = at::empty({N, C, H, W}, x_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor skip = has_skip ? skip_in->contiguous(fmt) : at::Tensor();
  const bool use32 = fits_int32(x) && fits_int32(out);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_bilinear_add_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t scale_h = bilinear_scale<acc_t>(h, H, align_corners);
        const acc_t scale_w = bilinear_scale<acc_t>(w, W, align_corners);
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const scalar_t* sp = has_skip ? skip.data_ptr<scalar_t>() : nullptr;
        scalar_t* op = out.data_ptr<scalar_t>();
        constexpr int kVec = vec_width<scalar_t>();
        if (fmt == at::MemoryFormat::ChannelsLast) {
          const bool vec = C % kVec == 0 && aligned16(xp) && aligned16(sp) && aligned16(op);
          RESATTN_DISPATCH_VEC(vec, [&] {
            RESATTN_DISPATCH_INDEX(use32, [&] {
              const int64_t items = N * H * W * (C / VEC);
              RESATTN_LAUNCH(num_blocks(items), kThreads, 0, stream,
                             upsample_forward_cl_kernel<scalar_t, index_t, VEC>)(
                      xp, sp, op, items, static_cast<index_t>(C), static_cast<index_t>(h),
                      static_cast<index_t>(w), static_cast<index_t>(H), static_cast<index_t>(W),
                      scale_h, scale_w, align_corners);
              RESATTN_KERNEL_LAUNCH_CHECK();
            });
          });
        } else {
          // Rows are split into VEC-wide pieces: the widest power of two up to 128 bits
          // that divides W (so 28- and 14-wide rows still get 64- and 32-bit accesses).
          const int vec = row_vec_width(W, kVec, sizeof(scalar_t), sp, op);
          auto launch = [&](auto vec_tag) {
            constexpr int VEC = decltype(vec_tag)::value;
            RESATTN_DISPATCH_INDEX(use32, [&] {
              const int64_t items = N * C * H * (W / VEC);
              RESATTN_LAUNCH(num_blocks(items), kThreads, 0, stream,
                             upsample_forward_nchw_kernel<scalar_t, index_t, VEC>)(
                      xp, sp, op, items, static_cast<index_t>(h), static_cast<index_t>(w),
                      static_cast<index_t>(H), static_cast<index_t>(W), scale_h, scale_w,
                      align_corners);
              RESATTN_KERNEL_LAUNCH_CHECK();
            });
          };
          if constexpr (kVec >= 8) {
            if (vec == 8) return launch(std::integral_constant<int, 8>{});
          }
          if constexpr (kVec >= 4) {
            if (vec == 4) return launch(std::integral_constant<int, 4>{});
          }
          if constexpr (kVec >= 2) {
            if (vec == 2) return launch(std::integral_constant<int, 2>{});
          }
          return launch(std::integral_constant<int, 1>{});
        }
      });
  return out;
}

at::Tensor upsample_bilinear_add_backward_cuda(const at::Tensor& grad_in, at::IntArrayRef input_size,
                                               bool align_corners) {
  check_upsample_backward_args(grad_in, input_size);
  check_on_device(grad_in, "grad");
  const DeviceGuard guard(grad_in.device());
  const at::MemoryFormat fmt = follow_format(grad_in);
  const int64_t N = grad_in.size(0), C = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const int64_t h = input_size[0], w = input_size[1];
  at::Tensor grad_x = at::empty({N, C, h, w}, grad_in.options().memory_format(fmt));
  if (grad_x.numel() == 0) return grad_x;
  const at::Tensor grad = grad_in.contiguous(fmt);
  const bool use32 = fits_int32(grad) && fits_int32(grad_x);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "upsample_bilinear_add_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Axis<acc_t> ay = make_axis<acc_t>(h, H, align_corners);
        Axis<acc_t> ax = make_axis<acc_t>(w, W, align_corners);
        int64_t smem = table_bytes<acc_t>(ay, ax);
        ay.tabled = ax.tabled = smem <= kMaxTableBytes && !force_in_thread_tables();
        if (!ay.tabled) smem = 0;
        const scalar_t* gp = grad.data_ptr<scalar_t>();
        scalar_t* gxp = grad_x.data_ptr<scalar_t>();
        constexpr int kVec = vec_width<scalar_t>();
        if (fmt == at::MemoryFormat::ChannelsLast) {
          const bool vec = C % kVec == 0 && aligned16(gp) && aligned16(gxp);
          RESATTN_DISPATCH_VEC(vec, [&] {
            RESATTN_DISPATCH_INDEX(use32, [&] {
              RESATTN_DISPATCH_TABLED(ay.tabled, [&] {
                const int64_t items = N * h * w * (C / VEC);
                RESATTN_LAUNCH(num_blocks(items), kThreads, smem, stream,
                               upsample_backward_cl_kernel<scalar_t, index_t, VEC, kTabled>)(
                        gp, gxp, items, static_cast<index_t>(C), static_cast<index_t>(h),
                        static_cast<index_t>(w), static_cast<index_t>(H),
                        static_cast<index_t>(W), ay, ax);
                RESATTN_KERNEL_LAUNCH_CHECK();
              });
            });
          });
        } else {
          RESATTN_DISPATCH_INDEX(use32, [&] {
            RESATTN_DISPATCH_TABLED(ay.tabled, [&] {
              const int64_t items = N * C * h * w;
              RESATTN_LAUNCH(num_blocks(items), kThreads, smem, stream,
                             upsample_backward_nchw_kernel<scalar_t, index_t, kTabled>)(
                      gp, gxp, items, static_cast<index_t>(h), static_cast<index_t>(w),
                      static_cast<index_t>(H), static_cast<index_t>(W), ay, ax);
              RESATTN_KERNEL_LAUNCH_CHECK();
            });
          });
        }
      });
  return grad_x;
}

}  // namespace
}  // namespace cuda
}  // namespace resattn

TORCH_LIBRARY_IMPL(RESATTN_CUDA_NAMESPACE, RESATTN_CUDA_DISPATCH_KEY, m) {
  m.impl("upsample_bilinear_add", &resattn::cuda::upsample_bilinear_add_cuda);
  m.impl("upsample_bilinear_add_backward", &resattn::cuda::upsample_bilinear_add_backward_cuda);
}
