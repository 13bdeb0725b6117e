// CUDA kernels of resattn_fast::batch_norm_relu, batch_norm_relu_backward and
// batch_norm_update_stats (the contract: csrc/schemas.h; the math: kernels/batch_norm_relu.h,
// which the CPU backend runs too).
//
// Layouts. x is made dense in its suggested memory format first (NCHW or channels_last);
// grad and grad_residual are copied into that same order when theirs differs, so one flat
// index addresses the same element in every buffer, and the outputs take that layout.
// NCHW is read as (N, C, HW), channels_last as (M = N*H*W rows, C).
//
// Per-channel reductions (training statistics; the backward's sums), in two kernels:
//   1. partials: the (N, H, W) extent of each channel is cut into fixed chunks (sizes from
//      the shape only, never the device); one block reduces one (channel [tile], chunk)
//      item at a time (grid-stride over items) and writes its partial to a workspace.
//      NCHW: a 1-D block, each thread a strided part of the chunk. channels_last: a 2-D
//      block, threadIdx.x over VEC-channel vectors of one row (128-bit loads along C),
//      threadIdx.y over rows. In-block combine: warp shuffles, then shared memory.
//   2. finalize: one warp per channel combines that channel's partials in index order.
// Statistics are Welford states combined with Chan's formula (resattn::welford_combine),
// sums plain sums, all in acc_t (float32; float64 for float64). Every combination happens
// in an order fixed by the shape: bit-identical run to run and on any device size (number
// of SMs), no atomics.
//
// Elementwise passes (normalise + ReLU; the backward's apply) run over the flat memory
// order, VEC elements (128 bits) per access when the channel extent allows it (NCHW:
// HW % VEC == 0, a vector stays in one channel; channels_last: C % VEC == 0) and every
// pointer is 16-byte aligned; else one element at a time. Index math is 32-bit when every
// offset fits (fits_int32), else 64-bit; loop counters are 64-bit.
//
// Passes over x: training forward 2 (partials; normalise) + a tiny finalize; eval forward 1;
// backward 2 in training or with weight_grads (sums; apply) and 1 in eval without.
// batch_norm_update_stats: one kernel for both running tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batch_norm_relu.h"
#include "checks.h"
#include "cuda_common.cuh"

namespace resattn {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// A chunk gives each thread of the block at least this many vectors (NCHW) or rows
// (channels_last) to reduce before the block combines.
constexpr int64_t kItemsPerThread = 16;
// At most this many chunks (partials) per channel: larger chunks for larger batches keep
// the workspace and the finalize small.
constexpr int64_t kMaxChunks = 256;

// ------------------------------------------------------------------ reduction states
// Welford state of one channel (or part of one): count, mean, sum of squared deviations.
template <typename acc_t>
struct Welford {
  acc_t n, mean, m2;

  static __device__ __forceinline__ Welford zero() { return {acc_t(0), acc_t(0), acc_t(0)}; }
  __device__ __forceinline__ void add(acc_t v) {
    n += acc_t(1);
    const acc_t delta = v - mean;
    mean += delta / n;
    m2 += delta * (v - mean);
  }
  __device__ __forceinline__ void combine(const Welford& o) {
    welford_combine<acc_t>(n, mean, m2, o.n, o.mean, o.m2);
  }
  __device__ __forceinline__ Welford shfl_down(unsigned int offset) const {
    return {__shfl_down_sync(kFullMask, n, offset), __shfl_down_sync(kFullMask, mean, offset),
            __shfl_down_sync(kFullMask, m2, offset)};
  }
};

// The backward's sums of one channel: sum(dy) and sum(dy * (x - mean)).
template <typename acc_t>
struct GradSums {
  acc_t dy, dy_xmu;

  static __device__ __forceinline__ GradSums zero() { return {acc_t(0), acc_t(0)}; }
  __device__ __forceinline__ void combine(const GradSums& o) {
    dy += o.dy;
    dy_xmu += o.dy_xmu;
  }
  __device__ __forceinline__ GradSums shfl_down(unsigned int offset) const {
    return {__shfl_down_sync(kFullMask, dy, offset), __shfl_down_sync(kFullMask, dy_xmu, offset)};
  }
};

// Lane 0 ends with the combination of the warp's 32 states (a fixed tree).
template <typename State>
__device__ __forceinline__ void warp_reduce(State& s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) s.combine(s.shfl_down(offset));
}

