// CUDA kernels of resattn_fast::batch_norm_relu, batch_norm_relu_backward,
// batch_norm_update_stats and batch_norm_relu_with_update (the contract: csrc/schemas.h; the math: kernels/batch_norm_relu.h,
// which the CPU backend runs too).
//
// Layouts. x is made dense in its suggested memory format first (NCHW or channels_last);
// grad and grad_residual are copied into that same order when theirs differs, so one flat
// index addresses the same element in every buffer, and the outputs take that layout.
// NCHW is read as (N, C, HW), channels_last as (M = N*H*W rows, C).
//
// Per-channel reductions (training statistics; the backward's sums), in one launch:
//   1. partials: the (N, H, W) extent of each channel is cut into fixed chunks (sizes from
//      the shape only, never the device); one block reduces one (channel [tile], chunk)
//      item at a time (grid-stride over items) and writes its partial to a workspace.
//      NCHW: a 1-D block, each thread a strided part of the chunk. channels_last: a 2-D
//      block, threadIdx.x over VEC-channel vectors of one row (128-bit loads along C),
//      threadIdx.y over rows. In-block combine: warp shuffles, then shared memory.
//   2. finalize, in the same kernel: each block counts its finished item in its tile's
//      counter (arrive_last); the block that finishes a tile's last chunk combines that
//      tile's partials, one warp per channel, in index order (so the result does not
//      depend on which block it is), and writes the op's per-channel results and the row
//      of coefficients the elementwise pass reads (no element pays a square root or a
//      division). The counters are reset by that block, so they need no memset.
// Statistics: each thread sums its values' deviations from a shift (the chunk's first
// value of the channel), turns them into a Welford state (count, mean, M2), and the states
// are combined with Chan's formula (resattn::welford_combine); the backward's sums are
// plain sums; all in acc_t (float32; float64 for float64). Every combination happens
// in an order fixed by the shape: bit-identical run to run and on any device size (number
// of SMs); the one atomic counts arrivals, it never sums values.
//
// Elementwise passes (normalise + ReLU; the backward's apply) run over the flat memory
// order, VEC elements (128 bits) per access when the channel extent allows it (NCHW:
// HW % VEC == 0, a vector stays in one channel; channels_last: C % VEC == 0) and every
// pointer is 16-byte aligned; else one element at a time. Index math is 32-bit when every
// offset fits (fits_int32), else 64-bit; loop counters are 64-bit. In eval each block
// first computes every channel's (mean, scale, bias) into its shared memory (a global
// table written by one small kernel when C is too large for 48 KiB).
//
// Passes over x (= launches): training forward 2 (statistics; normalise); eval forward 1;
// backward 2 in training or with weight_grads (sums; apply) and 1 in eval without. (An
// eval pass with C in the thousands adds one small kernel for its rows; see eval_rows.)
// batch_norm_update_stats: one kernel for both running tensors and num_batches_tracked.
// batch_norm_relu_with_update: the training forward's two launches, the running update
// done by the normalise kernel's first block (no launch of its own).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
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
// Per-channel rows the passes over x read: mean, scale, bias, invstd (normalise, eval
// backward, the backward's sums); training backward: those and grad_bias / M, grad_weight / M. Computed
// once per channel, so that no element pays a square root or a division.
constexpr int kFwdRow = 4;
constexpr int kBwdRow = 6;
// The eval passes build their rows in shared memory up to this size (else in global memory).
constexpr int64_t kMaxRowsSharedBytes = 48 * 1024;

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
  // A partial that another block of this launch wrote: read past L1, which is not
  // coherent across multiprocessors.
  static __device__ __forceinline__ Welford load(const Welford* p) {
    return {__ldcg(&p->n), __ldcg(&p->mean), __ldcg(&p->m2)};
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
  static __device__ __forceinline__ GradSums load(const GradSums* p) {  // as Welford::load
    return {__ldcg(&p->dy), __ldcg(&p->dy_xmu)};
  }
  __device__ __forceinline__ GradSums shfl_down(unsigned int offset) const {
    return {__shfl_down_sync(kFullMask, dy, offset), __shfl_down_sync(kFullMask, dy_xmu, offset)};
  }
};

// One thread's share of a chunk, as sums of deviations from a shift (a value of the same
// channel, so the deviations are of the order of the spread): no division per element;
// converted to a Welford state once, before the threads combine.
template <typename acc_t>
struct ShiftedSums {
  acc_t shift, n, s1, s2;