// 1-D block of kThreads: thread 0 ends with the block's combination. `smem` holds
// kWarpsPerBlock states; all threads must call (it synchronises, also before returning,
// so `smem` may be reused at once).
template <typename State>
__device__ __forceinline__ void block_reduce(State& s, State* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_reduce(s);
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarpsPerBlock ? smem[lane] : State::zero();
    warp_reduce(s);
  }
  __syncthreads();
}

// 2-D block (blockDim.x a power of two <= 32, blockDim.x * blockDim.y == kThreads): the
// threads of row 0 end with the combination over all rows of their column's VEC states.
// `smem` holds kWarpsPerBlock * blockDim.x * VEC states; synchronises like block_reduce.
template <typename State, int VEC>
__device__ __forceinline__ void block_reduce_columns(State (&s)[VEC], State* smem) {
  const int tx = static_cast<int>(blockDim.x);
  const int linear = static_cast<int>(threadIdx.y) * tx + static_cast<int>(threadIdx.x);
  const int lane = linear % kWarp, warp = linear / kWarp;
  // Lanes tx apart hold the same column of different rows.
  for (int offset = kWarp / 2; offset >= tx; offset /= 2) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k].combine(s[k].shfl_down(offset));
  }
  if (lane < tx) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) smem[(warp * tx + lane) * VEC + k] = s[k];
  }
  __syncthreads();
  if (threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = smem[threadIdx.x * VEC + k];
    for (int w = 1; w < kWarpsPerBlock; ++w) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) s[k].combine(smem[(w * tx + threadIdx.x) * VEC + k]);
    }
  }
  __syncthreads();
}

// ------------------------------------------------------------ per-channel parameters
// A (C,) vector of float32 or of scalar_t (nullptr: absent, the default value).
template <typename scalar_t>
struct ChannelVec {
  const void* ptr;
  bool is_float;

  __device__ __forceinline__ at::opmath_type<scalar_t> load(int64_t c,
                                                            at::opmath_type<scalar_t> absent) const {
    using acc_t = at::opmath_type<scalar_t>;
    if (ptr == nullptr) return absent;
    return is_float ? static_cast<acc_t>(static_cast<const float*>(ptr)[c])
                    : static_cast<acc_t>(static_cast<const scalar_t*>(ptr)[c]);
  }
};

// mean, var (the statistics normalised with), weight, bias: what every pass needs.
template <typename scalar_t>
struct BnParams {
  using acc_t = at::opmath_type<scalar_t>;
  ChannelVec<scalar_t> mean, var, weight, bias;
  acc_t eps;
};

// One channel's coefficients, in acc_t.
template <typename acc_t>
struct ChannelCoef {
  acc_t mean, invstd, scale, bias;
};

template <typename scalar_t>
__device__ __forceinline__ ChannelCoef<at::opmath_type<scalar_t>> channel_coef(
    const BnParams<scalar_t>& p, int64_t c) {
  using acc_t = at::opmath_type<scalar_t>;
  ChannelCoef<acc_t> k;
  k.mean = p.mean.load(c, acc_t(0));
  k.invstd = bn_invstd<acc_t>(p.var.load(c, acc_t(1)), p.eps);
  k.scale = p.weight.load(c, acc_t(1)) * k.invstd;
  k.bias = p.bias.load(c, acc_t(0));
  return k;
}

// ------------------------------------------------------------- statistics (training)
// NCHW partials: item = c * chunks + k covers vectors [k * chunk, (k + 1) * chunk) of
// channel c's N * HW / VEC (sample-major), written to part[item].
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_stats_nchw_kernel(
    const scalar_t* __restrict__ x, Welford<at::opmath_type<scalar_t>>* __restrict__ part,
    index_t C, index_t hwv, index_t per_channel, index_t chunk, int64_t chunks, int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  Welford<acc_t>* smem = reinterpret_cast<Welford<acc_t>*>(resattn_smem);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t c = static_cast<index_t>(item / chunks);
    const index_t begin = static_cast<index_t>(item % chunks) * chunk;
    const index_t end = per_channel - begin < chunk ? per_channel : begin + chunk;
    Welford<acc_t> s = Welford<acc_t>::zero();
    for (int64_t jj = begin + static_cast<int64_t>(threadIdx.x); jj < end; jj += kThreads) {
      const index_t j = static_cast<index_t>(jj);
      const index_t n = j / hwv;
      const vec_t v = reinterpret_cast<const vec_t*>(x)[(n * C + c) * hwv + (j - n * hwv)];
#pragma unroll
      for (int k = 0; k < VEC; ++k) s.add(static_cast<acc_t>(v.val[k]));
    }
    block_reduce(s, smem);
    if (threadIdx.x == 0) part[item] = s;
  }
}

// channels_last partials: item = tile * chunks + k covers rows [k * chunk, (k + 1) * chunk)
// of channel vectors [tile * blockDim.x, (tile + 1) * blockDim.x); channel c's partial of
// chunk k goes to part[c * chunks + k].
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_stats_cl_kernel(
    const scalar_t* __restrict__ x, Welford<at::opmath_type<scalar_t>>* __restrict__ part,
    index_t cvs, index_t rows, index_t chunk, int64_t chunks, int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  Welford<acc_t>* smem = reinterpret_cast<Welford<acc_t>*>(resattn_smem);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t k_chunk = item % chunks;
    const index_t cv = static_cast<index_t>(item / chunks) * static_cast<index_t>(blockDim.x) +
                       static_cast<index_t>(threadIdx.x);
    const index_t begin = static_cast<index_t>(k_chunk) * chunk;
    const index_t end = rows - begin < chunk ? rows : begin + chunk;
    Welford<acc_t> s[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = Welford<acc_t>::zero();
    if (cv < cvs) {
      for (int64_t rr = begin + static_cast<int64_t>(threadIdx.y); rr < end; rr += blockDim.y) {
        const index_t r = static_cast<index_t>(rr);
        const vec_t v = reinterpret_cast<const vec_t*>(x)[r * cvs + cv];
#pragma unroll
        for (int k = 0; k < VEC; ++k) s[k].add(static_cast<acc_t>(v.val[k]));
      }
    }
    block_reduce_columns<Welford<acc_t>, VEC>(s, smem);
    if (threadIdx.y == 0 && cv < cvs) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) part[(static_cast<int64_t>(cv) * VEC + k) * chunks + k_chunk] = s[k];
    }
  }
}

// One warp per channel: the channel's partials in index order -> mean, biased var.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) bn_stats_finalize_kernel(
    const Welford<acc_t>* __restrict__ part, int64_t chunks, int64_t C, acc_t* __restrict__ mean,
    acc_t* __restrict__ var) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; c < C;
       c += warps) {
    Welford<acc_t> s = Welford<acc_t>::zero();
    for (int64_t k = lane; k < chunks; k += kWarp) s.combine(part[c * chunks + k]);
    warp_reduce(s);
    if (lane == 0) {
      mean[c] = s.mean;
      var[c] = s.m2 / s.n;
    }
  }
}

// ----------------------------------------------------------------- normalise + ReLU
// Flat over the memory order, VEC elements per vector i. NCHW (kCL false): vector i lies
// in channel (i / hwv) % C; channels_last: its channels are (i % cvs) * VEC + k.
// `inner` is hwv (NCHW) or cvs (channels_last). In eval, block 0 also writes the
// statistics it normalised with into mean_out / var_out (the op's new (C,) outputs).
template <typename scalar_t, typename index_t, int VEC, bool kCL>
__global__ void __launch_bounds__(kThreads) bn_relu_forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, BnParams<scalar_t> p, index_t C,
    index_t inner, int64_t nvec, at::opmath_type<scalar_t>* __restrict__ mean_out,
    at::opmath_type<scalar_t>* __restrict__ var_out) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  if (mean_out != nullptr && blockIdx.x == 0) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      mean_out[c] = p.mean.load(c, acc_t(0));
      var_out[c] = p.var.load(c, acc_t(1));
    }
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += stride) {
    const index_t li = static_cast<index_t>(i);
    const vec_t xv = reinterpret_cast<const vec_t*>(x)[li];
    vec_t ov;
    if constexpr (kCL) {
      const index_t c0 = (li % inner) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const ChannelCoef<acc_t> q = channel_coef(p, c0 + k);
        ov.val[k] = static_cast<scalar_t>(
            bn_relu_forward<acc_t>(static_cast<acc_t>(xv.val[k]), q.mean, q.scale, q.bias));
      }
    } else {
      const ChannelCoef<acc_t> q = channel_coef(p, (li / inner) % C);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        ov.val[k] = static_cast<scalar_t>(
            bn_relu_forward<acc_t>(static_cast<acc_t>(xv.val[k]), q.mean, q.scale, q.bias));
      }
    }
    reinterpret_cast<vec_t*>(out)[li] = ov;
  }
}