  static __device__ __forceinline__ ShiftedSums from_shift(acc_t shift) {
    return {shift, acc_t(0), acc_t(0), acc_t(0)};
  }
  __device__ __forceinline__ void add(acc_t v) {
    const acc_t d = v - shift;
    n += acc_t(1);
    s1 += d;
    s2 += d * d;
  }
  __device__ __forceinline__ Welford<acc_t> welford() const {
    if (n == acc_t(0)) return Welford<acc_t>::zero();
    const acc_t d_mean = s1 / n;
    const acc_t m2 = s2 - s1 * d_mean;
    return {n, shift + d_mean, m2 > acc_t(0) ? m2 : acc_t(0)};
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

// ------------------------------------------------------------ single-launch reductions
// batch_norm_relu_with_update: the running statistics the normalise kernel's first block
// updates from the batch's (mean == nullptr: none). Float32, or x's dtype (is_float false).
struct RunningUpdate {
  void* mean;
  void* var;
  bool is_float;
  double momentum;
  int64_t count;                 // N * H * W
  int64_t* num_batches_tracked;  // nullptr: none; else the update of channel 0 adds one
  const void* batch_mean;        // (C,) acc_t: the statistics kernel's mean and biased var
  const void* batch_var;
};

// Where the block that finishes a tile writes the reduction's per-channel results.
template <typename scalar_t>
struct ReduceOut {
  using acc_t = at::opmath_type<scalar_t>;
  BnParams<scalar_t> p;     // the parameters (and, for the sums, the statistics) of the rows
  acc_t* first;             // statistics: mean; sums: grad_weight
  acc_t* second;            // statistics: biased var; sums: grad_bias
  acc_t* rows;              // the next pass's per-channel rows; nullptr: none
  acc_t inv_count;          // 1 / (N * H * W), for the sums' rows
  unsigned int* counters;   // one per tile, zero between launches (reduction_counters)
  int64_t C;
};

// One channel's running statistics in run_t's accumulation dtype: bn_update_stats_kernel's
// arithmetic exactly (the same results, bit for bit, as the separate update).
template <typename run_t>
__device__ __forceinline__ void update_running_as(void* mean_ptr, void* var_ptr, int64_t c,
                                                  at::opmath_type<run_t> mean,
                                                  at::opmath_type<run_t> var, const RunningUpdate& run) {
  using acc_t = at::opmath_type<run_t>;
  run_t* rm = static_cast<run_t*>(mean_ptr);
  run_t* rv = static_cast<run_t*>(var_ptr);
  acc_t m = static_cast<acc_t>(rm[c]);
  acc_t v = static_cast<acc_t>(rv[c]);
  bn_update_running<acc_t>(m, v, mean, var, static_cast<acc_t>(run.momentum), run.count);
  rm[c] = static_cast<run_t>(m);
  rv[c] = static_cast<run_t>(v);
}

template <typename scalar_t>
__device__ __forceinline__ void update_running(const RunningUpdate& run, int64_t c,
                                               at::opmath_type<scalar_t> mean,
                                               at::opmath_type<scalar_t> var) {
  if (run.is_float) {
    update_running_as<float>(run.mean, run.var, c, static_cast<float>(mean), static_cast<float>(var), run);
  } else {
    update_running_as<scalar_t>(run.mean, run.var, c, mean, var, run);
  }
  if (c == 0 && run.num_batches_tracked != nullptr) *run.num_batches_tracked += 1;
}

// The reduction's kernels reserve this many bytes at the start of their dynamic shared
// memory for arrive_last's flag (the reduction states follow, 16-byte aligned).
constexpr size_t kFlagBytes = 16;

// Counts this block's finished item of `tile` and tells whether it was the tile's last of
// `chunks` (then the tile's count is set back to zero for the next launch). All threads
// of the block call it, after writing their partials; all get the same answer. The fence
// before the count publishes this block's partials to the block that sees the last count
// (CUDA's threadFenceReduction pattern); that block reads them with __ldcg.
__device__ __forceinline__ bool arrive_last(unsigned int* counters, uint32_t tile, uint32_t chunks,
                                            unsigned int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const bool last = atomicAdd(counters + tile, 1u) + 1u == chunks;
    if (last) counters[tile] = 0u;
    *flag = last ? 1u : 0u;
  }
  __syncthreads();
  return *flag != 0u;
}

// One (channel, chunk) item of an NCHW reduction: vectors [begin, begin + size) of channel
// c's N * HW / VEC, sample-major. Offsets within the chunk are 32-bit (a chunk is small):
// the per-vector division stays a 32-bit one even on the 64-bit index path.
template <typename index_t>
struct NchwChunk {
  index_t c, n0;
  uint32_t r0, size;

  __device__ __forceinline__ NchwChunk(uint32_t item, uint32_t chunks, index_t chunk,
                                       index_t per_channel, index_t hwv) {
    c = static_cast<index_t>(item / chunks);
    const index_t begin = static_cast<index_t>(item % chunks) * chunk;
    size = static_cast<uint32_t>(per_channel - begin < chunk ? per_channel - begin : chunk);
    n0 = begin / hwv;
    r0 = static_cast<uint32_t>(begin - n0 * hwv);
  }
  // Vector offset in x of the chunk's j-th vector.
  __device__ __forceinline__ index_t offset(uint32_t j, index_t C, index_t hwv) const {
    const uint32_t t = r0 + j;
    const uint32_t q = t / static_cast<uint32_t>(hwv);
    const uint32_t r = t - q * static_cast<uint32_t>(hwv);
    return ((n0 + static_cast<index_t>(q)) * C + c) * hwv + static_cast<index_t>(r);
  }
};

// One warp (lane 0..31, all 32 call) combines channel c's partials `pc`, in index order,
// into its mean, biased var and row of the normalise pass. The partials (n_k, mean_k,
// M2_k) combine as n = sum n_k, mean = sum(n_k mean_k) / n,
// M2 = sum(M2_k + n_k (mean_k - mean)^2): plain sums in a fixed order, the divisions once.
template <typename scalar_t>
__device__ __forceinline__ void finalize_stats_channel(const Welford<at::opmath_type<scalar_t>>* pc,
                                                       uint32_t chunks, int64_t c, int lane,
                                                       const ReduceOut<scalar_t>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  GradSums<acc_t> sums = GradSums<acc_t>::zero();  // (sum n_k, sum n_k mean_k)
  for (uint32_t k = lane; k < chunks; k += kWarp) {
    const Welford<acc_t> w = Welford<acc_t>::load(pc + k);
    sums.dy += w.n;
    sums.dy_xmu += w.n * w.mean;
  }
  warp_reduce(sums);
  const acc_t n = __shfl_sync(kFullMask, sums.dy, 0);
  const acc_t mu = __shfl_sync(kFullMask, sums.dy_xmu, 0) / n;
  acc_t m2 = 0;
  for (uint32_t k = lane; k < chunks; k += kWarp) {
    const Welford<acc_t> w = Welford<acc_t>::load(pc + k);
    const acc_t d = w.mean - mu;
    m2 += w.m2 + w.n * d * d;
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) m2 += __shfl_down_sync(kFullMask, m2, offset);
  if (lane == 0) {
    const acc_t v = m2 / n;
    out.first[c] = mu;
    out.second[c] = v;
    const acc_t invstd = bn_invstd<acc_t>(v, out.p.eps);
    acc_t* row = out.rows + c * kFwdRow;
    row[0] = mu;
    row[1] = out.p.weight.load(c, acc_t(1)) * invstd;
    row[2] = out.p.bias.load(c, acc_t(0));
    row[3] = invstd;
  }
}

// One warp per channel of channels_last tile `tile` (blockDim.x vectors of `vec` channels):
// warp w of the block's linear threads runs body(c, lane) for channels w, w +
// kWarpsPerBlock, ... of the tile (a warp-uniform loop, as the warp shuffles need).
template <typename Body>
__device__ __forceinline__ void for_tile_channels(uint32_t tile, int vec, int64_t C, Body body) {
  const int linear = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  const int64_t width = static_cast<int64_t>(blockDim.x) * vec;
  const int64_t c0 = static_cast<int64_t>(tile) * width;
  const int64_t c1 = c0 + width < C ? c0 + width : C;
  for (int64_t c = c0 + linear / kWarp; c < c1; c += kWarpsPerBlock) body(c, linear % kWarp);
}

// ------------------------------------------------------------- the reductions' skeleton
// A reduction's cut (ReducePlan) as its kernels take it, in their index type. NCHW reads
// C, hwv (HW / VEC) and extent (N * HW / VEC vectors per channel); channels_last reads cvs
// (C / VEC channel vectors) and extent (N * HW rows).
template <typename index_t>
struct ReduceShape {
  index_t C, hwv, cvs, extent, chunk;
  uint32_t chunks, items;
};

// Both reductions (the statistics; the backward's sums) walk the same items and finish
// the same way: each thread accumulates its share of an item into a State, the block
// combines the states and stores the item's partials, and the block that completes a
// channel (NCHW) or a channel tile (channels_last) finalizes it, one warp per channel
// (arrive_last). Only the accumulation and the finalize differ: the callables given.

// NCHW: item = c * chunks + k covers vectors [k * chunk, (k + 1) * chunk) of channel c's
// N * HW / VEC (sample-major); its partial goes to part[item]. accumulate(ch) returns the
// calling thread's State of chunk ch (NchwChunk); finalize(pc, c, lane) combines channel
// c's partials pc (finalize_stats_channel, finalize_grad_channel).
template <typename State, typename index_t, typename Accumulate, typename Finalize>
__device__ __forceinline__ void reduce_nchw_items(State* __restrict__ part, unsigned int* counters,
                                                  const ReduceShape<index_t>& sh,
                                                  Accumulate accumulate, Finalize finalize) {
  const uint32_t chunks = sh.chunks;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  unsigned int* flag = reinterpret_cast<unsigned int*>(resattn_smem);
  State* smem = reinterpret_cast<State*>(resattn_smem + kFlagBytes);
  for (uint32_t item = blockIdx.x; item < sh.items; item += gridDim.x) {
    const NchwChunk<index_t> ch(item, chunks, sh.chunk, sh.extent, sh.hwv);
    State s = accumulate(ch);
    block_reduce(s, smem);
    if (threadIdx.x == 0) part[item] = s;
    if (arrive_last(counters, static_cast<uint32_t>(ch.c), chunks, flag) && threadIdx.x < kWarp) {
      finalize(part + static_cast<int64_t>(ch.c) * chunks, static_cast<int64_t>(ch.c),
               static_cast<int>(threadIdx.x));
    }
  }
}

// channels_last: item = tile * chunks + k covers rows [k * chunk, (k + 1) * chunk) of
// channel vectors [tile * blockDim.x, (tile + 1) * blockDim.x); channel c's partial of
// chunk k goes to part[c * chunks + k]. accumulate(cv, begin, end, s) adds rows
// [begin, end) of channel vector cv < cvs (threadIdx.y's share) to s[VEC], which start
// at zero; finalize as reduce_nchw_items.
template <typename State, int VEC, typename index_t, typename Accumulate, typename Finalize>
__device__ __forceinline__ void reduce_cl_items(State* __restrict__ part, unsigned int* counters,
                                                int64_t C, const ReduceShape<index_t>& sh,
                                                Accumulate accumulate, Finalize finalize) {
  const uint32_t chunks = sh.chunks;
  const index_t chunk = sh.chunk, rows = sh.extent;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  unsigned int* flag = reinterpret_cast<unsigned int*>(resattn_smem);
  State* smem = reinterpret_cast<State*>(resattn_smem + kFlagBytes);
  for (uint32_t item = blockIdx.x; item < sh.items; item += gridDim.x) {
    const uint32_t k_chunk = item % chunks;
    const index_t cv = static_cast<index_t>(item / chunks) * static_cast<index_t>(blockDim.x) +
                       static_cast<index_t>(threadIdx.x);
    const index_t begin = static_cast<index_t>(k_chunk) * chunk;
    const index_t end = rows - begin < chunk ? rows : begin + chunk;
    State s[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = State::zero();
    if (cv < sh.cvs) accumulate(cv, begin, end, s);
    block_reduce_columns<State, VEC>(s, smem);
    if (threadIdx.y == 0 && cv < sh.cvs) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) part[(static_cast<int64_t>(cv) * VEC + k) * chunks + k_chunk] = s[k];
    }
    const uint32_t tile = item / chunks;
    if (arrive_last(counters, tile, chunks, flag)) {
      for_tile_channels(tile, VEC, C, [&](int64_t c, int lane) { finalize(part + c * chunks, c, lane); });
    }
  }
}