// ---------------------------------------------------------------------- backward sums
// NCHW partials of sum(dy) and sum(dy * (x - mean)); items as bn_stats_nchw_kernel.
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_relu_grad_sums_nchw_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, BnParams<scalar_t> p,
    GradSums<at::opmath_type<scalar_t>>* __restrict__ part, index_t C, index_t hwv,
    index_t per_channel, index_t chunk, int64_t chunks, int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  GradSums<acc_t>* smem = reinterpret_cast<GradSums<acc_t>*>(resattn_smem);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t c = static_cast<index_t>(item / chunks);
    const index_t begin = static_cast<index_t>(item % chunks) * chunk;
    const index_t end = per_channel - begin < chunk ? per_channel : begin + chunk;
    const ChannelCoef<acc_t> q = channel_coef(p, c);
    GradSums<acc_t> s = GradSums<acc_t>::zero();
    for (int64_t jj = begin + static_cast<int64_t>(threadIdx.x); jj < end; jj += kThreads) {
      const index_t j = static_cast<index_t>(jj);
      const index_t n = j / hwv;
      const index_t off = (n * C + c) * hwv + (j - n * hwv);
      const vec_t gv = reinterpret_cast<const vec_t*>(grad)[off];
      const vec_t xv = reinterpret_cast<const vec_t*>(x)[off];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t xk = static_cast<acc_t>(xv.val[k]);
        const acc_t dy = bn_relu_dy<acc_t>(static_cast<acc_t>(gv.val[k]), xk, q.mean, q.scale, q.bias);
        s.dy += dy;
        s.dy_xmu += dy * (xk - q.mean);
      }
    }
    block_reduce(s, smem);
    if (threadIdx.x == 0) part[item] = s;
  }
}

// channels_last partials; items and layout as bn_stats_cl_kernel.
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_relu_grad_sums_cl_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, BnParams<scalar_t> p,
    GradSums<at::opmath_type<scalar_t>>* __restrict__ part, index_t cvs, index_t rows,
    index_t chunk, int64_t chunks, int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  GradSums<acc_t>* smem = reinterpret_cast<GradSums<acc_t>*>(resattn_smem);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t k_chunk = item % chunks;
    const index_t cv = static_cast<index_t>(item / chunks) * static_cast<index_t>(blockDim.x) +
                       static_cast<index_t>(threadIdx.x);
    const index_t begin = static_cast<index_t>(k_chunk) * chunk;
    const index_t end = rows - begin < chunk ? rows : begin + chunk;
    GradSums<acc_t> s[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = GradSums<acc_t>::zero();
    if (cv < cvs) {
      ChannelCoef<acc_t> q[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) q[k] = channel_coef(p, static_cast<int64_t>(cv) * VEC + k);
      for (int64_t rr = begin + static_cast<int64_t>(threadIdx.y); rr < end; rr += blockDim.y) {
        const index_t r = static_cast<index_t>(rr);
        const vec_t gv = reinterpret_cast<const vec_t*>(grad)[r * cvs + cv];
        const vec_t xv = reinterpret_cast<const vec_t*>(x)[r * cvs + cv];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t xk = static_cast<acc_t>(xv.val[k]);
          const acc_t dy =
              bn_relu_dy<acc_t>(static_cast<acc_t>(gv.val[k]), xk, q[k].mean, q[k].scale, q[k].bias);
          s[k].dy += dy;
          s[k].dy_xmu += dy * (xk - q[k].mean);
        }
      }
    }
    block_reduce_columns<GradSums<acc_t>, VEC>(s, smem);
    if (threadIdx.y == 0 && cv < cvs) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) part[(static_cast<int64_t>(cv) * VEC + k) * chunks + k_chunk] = s[k];
    }
  }
}

// One warp per channel: grad_bias = sum(dy), grad_weight = sum(dy * x_hat)
// = invstd * sum(dy * (x - mean)), from the partials in index order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_relu_grad_sums_finalize_kernel(
    const GradSums<at::opmath_type<scalar_t>>* __restrict__ part, int64_t chunks, int64_t C,
    BnParams<scalar_t> p, at::opmath_type<scalar_t>* __restrict__ grad_weight,
    at::opmath_type<scalar_t>* __restrict__ grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; c < C;
       c += warps) {
    GradSums<acc_t> s = GradSums<acc_t>::zero();
    for (int64_t k = lane; k < chunks; k += kWarp) s.combine(part[c * chunks + k]);
    warp_reduce(s);
    if (lane == 0) {
      grad_bias[c] = s.dy;
      grad_weight[c] = s.dy_xmu * bn_invstd<acc_t>(p.var.load(c, acc_t(1)), p.eps);
    }
  }
}