// ------------------------------------------------------------- statistics (training)
// NCHW partials: item = c * chunks + k covers vectors [k * chunk, (k + 1) * chunk) of
// channel c's N * HW / VEC (sample-major), written to part[item].
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_stats_nchw_kernel(
    const scalar_t* __restrict__ x, Welford<at::opmath_type<scalar_t>>* __restrict__ part,
    ReduceOut<scalar_t> out, ReduceShape<index_t> sh) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const index_t C = sh.C, hwv = sh.hwv;
  reduce_nchw_items<Welford<acc_t>>(
      part, out.counters, sh,
      [&](const NchwChunk<index_t>& ch) {
        // The chunk's first value is every thread's shift.
        ShiftedSums<acc_t> sums = ShiftedSums<acc_t>::from_shift(
            static_cast<acc_t>(x[ch.offset(0, C, hwv) * VEC]));
        for (uint32_t j = threadIdx.x; j < ch.size; j += kThreads) {
          const vec_t v = reinterpret_cast<const vec_t*>(x)[ch.offset(j, C, hwv)];
#pragma unroll
          for (int k = 0; k < VEC; ++k) sums.add(static_cast<acc_t>(v.val[k]));
        }
        return sums.welford();
      },
      [&](const Welford<acc_t>* pc, int64_t c, int lane) {
        finalize_stats_channel(pc, sh.chunks, c, lane, out);
      });
}

// channels_last partials, items and layout as reduce_cl_items.
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_stats_cl_kernel(
    const scalar_t* __restrict__ x, Welford<at::opmath_type<scalar_t>>* __restrict__ part,
    ReduceOut<scalar_t> out, ReduceShape<index_t> sh) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const index_t cvs = sh.cvs;
  reduce_cl_items<Welford<acc_t>, VEC>(
      part, out.counters, out.C, sh,
      [&](index_t cv, index_t begin, index_t end, Welford<acc_t>(&s)[VEC]) {
        // The chunk's first row is the shift of every thread of this column.
        const vec_t first = reinterpret_cast<const vec_t*>(x)[begin * cvs + cv];
        ShiftedSums<acc_t> sums[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) sums[k] = ShiftedSums<acc_t>::from_shift(static_cast<acc_t>(first.val[k]));
        for (int64_t rr = begin + static_cast<int64_t>(threadIdx.y); rr < end; rr += blockDim.y) {
          const index_t r = static_cast<index_t>(rr);
          const vec_t v = reinterpret_cast<const vec_t*>(x)[r * cvs + cv];
#pragma unroll
          for (int k = 0; k < VEC; ++k) sums[k].add(static_cast<acc_t>(v.val[k]));
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) s[k] = sums[k].welford();
      },
      [&](const Welford<acc_t>* pc, int64_t c, int lane) {
        finalize_stats_channel(pc, sh.chunks, c, lane, out);
      });
}

// The rows (kFwdRow: mean, scale, bias, invstd) of channels [first, C) with stride `step`, from
// the statistics and parameters in p.
template <typename scalar_t>
__device__ __forceinline__ void fill_rows(const BnParams<scalar_t>& p, int64_t first, int64_t step,
                                          int64_t C, at::opmath_type<scalar_t>* rows) {
  for (int64_t c = first; c < C; c += step) {
    const ChannelCoef<at::opmath_type<scalar_t>> q = channel_coef(p, c);
    rows[c * kFwdRow + 0] = q.mean;
    rows[c * kFwdRow + 1] = q.scale;
    rows[c * kFwdRow + 2] = q.bias;
    rows[c * kFwdRow + 3] = q.invstd;
  }
}

// The rows of every channel into global memory, for the eval passes when they do not fit
// in a block's shared memory (C in the thousands).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_rows_kernel(BnParams<scalar_t> p, int64_t C,
                                                           at::opmath_type<scalar_t>* __restrict__ rows) {
  fill_rows(p, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
            static_cast<int64_t>(gridDim.x) * blockDim.x, C, rows);
}

// The per-channel rows an elementwise pass reads: `global_rows` when given (written by a
// finalize kernel), else computed by this block into its shared memory (all threads call).
template <typename scalar_t>
__device__ __forceinline__ const at::opmath_type<scalar_t>* channel_rows(
    const at::opmath_type<scalar_t>* global_rows, const BnParams<scalar_t>& p, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  if (global_rows != nullptr) return global_rows;
  RESATTN_DYNAMIC_SHARED(unsigned char, resattn_smem);
  acc_t* rows = reinterpret_cast<acc_t*>(resattn_smem);
  fill_rows(p, threadIdx.x, blockDim.x, C, rows);
  __syncthreads();
  return rows;
}

// The grid stride of an elementwise pass in (vector within plane or channel vector,
// channel) terms: stride % inner and (stride / inner) % C, computed on the host.
template <typename index_t>
struct Stride {
  index_t pos, c;
};

// Where vector i of a grid-stride loop lies, followed from step to step without a
// division: `pos` = i % inner (NCHW: the vector within its plane; channels_last: the
// channel vector) and, NCHW only, `c` = (i / inner) % C.
template <typename index_t, bool kCL>
struct ChannelWalk {
  index_t pos, c, step_pos, step_c, inner, C;

  // i: the thread's first vector, below gridDim.x * blockDim.x < 2^32, so that the two
  // divisions are 32-bit ones even on the 64-bit index path.
  __device__ __forceinline__ ChannelWalk(uint32_t i, Stride<index_t> step, index_t inner_, index_t C_)
      : step_pos(step.pos), step_c(step.c), inner(inner_), C(C_) {
    const uint32_t q = static_cast<uint64_t>(inner) > i ? 0u : i / static_cast<uint32_t>(inner);
    pos = static_cast<index_t>(i) - static_cast<index_t>(q) * inner;
    if constexpr (kCL) {
      c = 0;
    } else {
      c = static_cast<uint64_t>(C) > q ? static_cast<index_t>(q)
                                       : static_cast<index_t>(q % static_cast<uint32_t>(C));
    }
  }
  __device__ __forceinline__ void advance() {
    pos += step_pos;
    const bool carry = pos >= inner;
    if (carry) pos -= inner;
    if constexpr (!kCL) {
      c += step_c + (carry ? index_t(1) : index_t(0));
      if (c >= C) c -= C;
    }
  }
};