// ---------------------------------------------------------------------- backward apply
// grad_x (+ grad_residual) over the flat memory order, vectors as bn_relu_forward_kernel.
// Training when grad_weight_sum != nullptr (the per-channel sums of the reduction pass).
template <typename scalar_t, typename index_t, int VEC, bool kCL>
__global__ void __launch_bounds__(kThreads) bn_relu_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ grad_residual, scalar_t* __restrict__ grad_x, BnParams<scalar_t> p,
    const at::opmath_type<scalar_t>* __restrict__ grad_weight_sum,
    const at::opmath_type<scalar_t>* __restrict__ grad_bias_sum, at::opmath_type<scalar_t> count,
    index_t C, index_t inner, int64_t nvec) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const bool training = grad_weight_sum != nullptr;
  // Per element: grad_x of one channel's coefficients.
  auto one = [&](const ChannelCoef<acc_t>& q, acc_t k_mean, acc_t k_xhat, acc_t g, acc_t xk) {
    const acc_t dy = bn_relu_dy<acc_t>(g, xk, q.mean, q.scale, q.bias);
    return training ? bn_relu_grad_x_train<acc_t>(dy, xk, q.mean, q.invstd, q.scale, k_mean, k_xhat)
                    : q.scale * dy;
  };
  auto ks = [&](int64_t c, acc_t* k_mean, acc_t* k_xhat) {
    *k_mean = training ? grad_bias_sum[c] / count : acc_t(0);
    *k_xhat = training ? grad_weight_sum[c] / count : acc_t(0);
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += stride) {
    const index_t li = static_cast<index_t>(i);
    const vec_t gv = reinterpret_cast<const vec_t*>(grad)[li];
    const vec_t xv = reinterpret_cast<const vec_t*>(x)[li];
    acc_t gx[VEC];
    if constexpr (kCL) {
      const index_t c0 = (li % inner) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t k_mean, k_xhat;
        ks(c0 + k, &k_mean, &k_xhat);
        gx[k] = one(channel_coef(p, c0 + k), k_mean, k_xhat, static_cast<acc_t>(gv.val[k]),
                    static_cast<acc_t>(xv.val[k]));
      }
    } else {
      const index_t c = (li / inner) % C;
      const ChannelCoef<acc_t> q = channel_coef(p, c);
      acc_t k_mean, k_xhat;
      ks(c, &k_mean, &k_xhat);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        gx[k] = one(q, k_mean, k_xhat, static_cast<acc_t>(gv.val[k]), static_cast<acc_t>(xv.val[k]));
      }
    }
    if (grad_residual != nullptr) {
      const vec_t rv = reinterpret_cast<const vec_t*>(grad_residual)[li];
#pragma unroll
      for (int k = 0; k < VEC; ++k) gx[k] += static_cast<acc_t>(rv.val[k]);
    }
    vec_t ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) ov.val[k] = static_cast<scalar_t>(gx[k]);
    reinterpret_cast<vec_t*>(grad_x)[li] = ov;
  }
}

// ------------------------------------------------------------------ running statistics
template <typename run_t>
__global__ void __launch_bounds__(kThreads) bn_update_stats_kernel(
    run_t* __restrict__ running_mean, run_t* __restrict__ running_var, ChannelVec<run_t> mean,
    ChannelVec<run_t> var, at::opmath_type<run_t> momentum, int64_t count, int64_t C) {
  using acc_t = at::opmath_type<run_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += stride) {
    acc_t rm = static_cast<acc_t>(running_mean[c]);
    acc_t rv = static_cast<acc_t>(running_var[c]);
    bn_update_running<acc_t>(rm, rv, mean.load(c, acc_t(0)), var.load(c, acc_t(0)), momentum, count);
    running_mean[c] = static_cast<run_t>(rm);
    running_var[c] = static_cast<run_t>(rv);
  }
}

// ------------------------------------------------------------------------------- host
// A (C,) tensor as a kernel reads it: contiguous, float32 or scalar_t (any other dtype is
// converted to float32). `keep` holds a copy alive while the kernels run.
template <typename scalar_t>
ChannelVec<scalar_t> channel_vec(const std::optional<at::Tensor>& t, std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return {nullptr, false};
  at::Tensor v = *t;
  const at::ScalarType own = c10::CppTypeToScalarType<scalar_t>::value;
  if (v.scalar_type() != at::kFloat && v.scalar_type() != own) v = v.to(at::kFloat);
  v = v.contiguous();
  keep.push_back(v);
  return {v.data_ptr(), v.scalar_type() == at::kFloat};
}

// How a per-channel reduction is cut: `chunk` vectors (NCHW) or rows (channels_last) per
// partial, `chunks` partials per channel; channels_last also `tx` x `ty` threads (tx
// channel vectors per row) and `tiles` of tx channel vectors. From the shape only.
struct ReducePlan {
  int64_t chunk, chunks, tiles, items;
  unsigned int tx, ty;
};

ReducePlan plan_reduction(bool channels_last, int64_t C, int64_t extent, int64_t cvs) {
  ReducePlan plan{};
  if (channels_last) {
    int64_t tx = 1;
    while (tx < cvs && tx < kWarp) tx *= 2;
    plan.tx = static_cast<unsigned int>(tx);
    plan.ty = static_cast<unsigned int>(kThreads / tx);
    plan.tiles = (cvs + tx - 1) / tx;
  } else {
    plan.tx = kThreads;
    plan.ty = 1;
    plan.tiles = C;
  }
  // extent: vectors per channel (NCHW) or rows (channels_last), split over plan.ty threads
  // (rows) or kThreads threads (vectors).
  const int64_t threads = channels_last ? plan.ty : kThreads;
  int64_t chunk = std::max<int64_t>(threads * kItemsPerThread, (extent + kMaxChunks - 1) / kMaxChunks);
  chunk = (chunk + threads - 1) / threads * threads;
  plan.chunk = chunk;
  plan.chunks = std::max<int64_t>(1, (extent + chunk - 1) / chunk);
  plan.items = plan.tiles * plan.chunks;
  return plan;
}