// ----------------------------------------------------------------- normalise + ReLU
// Flat over the memory order, VEC elements per vector i. NCHW (kCL false): vector i lies
// in channel (i / hwv) % C; channels_last: its channels are (i % cvs) * VEC + k.
// `inner` is hwv (NCHW) or cvs (channels_last). Per-channel rows (mean, scale, bias) from
// the statistics kernels in training; in eval computed per block into shared memory (or by
// bn_rows_kernel), and block 0 also writes the statistics it normalised with into
// mean_out / var_out (the op's new (C,) outputs). With `run` (batch_norm_relu_with_update),
// block 0 first updates the running statistics from the batch's: here rather than in the
// statistics kernel's finalize, where the double-precision division's slow-path call
// would cost the reduction loop a stack frame (sm_90).
template <typename scalar_t, typename index_t, int VEC, bool kCL>
__global__ void __launch_bounds__(kThreads) bn_relu_forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, BnParams<scalar_t> p,
    const at::opmath_type<scalar_t>* __restrict__ global_rows, index_t C, index_t inner,
    Stride<index_t> step, int64_t nvec, at::opmath_type<scalar_t>* __restrict__ mean_out,
    at::opmath_type<scalar_t>* __restrict__ var_out, RunningUpdate run) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  if (run.mean != nullptr && blockIdx.x == 0) {
    const acc_t* bm = static_cast<const acc_t*>(run.batch_mean);
    const acc_t* bv = static_cast<const acc_t*>(run.batch_var);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) update_running<scalar_t>(run, c, bm[c], bv[c]);
  }
  if (mean_out != nullptr && blockIdx.x == 0) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      mean_out[c] = p.mean.load(c, acc_t(0));
      var_out[c] = p.var.load(c, acc_t(1));
    }
  }
  const acc_t* rows = channel_rows(global_rows, p, C);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  ChannelWalk<index_t, kCL> walk(static_cast<uint32_t>(first < nvec ? first : 0), step, inner, C);
  for (int64_t i = first; i < nvec; i += stride, walk.advance()) {
    const index_t li = static_cast<index_t>(i);
    const vec_t xv = reinterpret_cast<const vec_t*>(x)[li];
    vec_t ov;
    if constexpr (kCL) {
      const acc_t* row = rows + walk.pos * (VEC * kFwdRow);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t* r = row + k * kFwdRow;
        ov.val[k] = static_cast<scalar_t>(
            bn_relu_forward<acc_t>(static_cast<acc_t>(xv.val[k]), r[0], r[1], r[2]));
      }
    } else {
      const acc_t* r = rows + walk.c * kFwdRow;
      const acc_t mean = r[0], scale = r[1], bias = r[2];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        ov.val[k] = static_cast<scalar_t>(
            bn_relu_forward<acc_t>(static_cast<acc_t>(xv.val[k]), mean, scale, bias));
      }
    }
    reinterpret_cast<vec_t*>(out)[li] = ov;
  }
}

// ---------------------------------------------------------------------- backward sums
// One warp (all 32 lanes call) combines channel c's partials `pc` in index order:
// grad_bias = sum(dy), grad_weight = sum(dy * x_hat) = invstd * sum(dy * (x - mean)); and,
// in training, the channel's row of the apply pass (kBwdRow: mean, scale, bias, invstd,
// grad_bias / M, grad_weight / M).
template <typename scalar_t>
__device__ __forceinline__ void finalize_grad_channel(const GradSums<at::opmath_type<scalar_t>>* pc,
                                                      uint32_t chunks, int64_t c, int lane,
                                                      const ReduceOut<scalar_t>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  GradSums<acc_t> s = GradSums<acc_t>::zero();
  for (uint32_t k = lane; k < chunks; k += kWarp) s.combine(GradSums<acc_t>::load(pc + k));
  warp_reduce(s);
  if (lane == 0) {
    const ChannelCoef<acc_t> q = channel_coef(out.p, c);
    const acc_t gw = s.dy_xmu * q.invstd;
    out.first[c] = gw;
    out.second[c] = s.dy;
    if (out.rows != nullptr) {
      acc_t* row = out.rows + c * kBwdRow;
      row[0] = q.mean;
      row[1] = q.scale;
      row[2] = q.bias;
      row[3] = q.invstd;
      row[4] = s.dy * out.inv_count;
      row[5] = gw * out.inv_count;
    }
  }
}

// NCHW sums of dy and dy * (x - mean), items as reduce_nchw_items, each channel's
// finished by the block that completes it (finalize_grad_channel). The ReLU mask's
// coefficients come from out.p (the saved statistics and the parameters), per item.
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_relu_grad_sums_nchw_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    GradSums<at::opmath_type<scalar_t>>* __restrict__ part, ReduceOut<scalar_t> out,
    ReduceShape<index_t> sh) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const index_t C = sh.C, hwv = sh.hwv;
  reduce_nchw_items<GradSums<acc_t>>(
      part, out.counters, sh,
      [&](const NchwChunk<index_t>& ch) {
        const ChannelCoef<acc_t> q = channel_coef(out.p, ch.c);
        const acc_t mean = q.mean, scale = q.scale, bias = q.bias;
        GradSums<acc_t> s = GradSums<acc_t>::zero();
        for (uint32_t j = threadIdx.x; j < ch.size; j += kThreads) {
          const index_t off = ch.offset(j, C, hwv);
          const vec_t gv = reinterpret_cast<const vec_t*>(grad)[off];
          const vec_t xv = reinterpret_cast<const vec_t*>(x)[off];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t xk = static_cast<acc_t>(xv.val[k]);
            const acc_t dy = bn_relu_dy<acc_t>(static_cast<acc_t>(gv.val[k]), xk, mean, scale, bias);
            s.dy += dy;
            s.dy_xmu += dy * (xk - mean);
          }
        }
        return s;
      },
      [&](const GradSums<acc_t>* pc, int64_t c, int lane) {
        finalize_grad_channel(pc, sh.chunks, c, lane, out);
      });
}