// The elementwise passes' vector width: 128 bits when the channel extent and every pointer allow.
template <typename scalar_t>
bool vectorisable(bool channels_last, int64_t C, int64_t HW, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = vec_width<scalar_t>();
  if ((channels_last ? C : HW) % kVec != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

// Runs `body` with constexpr bool `kCL`.
#define RESATTN_DISPATCH_CL(channels_last, ...) \
  [&] {                                         \
    if (channels_last) {                        \
      constexpr bool kCL = true;                \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr bool kCL = false;               \
      return __VA_ARGS__();                     \
    }                                           \
  }()

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The per-channel partials of one reduction (State: Welford or GradSums), by layout.
template <typename scalar_t, typename State>
at::Tensor partials_workspace(const at::Tensor& x, const ReducePlan& plan, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(sizeof(State) % sizeof(acc_t) == 0, "states are made of acc_t");
  const int64_t per_state = sizeof(State) / sizeof(acc_t);
  return at::empty({C * plan.chunks * per_state}, x.options().dtype(acc_dtype(x)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps) {
  check_batch_norm_relu_args(x_in, weight, bias, running_mean, running_var, training, eps);
  check_on_device(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const at::MemoryFormat fmt = follow_format(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor mean = at::empty({C}, x.options().dtype(acc_dtype(x)));
  at::Tensor var = at::empty({C}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) {
    if (training) {
      mean.zero_();
      var.zero_();
    } else {
      mean.copy_(*running_mean);
      var.copy_(*running_var);
    }
    return {out, mean, var};
  }
  const bool use32 = fits_int32(x);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    BnParams<scalar_t> p;
    p.weight = channel_vec<scalar_t>(weight, keep);
    p.bias = channel_vec<scalar_t>(bias, keep);
    p.eps = static_cast<acc_t>(eps);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    const bool vec = vectorisable<scalar_t>(cl, C, HW, {xp, op});
    RESATTN_DISPATCH_VEC(vec, [&] {
      RESATTN_DISPATCH_INDEX(use32, [&] {
        const int64_t cvs = C / VEC;
        if (training) {
          const ReducePlan plan = plan_reduction(cl, C, cl ? N * HW : N * HW / VEC, cvs);
          at::Tensor ws = partials_workspace<scalar_t, Welford<acc_t>>(x, plan, C);
          auto* part = reinterpret_cast<Welford<acc_t>*>(ws.data_ptr<acc_t>());
          if (cl) {
            const size_t smem = sizeof(Welford<acc_t>) * kWarpsPerBlock * plan.tx * VEC;
            RESATTN_LAUNCH(num_blocks(plan.items * kThreads), dim3(plan.tx, plan.ty), smem, stream,
                           bn_stats_cl_kernel<scalar_t, index_t, VEC>)(
                xp, part, static_cast<index_t>(cvs), static_cast<index_t>(N * HW),
                static_cast<index_t>(plan.chunk), plan.chunks, plan.items);
          } else {
            const size_t smem = sizeof(Welford<acc_t>) * kWarpsPerBlock;
            RESATTN_LAUNCH(num_blocks(plan.items * kThreads), kThreads, smem, stream,
                           bn_stats_nchw_kernel<scalar_t, index_t, VEC>)(
                xp, part, static_cast<index_t>(C), static_cast<index_t>(HW / VEC),
                static_cast<index_t>(N * HW / VEC), static_cast<index_t>(plan.chunk), plan.chunks,
                plan.items);
          }
          RESATTN_KERNEL_LAUNCH_CHECK();
          RESATTN_LAUNCH(num_blocks(C * kWarp), kThreads, 0, stream, bn_stats_finalize_kernel<acc_t>)(
              part, plan.chunks, C, mp, vp);
          RESATTN_KERNEL_LAUNCH_CHECK();
          p.mean = {mp, std::is_same_v<acc_t, float>};
          p.var = {vp, std::is_same_v<acc_t, float>};
        } else {
          p.mean = channel_vec<scalar_t>(running_mean, keep);
          p.var = channel_vec<scalar_t>(running_var, keep);
        }
        const int64_t nvec = x.numel() / VEC;
        RESATTN_DISPATCH_CL(cl, [&] {
          RESATTN_LAUNCH(num_blocks(nvec), kThreads, 0, stream,
                         bn_relu_forward_kernel<scalar_t, index_t, VEC, kCL>)(
              xp, op, p, static_cast<index_t>(C), static_cast<index_t>(cl ? cvs : HW / VEC), nvec,
              training ? nullptr : mp, training ? nullptr : vp);
          RESATTN_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& var_in,
    bool training, double eps, const std::optional<at::Tensor>& grad_residual_in,
    bool weight_grads) {
  check_batch_norm_relu_backward_args(grad_in, x_in, mean_in, var_in, grad_residual_in);
  if (weight.has_value()) check_channel_vector(*weight, "weight", x_in);
  if (bias.has_value()) check_channel_vector(*bias, "bias", x_in);
  check_on_device(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const at::MemoryFormat fmt = follow_format(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad = grad_in.contiguous(fmt);
  const bool has_residual = grad_residual_in.has_value();
  const at::Tensor residual = has_residual ? grad_residual_in->contiguous(fmt) : at::Tensor();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const at::ScalarType acc = acc_dtype(x);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  const bool reduce = training || weight_grads;
  at::Tensor gw = at::empty({reduce ? C : 0}, x.options().dtype(acc));
  at::Tensor gb = at::empty({reduce ? C : 0}, x.options().dtype(acc));
  auto results = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    if (!weight_grads) {
      return {grad_x, at::empty({0}, x.options().dtype(acc)), at::empty({0}, x.options().dtype(acc))};
    }
    at::Tensor w = weight.has_value() ? gw.to(weight->scalar_type()) : gw;
    at::Tensor b = bias.has_value() ? gb.to(bias->scalar_type()) : gb;
    return {grad_x, w, b};
  };
  if (x.numel() == 0) {
    gw.zero_();
    gb.zero_();
    return results();
  }
  const bool use32 = fits_int32(x);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    BnParams<scalar_t> p;
    p.mean = channel_vec<scalar_t>(mean_in, keep);
    p.var = channel_vec<scalar_t>(var_in, keep);
    p.weight = channel_vec<scalar_t>(weight, keep);
    p.bias = channel_vec<scalar_t>(bias, keep);
    p.eps = static_cast<acc_t>(eps);
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = has_residual ? residual.data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    acc_t* gwp = reduce ? gw.data_ptr<acc_t>() : nullptr;
    acc_t* gbp = reduce ? gb.data_ptr<acc_t>() : nullptr;
    const bool vec = vectorisable<scalar_t>(cl, C, HW, {gp, xp, rp, gxp});
    RESATTN_DISPATCH_VEC(vec, [&] {
      RESATTN_DISPATCH_INDEX(use32, [&] {
        const int64_t cvs = C / VEC;
        if (reduce) {
          const ReducePlan plan = plan_reduction(cl, C, cl ? N * HW : N * HW / VEC, cvs);
          at::Tensor ws = partials_workspace<scalar_t, GradSums<acc_t>>(x, plan, C);
          auto* part = reinterpret_cast<GradSums<acc_t>*>(ws.data_ptr<acc_t>());
          if (cl) {
            const size_t smem = sizeof(GradSums<acc_t>) * kWarpsPerBlock * plan.tx * VEC;
            RESATTN_LAUNCH(num_blocks(plan.items * kThreads), dim3(plan.tx, plan.ty), smem, stream,
                           bn_relu_grad_sums_cl_kernel<scalar_t, index_t, VEC>)(
                gp, xp, p, part, static_cast<index_t>(cvs), static_cast<index_t>(N * HW),
                static_cast<index_t>(plan.chunk), plan.chunks, plan.items);
          } else {
            const size_t smem = sizeof(GradSums<acc_t>) * kWarpsPerBlock;
            RESATTN_LAUNCH(num_blocks(plan.items * kThreads), kThreads, smem, stream,
                           bn_relu_grad_sums_nchw_kernel<scalar_t, index_t, VEC>)(
                gp, xp, p, part, static_cast<index_t>(C), static_cast<index_t>(HW / VEC),
                static_cast<index_t>(N * HW / VEC), static_cast<index_t>(plan.chunk), plan.chunks,
                plan.items);
          }
          RESATTN_KERNEL_LAUNCH_CHECK();
          RESATTN_LAUNCH(num_blocks(C * kWarp), kThreads, 0, stream,
                         bn_relu_grad_sums_finalize_kernel<scalar_t>)(part, plan.chunks, C, p, gwp, gbp);
          RESATTN_KERNEL_LAUNCH_CHECK();
        }
        const int64_t nvec = x.numel() / VEC;
        RESATTN_DISPATCH_CL(cl, [&] {
          RESATTN_LAUNCH(num_blocks(nvec), kThreads, 0, stream,
                         bn_relu_backward_kernel<scalar_t, index_t, VEC, kCL>)(
              gp, xp, rp, gxp, p, training ? gwp : nullptr, training ? gbp : nullptr,
              static_cast<acc_t>(N * HW), static_cast<index_t>(C),
              static_cast<index_t>(cl ? cvs : HW / VEC), nvec);
          RESATTN_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return results();
}

void batch_norm_update_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const at::Tensor& mean, const at::Tensor& var, double momentum,
                                  int64_t count) {
  check_batch_norm_update_args(running_mean, running_var, mean, var, count);
  check_on_device(running_mean, "running_mean");
  const DeviceGuard guard(running_mean.device());
  const int64_t C = running_mean.size(0);
  if (C == 0) return;
  // In place: a strided running tensor is updated through a contiguous copy.
  at::Tensor rm = running_mean.is_contiguous() ? running_mean : running_mean.contiguous();
  at::Tensor rv = running_var.is_contiguous() ? running_var : running_var.contiguous();
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "batch_norm_update_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const ChannelVec<scalar_t> m = channel_vec<scalar_t>(mean, keep);
    const ChannelVec<scalar_t> v = channel_vec<scalar_t>(var, keep);
    RESATTN_LAUNCH(num_blocks(C), kThreads, 0, stream, bn_update_stats_kernel<scalar_t>)(
        rm.data_ptr<scalar_t>(), rv.data_ptr<scalar_t>(), m, v, static_cast<acc_t>(momentum), count, C);
    RESATTN_KERNEL_LAUNCH_CHECK();
  });
  if (!rm.is_same(running_mean)) running_mean.copy_(rm);
  if (!rv.is_same(running_var)) running_var.copy_(rv);
}

}  // namespace
}  // namespace cuda
}  // namespace resattn

TORCH_LIBRARY_IMPL(RESATTN_CUDA_NAMESPACE, RESATTN_CUDA_DISPATCH_KEY, m) {
  m.impl("batch_norm_relu", &resattn::cuda::batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &resattn::cuda::batch_norm_relu_backward_cuda);
  m.impl("batch_norm_update_stats", &resattn::cuda::batch_norm_update_stats_cuda);
}