// channels_last sums; items, layout and finishing as reduce_cl_items.
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_relu_grad_sums_cl_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    GradSums<at::opmath_type<scalar_t>>* __restrict__ part, ReduceOut<scalar_t> out,
    ReduceShape<index_t> sh) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const index_t cvs = sh.cvs;
  reduce_cl_items<GradSums<acc_t>, VEC>(
      part, out.counters, out.C, sh,
      [&](index_t cv, index_t begin, index_t end, GradSums<acc_t>(&s)[VEC]) {
        ChannelCoef<acc_t> q[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) q[k] = channel_coef(out.p, static_cast<int64_t>(cv) * VEC + k);
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
      },
      [&](const GradSums<acc_t>* pc, int64_t c, int lane) {
        finalize_grad_channel(pc, sh.chunks, c, lane, out);
      });
}

// ---------------------------------------------------------------------- backward apply
// grad_x (+ grad_residual) over the flat memory order, vectors as bn_relu_forward_kernel.
// Training: per-channel rows of kBwdRow from the sums' finalize (global_rows); eval:
// grad_x = scale * dy from rows of kFwdRow, computed per block (or by bn_rows_kernel).
template <typename scalar_t, typename index_t, int VEC, bool kCL, bool kTrain>
__global__ void __launch_bounds__(kThreads) bn_relu_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ grad_residual, scalar_t* __restrict__ grad_x, BnParams<scalar_t> p,
    const at::opmath_type<scalar_t>* __restrict__ global_rows, index_t C, index_t inner,
    Stride<index_t> step, int64_t nvec) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  constexpr int kRow = kTrain ? kBwdRow : kFwdRow;
  const acc_t* rows;
  if constexpr (kTrain) {
    rows = global_rows;
  } else {
    rows = channel_rows(global_rows, p, C);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  ChannelWalk<index_t, kCL> walk(static_cast<uint32_t>(first < nvec ? first : 0), step, inner, C);
  auto apply = [&](int64_t i) {
    const index_t li = static_cast<index_t>(i);
    const vec_t gv = reinterpret_cast<const vec_t*>(grad)[li];
    const vec_t xv = reinterpret_cast<const vec_t*>(x)[li];
    const acc_t* row = kCL ? rows + walk.pos * (VEC * kRow) : rows + walk.c * kRow;
    acc_t gx[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t* r = kCL ? row + k * kRow : row;
      const acc_t xk = static_cast<acc_t>(xv.val[k]);
      const acc_t dy = bn_relu_dy<acc_t>(static_cast<acc_t>(gv.val[k]), xk, r[0], r[1], r[2]);
      if constexpr (kTrain) {
        gx[k] = bn_relu_grad_x_train<acc_t>(dy, xk, r[0], r[3], r[1], r[4], r[5]);
      } else {
        gx[k] = r[1] * dy;
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
  };
  if constexpr (sizeof(index_t) == 8) {
    // Not unrolled on the 64-bit path (tensors of 2^31 elements and more): unrolled, its
    // 64-bit offsets would spill on sm_80.
#pragma unroll 1
    for (int64_t i = first; i < nvec; i += stride, walk.advance()) apply(i);
  } else {
    for (int64_t i = first; i < nvec; i += stride, walk.advance()) apply(i);
  }
}

// ------------------------------------------------------------------ running statistics
template <typename run_t>
__global__ void __launch_bounds__(kThreads) bn_update_stats_kernel(
    run_t* __restrict__ running_mean, run_t* __restrict__ running_var, ChannelVec<run_t> mean,
    ChannelVec<run_t> var, at::opmath_type<run_t> momentum, int64_t count, int64_t C,
    int64_t* __restrict__ num_batches_tracked) {
  using acc_t = at::opmath_type<run_t>;
  // nn.BatchNorm2d's `num_batches_tracked += 1`, folded into this launch: one thread.
  if (num_batches_tracked != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *num_batches_tracked += 1;
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

// The 32-bit item counts of a reduction plan (a chunk's offsets are 32-bit too).
void check_plan(const ReducePlan& plan, int64_t inner) {
  TORCH_CHECK(plan.items < (int64_t{1} << 32) && inner + plan.chunk < (int64_t{1} << 32),
              "resattn_fast: batch_norm_relu: tensor too large for the CUDA kernels' reduction plan");
}

// The grid stride of an elementwise pass of `blocks` blocks (see ChannelWalk).
template <typename index_t>
Stride<index_t> grid_stride(unsigned int blocks, int64_t inner, int64_t C) {
  const int64_t stride = static_cast<int64_t>(blocks) * kThreads;
  return {static_cast<index_t>(stride % inner), static_cast<index_t>((stride / inner) % C)};
}

// A stream as a map key (cudaStream_t is a pointer; the emulation's stream an int).
template <typename S>
std::uintptr_t stream_key(S stream) {
  if constexpr (std::is_pointer_v<S>) {
    return reinterpret_cast<std::uintptr_t>(stream);
  } else {
    return static_cast<std::uintptr_t>(stream);
  }
}

// arrive_last's counters: at least `n` words, zero, for launches on `stream` of x's
// device. Allocated (zeroed) once per (device, stream) and kept: every launch leaves them
// zero again (the last block of each tile resets its count), so no launch pays a memset.
// Reductions on different streams may run at the same time, hence one buffer per stream.
unsigned int* reduction_counters(const at::Tensor& x, int64_t n, Stream stream) {
  static std::mutex mutex;
  // Never freed: the buffers must outlive every launch, and the allocator at exit.
  static auto* buffers = new std::map<std::pair<int64_t, std::uintptr_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counters = (*buffers)[{static_cast<int64_t>(x.device().index()), stream_key(stream)}];
  if (!counters.defined() || counters.numel() < n) {
    // Replacing a smaller buffer is safe: launches on this stream that still use it run
    // before any later use of its memory on the stream (the caching allocator's order).
    counters = at::zeros({std::max<int64_t>(n, 4096)}, x.options().dtype(at::kInt));
  }
  return reinterpret_cast<unsigned int*>(counters.data_ptr<int32_t>());
}

// One reduction's launch, as both the statistics (State = Welford) and the backward sums
// (State = GradSums) make it: the plan for x's shape and layout, its partials and tile
// counters, the kernels' ReduceShape and the launch shape (grid, block, dynamic shared
// memory: arrive_last's flag, then one State per warp and column).
template <typename State, typename index_t>
struct ReduceLaunch {
  ReduceShape<index_t> shape;
  at::Tensor workspace;  // the partials (partials_workspace)
  unsigned int* counters;
  unsigned int blocks;
  dim3 block;
  size_t smem;
  State* partials() const { return reinterpret_cast<State*>(workspace.data_ptr()); }
};

template <typename scalar_t, typename State, typename index_t, int VEC>
ReduceLaunch<State, index_t> prepare_reduction(bool cl, const at::Tensor& x, Stream stream) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t cvs = C / VEC, extent = cl ? N * HW : N * HW / VEC;
  const ReducePlan plan = plan_reduction(cl, C, extent, cvs);
  check_plan(plan, cl ? 0 : HW / VEC);
  ReduceLaunch<State, index_t> r;
  r.shape = {static_cast<index_t>(C), static_cast<index_t>(HW / VEC), static_cast<index_t>(cvs),
             static_cast<index_t>(extent), static_cast<index_t>(plan.chunk),
             static_cast<uint32_t>(plan.chunks), static_cast<uint32_t>(plan.items)};
  r.workspace = partials_workspace<scalar_t, State>(x, plan, C);
  r.counters = reduction_counters(x, plan.tiles, stream);
  r.blocks = num_blocks(plan.items * kThreads);
  r.block = dim3(plan.tx, plan.ty);
  r.smem = kFlagBytes + sizeof(State) * kWarpsPerBlock * (cl ? plan.tx * VEC : 1);
  return r;
}

// Runs `body` with constexpr bool `kTrain`.
#define RESATTN_DISPATCH_TRAIN(training, ...) \
  [&] {                                       \
    if (training) {                           \
      constexpr bool kTrain = true;           \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr bool kTrain = false;          \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// Where an eval pass finds its per-channel rows (kFwdRow): its blocks' shared memory when
// they fit (returns the bytes to launch with), else a global table filled by one small
// kernel first (`rows` set, returns 0).
template <typename scalar_t>
size_t eval_rows(const BnParams<scalar_t>& p, const at::Tensor& x, int64_t C, at::Tensor& rows,
                 Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bytes = C * kFwdRow * static_cast<int64_t>(sizeof(acc_t));
  if (bytes <= kMaxRowsSharedBytes) return static_cast<size_t>(bytes);
  rows = at::empty({C * kFwdRow}, x.options().dtype(acc_dtype(x)));
  RESATTN_LAUNCH(num_blocks(C), kThreads, 0, stream, bn_rows_kernel<scalar_t>)(p, C, rows.data_ptr<acc_t>());
  RESATTN_KERNEL_LAUNCH_CHECK();
  return 0;
}

// batch_norm_relu_with_update's running statistics (contiguous: the caller copies back).
struct RunningArgs {
  at::Tensor mean, var;
  double momentum;
  int64_t* num_batches_tracked;
};

// batch_norm_relu; with `update` (training only), also the running statistics, updated by
// the normalise kernel's first block.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps,
    const RunningArgs* update) {
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
    p.mean = channel_vec<scalar_t>(training ? std::nullopt : running_mean, keep);
    p.var = channel_vec<scalar_t>(training ? std::nullopt : running_var, keep);
    p.eps = static_cast<acc_t>(eps);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    const bool vec = vectorisable<scalar_t>(cl, C, HW, {xp, op});
    RESATTN_DISPATCH_VEC(vec, [&] {
      RESATTN_DISPATCH_INDEX(use32, [&] {
        at::Tensor rows;
        size_t rows_smem = 0;
        if (training) {
          const auto r = prepare_reduction<scalar_t, Welford<acc_t>, index_t, VEC>(cl, x, stream);
          rows = at::empty({C * kFwdRow}, x.options().dtype(acc_dtype(x)));
          const ReduceOut<scalar_t> fin{p, mp, vp, rows.data_ptr<acc_t>(), acc_t(0), r.counters, C};
          if (cl) {
            RESATTN_LAUNCH(r.blocks, r.block, r.smem, stream, bn_stats_cl_kernel<scalar_t, index_t, VEC>)(
                xp, r.partials(), fin, r.shape);
          } else {
            RESATTN_LAUNCH(r.blocks, r.block, r.smem, stream, bn_stats_nchw_kernel<scalar_t, index_t, VEC>)(
                xp, r.partials(), fin, r.shape);
          }
          RESATTN_KERNEL_LAUNCH_CHECK();
        } else {
          rows_smem = eval_rows<scalar_t>(p, x, C, rows, stream);
        }
        const int64_t nvec = x.numel() / VEC;
        const unsigned int blocks = num_blocks(nvec);
        const int64_t inner = cl ? C / VEC : HW / VEC;
        RunningUpdate run{nullptr, nullptr, false, 0.0, N * HW, nullptr, nullptr, nullptr};
        if (update != nullptr) {
          run = {update->mean.data_ptr(), update->var.data_ptr(), update->mean.scalar_type() == at::kFloat,
                 update->momentum, N * HW, update->num_batches_tracked, mp, vp};
        }
        RESATTN_DISPATCH_CL(cl, [&] {
          RESATTN_LAUNCH(blocks, kThreads, rows_smem, stream,
                         bn_relu_forward_kernel<scalar_t, index_t, VEC, kCL>)(
              xp, op, p, rows.defined() ? rows.data_ptr<acc_t>() : nullptr, static_cast<index_t>(C),
              static_cast<index_t>(inner), grid_stride<index_t>(blocks, inner, C), nvec,
              training ? nullptr : mp, training ? nullptr : vp, run);
          RESATTN_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps) {
  check_batch_norm_relu_args(x, weight, bias, running_mean, running_var, training, eps);
  check_on_device(x, "x");
  return batch_norm_relu_forward(x, weight, bias, running_mean, running_var, training, eps, nullptr);
}

// Training forward and the running update in the same launches (the normalise kernel's
// first block updates every channel from the batch statistics and counts the batch).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_with_update_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double momentum, double eps,
    const std::optional<at::Tensor>& num_batches_tracked) {
  check_batch_norm_relu_with_update_args(x, weight, bias, running_mean, running_var, eps,
                                         num_batches_tracked);
  check_on_device(x, "x");
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (x.numel() == 0) {  // no batch: the running statistics stay; the batch still counts
    if (has_nbt) num_batches_tracked->add_(1);
    return batch_norm_relu_forward(x, weight, bias, running_mean, running_var, true, eps, nullptr);
  }
  // In place: strided running tensors are updated through contiguous copies.
  RunningArgs update{running_mean.contiguous(), running_var.contiguous(), momentum,
                     has_nbt ? num_batches_tracked->data_ptr<int64_t>() : nullptr};
  auto result = batch_norm_relu_forward(x, weight, bias, running_mean, running_var, true, eps, &update);
  if (!update.mean.is_same(running_mean)) running_mean.copy_(update.mean);
  if (!update.var.is_same(running_var)) running_var.copy_(update.var);
  return result;
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
    const bool vec = vectorisable<scalar_t>(cl, C, HW, {gp, xp, rp, gxp});
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(N * HW);
    RESATTN_DISPATCH_VEC(vec, [&] {
      RESATTN_DISPATCH_INDEX(use32, [&] {
        at::Tensor rows;
        size_t rows_smem = 0;
        if (reduce) {
          const auto r = prepare_reduction<scalar_t, GradSums<acc_t>, index_t, VEC>(cl, x, stream);
          // Training: the apply pass's rows come from the sums; eval: from p (below).
          if (training) rows = at::empty({C * kBwdRow}, x.options().dtype(acc));
          const ReduceOut<scalar_t> fin{p, gw.data_ptr<acc_t>(), gb.data_ptr<acc_t>(),
                                        training ? rows.data_ptr<acc_t>() : nullptr, inv_count,
                                        r.counters, C};
          if (cl) {
            RESATTN_LAUNCH(r.blocks, r.block, r.smem, stream,
                           bn_relu_grad_sums_cl_kernel<scalar_t, index_t, VEC>)(
                gp, xp, r.partials(), fin, r.shape);
          } else {
            RESATTN_LAUNCH(r.blocks, r.block, r.smem, stream,
                           bn_relu_grad_sums_nchw_kernel<scalar_t, index_t, VEC>)(
                gp, xp, r.partials(), fin, r.shape);
          }
          RESATTN_KERNEL_LAUNCH_CHECK();
        }
        if (!training) rows_smem = eval_rows<scalar_t>(p, x, C, rows, stream);
        const int64_t nvec = x.numel() / VEC;
        const unsigned int blocks = num_blocks(nvec);
        const int64_t inner = cl ? C / VEC : HW / VEC;
        RESATTN_DISPATCH_CL(cl, [&] {
          RESATTN_DISPATCH_TRAIN(training, [&] {
            RESATTN_LAUNCH(blocks, kThreads, rows_smem, stream,
                           bn_relu_backward_kernel<scalar_t, index_t, VEC, kCL, kTrain>)(
                gp, xp, rp, gxp, p, rows.defined() ? rows.data_ptr<acc_t>() : nullptr,
                static_cast<index_t>(C), static_cast<index_t>(inner),
                grid_stride<index_t>(blocks, inner, C), nvec);
            RESATTN_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
  return results();
}

void batch_norm_update_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const at::Tensor& mean, const at::Tensor& var, double momentum,
                                  int64_t count, const std::optional<at::Tensor>& num_batches_tracked) {
  check_batch_norm_update_args(running_mean, running_var, mean, var, count, num_batches_tracked);
  check_on_device(running_mean, "running_mean");
  const DeviceGuard guard(running_mean.device());
  const int64_t C = running_mean.size(0);
  int64_t* nbt = num_batches_tracked.has_value() && num_batches_tracked->defined()
                     ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  if (C == 0 && nbt == nullptr) return;
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
        rm.data_ptr<scalar_t>(), rv.data_ptr<scalar_t>(), m, v, static_cast<acc_t>(momentum), count, C, nbt);
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
  m.impl("batch_norm_relu_with_update", &resattn::cuda::batch_norm_relu_with_update_cuda);
}
