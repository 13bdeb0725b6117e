// Vectorised kernels of batch_norm_relu (statistics, normalise+ReLU) and its backward
// (reduction, apply), compiled once per ISA (included by kernels_<isa>.cpp after
// <ATen/cpu/vec/vec.h>). The per-channel arrays (mean, scale, bias, ...) arrive in acc_t
// from batch_norm_relu.cpp, which derives them with kernels/batch_norm_relu.h.
//
// Layouts:
// - NCHW: channel c is N planes of HW contiguous values. Reductions split each plane into
//   segments of at most kBnBlock values (one work unit each); elementwise passes walk
//   the flat tensor and take the channel's parameters once per plane.
// - channels_last: N * HW rows of C contiguous values, vectorised over C. Reductions
//   split the rows into groups of about kBnBlock values (one work unit each) with
//   per-channel partials per group.
//
// Reproducibility: the units depend on the shape only, never on the thread count, and
// their per-channel partials are combined in one fixed order after the parallel loop,
// so statistics and gradients are bit-identical run to run and for any thread count.
//
// Statistics: one streaming pass. Within a unit, shifted sums S1 = sum(x - k) and
// S2 = sum((x - k)^2) with k a value of the unit itself (its first value per channel), so
// mean = k + S1 / n and M2 = S2 - S1^2 / n lose nothing to |mean| >> std; units (at most
// kBnBlock values per channel) are merged with Chan's combination
// (resattn::welford_combine). Half types load as float32 and round once at the store.
#pragma once

#include "vec_io.h"

namespace resattn {
namespace cpu {
namespace CPU_CAPABILITY {

// Values per reduction unit (an NCHW plane segment or a channels_last row group): short
// enough sums for float32, long enough that the partials are few.
constexpr int64_t kBnBlock = 1 << 15;
// Rows per channels_last group at most: each channel's partial sums accumulate one row
// at a time, so few channels would otherwise mean long sequential sums.
constexpr int64_t kBnMaxGroupRows = 256;
// Rows per pass over a channels_last row group's accumulators.
constexpr int64_t kBnRowBlock = 4;
// Values per at::parallel_for task of the elementwise passes.
constexpr int64_t kBnGrain = 1 << 15;

// The reductions read x (and grad) once, with enough work per value that the hardware
// prefetchers fall behind (measured on the channels_last statistics: half the bandwidth
// of a plain sum over the same bytes): their loads are prefetched kBnPrefetchBytes ahead.
constexpr int64_t kBnPrefetchBytes = 4096;

inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + kBnPrefetchBytes);
  __builtin_prefetch(static_cast<const char*>(p) + kBnPrefetchBytes + 64);
}

template <typename acc_t>
inline acc_t hsum(const at::vec::Vectorized<acc_t>& v) {
  constexpr int64_t kVec = at::vec::Vectorized<acc_t>::size();
  alignas(64) acc_t buf[kVec];
  v.store(buf);
  acc_t s = buf[0];
  for (int64_t i = 1; i < kVec; ++i) s += buf[i];
  return s;
}

// The reduction units of a shape (see the header comment).
struct BnUnits {
  // NCHW: unit u = plane * nseg + seg, values [seg * seg_len, min(HW, (seg + 1) * seg_len))
  // of plane (n * C + c). channels_last: unit g = rows [g * rows, min(R, (g + 1) * rows)).
  int64_t count;
  int64_t nseg, seg_len;  // NCHW
  int64_t rows, R;        // channels_last

  explicit BnUnits(const BatchNormShape& s) : count(0), nseg(1), seg_len(1), rows(1), R(s.N * s.HW) {
    if (s.channels_last) {
      rows = std::min(kBnMaxGroupRows, std::max<int64_t>(1, kBnBlock / s.C));
      count = (R + rows - 1) / rows;
    } else {
      nseg = (s.HW + kBnBlock - 1) / kBnBlock;
      seg_len = (s.HW + nseg - 1) / nseg;
      count = s.N * s.C * nseg;
    }
  }
  // NCHW: [begin, end) offsets within the plane of unit u.
  void segment(int64_t u, const BatchNormShape& s, int64_t* begin, int64_t* end) const {
    const int64_t seg = u % nseg;
    *begin = seg * seg_len;
    *end = std::min(s.HW, *begin + seg_len);
  }
  int64_t group_rows(int64_t g) const { return std::min(R, (g + 1) * rows) - g * rows; }
};

// ---- the reductions' skeletons --------------------------------------------------------
// The statistics and the backward sums walk the same units in the same orders; only what
// they accumulate differs.

// NCHW, in parallel: unit(u, c, off, n) for every unit u of channel c, its n values
// starting at flat offset off.
template <typename F>
inline void for_each_nchw_unit(const BnUnits& units, const BatchNormShape& s, const F& unit) {
  const int64_t grain = std::max<int64_t>(1, kBnGrain / units.seg_len);
  at::parallel_for(0, units.count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t plane = u / units.nseg;
      int64_t lo, hi;
      units.segment(u, s, &lo, &hi);
      unit(u, plane % s.C, plane * s.HW + lo, hi - lo);
    }
  });
}

// NCHW, serial: f(u) for the units of channel c in (n, segment) order, the fixed order in
// which their partials are combined. (N * C combinations cost microseconds, less than
// another parallel region, each one a barrier for every thread.)
template <typename F>
inline void for_each_unit_of_channel(const BnUnits& units, const BatchNormShape& s, int64_t c, const F& f) {
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t seg = 0; seg < units.nseg; ++seg) f((n * s.C + c) * units.nseg + seg);
  }
}

// channels_last, in parallel: for each row group g, its accumulator rows a = pa + g * C
// and b = pb + g * C are zeroed, then block(r0, r, a, b, kRows) runs for the rows
// [r0 + first, r0 + group_rows) in blocks of kRows = kBnRowBlock rows (a
// std::integral_constant; then single rows), r0 the group's first row: per block the
// accumulators are loaded and stored once, each channel still adds its rows in row order.
// Last finish(r0, nr, a, b) with the group's row count nr.
template <typename acc_t, typename Block, typename Finish>
inline void for_each_cl_group(const BnUnits& units, int64_t C, int64_t first, acc_t* pa, acc_t* pb,
                              const Block& block, const Finish& finish) {
  at::parallel_for(0, units.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      acc_t* a = pa + g * C;
      acc_t* b = pb + g * C;
      std::fill(a, a + C, acc_t(0));
      std::fill(b, b + C, acc_t(0));
      const int64_t r0 = g * units.rows, nr = units.group_rows(g);
      int64_t r = r0 + first;
      for (; r + kBnRowBlock <= r0 + nr; r += kBnRowBlock) {
        block(r0, r, a, b, std::integral_constant<int64_t, kBnRowBlock>());
      }
      for (; r < r0 + nr; ++r) block(r0, r, a, b, std::integral_constant<int64_t, 1>());
      finish(r0, nr, a, b);
    }
  });
}

// ---- statistics ----------------------------------------------------------------------

// Mean and M2 of n contiguous values: shifted sums around p[0] (see the header comment).
template <typename scalar_t>
inline void run_mean_m2(const scalar_t* p, int64_t n, typename VecIO<scalar_t>::acc_t* mean_out,
                        typename VecIO<scalar_t>::acc_t* m2_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const acc_t shift = static_cast<acc_t>(p[0]);
  const Vec vk(shift);
  Vec s0(0), s1(0), s2(0), s3(0), q0(0), q1(0), q2(0), q3(0);
  int64_t i = 0;
  for (; i + 2 * kChunk <= n; i += 2 * kChunk) {
    Vec a, b, c, d;
    prefetch_ahead(p + i);
    prefetch_ahead(p + i + kChunk);
    IO::load(p + i, a, b);
    IO::load(p + i + kChunk, c, d);
    a = a - vk;
    b = b - vk;
    c = c - vk;
    d = d - vk;
    s0 = s0 + a;
    s1 = s1 + b;
    s2 = s2 + c;
    s3 = s3 + d;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
    q2 = at::vec::fmadd(c, c, q2);
    q3 = at::vec::fmadd(d, d, q3);
  }
  for (; i + kChunk <= n; i += kChunk) {
    Vec a, b;
    IO::load(p + i, a, b);
    a = a - vk;
    b = b - vk;
    s0 = s0 + a;
    s1 = s1 + b;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
  }
  acc_t sum = hsum<acc_t>((s0 + s1) + (s2 + s3));
  acc_t sum2 = hsum<acc_t>((q0 + q1) + (q2 + q3));
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - shift;
    sum += d;
    sum2 += d * d;
  }
  const acc_t count = static_cast<acc_t>(n);
  *mean_out = shift + sum / count;
  *m2_out = std::max(acc_t(0), sum2 - sum * (sum / count));
}

template <typename scalar_t>
void bn_stats_nchw(const BatchNormStatsArgs& a) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const BatchNormShape& s = a.s;
  const BnUnits units(s);
  const auto* x = static_cast<const scalar_t*>(a.x);
  std::vector<acc_t> pmean(units.count), pm2(units.count);
  for_each_nchw_unit(units, s, [&](int64_t u, int64_t, int64_t off, int64_t n) {
    run_mean_m2<scalar_t>(x + off, n, &pmean[u], &pm2[u]);
  });
  auto* mean = static_cast<acc_t*>(a.mean);
  auto* var = static_cast<acc_t*>(a.var);
  for (int64_t c = 0; c < s.C; ++c) {
    acc_t n_a = 0, mean_a = 0, m2_a = 0;
    for_each_unit_of_channel(units, s, c, [&](int64_t u) {
      int64_t lo, hi;
      units.segment(u, s, &lo, &hi);
      resattn::welford_combine<acc_t>(n_a, mean_a, m2_a, static_cast<acc_t>(hi - lo), pmean[u], pm2[u]);
    });
    mean[c] = mean_a;
    var[c] = m2_a / n_a;
  }
}

// Walks the channel chunks of one channels_last row: f(c, n) for n = kChunk values from
// c, and one counted chunk (n < kChunk) at the end when C is not a multiple of kChunk.
// Used by the reductions, which must not visit a value twice.
template <int64_t kChunk, typename F>
inline void for_each_channel_chunk(int64_t C, const F& f) {
  int64_t c = 0;
  for (; c + kChunk <= C; c += kChunk) f(c, kChunk);
  if (c < C) f(c, C - c);
}

template <typename scalar_t>
void bn_stats_cl(const BatchNormStatsArgs& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using AIO = AccIO<acc_t>;
  constexpr int64_t kChunk = IO::kChunk;
  const BatchNormShape& s = a.s;
  const int64_t C = s.C;
  const BnUnits units(s);
  const auto* x = static_cast<const scalar_t*>(a.x);
  // Per group: the mean and M2 of each channel over the group's rows, from shifted sums
  // around the group's first row (see the header comment), which itself adds nothing.
  std::vector<acc_t> pmean(units.count * C), pm2(units.count * C);
  for_each_cl_group(
      units, C, 1, pmean.data(), pm2.data(),
      [&](int64_t r0, int64_t r, acc_t* gm, acc_t* g2, auto block) {
        constexpr int64_t kRows = decltype(block)::value;
        const scalar_t* xk = x + r0 * C;
        const scalar_t* xr = x + r * C;
        for_each_channel_chunk<kChunk>(C, [&](int64_t c, int64_t n) {
          Vec s0, s1, q0, q1, k0, k1;
          AIO::load(gm + c, n, s0, s1);
          AIO::load(g2 + c, n, q0, q1);
          if (n == kChunk) {
            IO::load(xk + c, k0, k1);
          } else {
            IO::load(xk + c, n, k0, k1);
          }
          for (int64_t j = 0; j < kRows; ++j) {
            const scalar_t* xp = xr + j * C + c;
            Vec x0, x1;
            prefetch_ahead(xp);
            if (n == kChunk) {
              IO::load(xp, x0, x1);
            } else {
              IO::load(xp, n, x0, x1);
            }
            x0 = x0 - k0;
            x1 = x1 - k1;
            s0 = s0 + x0;
            s1 = s1 + x1;
            q0 = at::vec::fmadd(x0, x0, q0);
            q1 = at::vec::fmadd(x1, x1, q1);
          }
          AIO::store(gm + c, n, s0, s1);
          AIO::store(g2 + c, n, q0, q1);
        });
      },
      [&](int64_t r0, int64_t nr, acc_t* gm, acc_t* g2) {
        const scalar_t* xk = x + r0 * C;
        const acc_t count = static_cast<acc_t>(nr);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t sum = gm[c];
          gm[c] = static_cast<acc_t>(xk[c]) + sum / count;
          g2[c] = std::max(acc_t(0), g2[c] - sum * (sum / count));
        }
      });
  // Chan's combination over the groups in order, vectorised over channels (every group
  // but the last has the same count).
  auto* mean = static_cast<acc_t*>(a.mean);
  auto* var = static_cast<acc_t*>(a.var);
  for_each_channel_chunk<kChunk>(C, [&](int64_t c, int64_t n) {
    Vec ma0, ma1, qa0, qa1;
    AIO::load(pmean.data() + c, n, ma0, ma1);
    AIO::load(pm2.data() + c, n, qa0, qa1);
    acc_t n_a = static_cast<acc_t>(units.group_rows(0));
    for (int64_t g = 1; g < units.count; ++g) {
      Vec mb0, mb1, qb0, qb1;
      AIO::load(pmean.data() + g * C + c, n, mb0, mb1);
      AIO::load(pm2.data() + g * C + c, n, qb0, qb1);
      const acc_t n_b = static_cast<acc_t>(units.group_rows(g));
      const acc_t n_ab = n_a + n_b;
      const acc_t frac_b = n_b / n_ab;
      const Vec vf(frac_b), vw(n_a * frac_b);
      const Vec d0 = mb0 - ma0, d1 = mb1 - ma1;
      ma0 = at::vec::fmadd(d0, vf, ma0);
      ma1 = at::vec::fmadd(d1, vf, ma1);
      qa0 = at::vec::fmadd(d0 * d0, vw, qa0 + qb0);
      qa1 = at::vec::fmadd(d1 * d1, vw, qa1 + qb1);
      n_a = n_ab;
    }
    const Vec inv(acc_t(1) / n_a);
    AIO::store(mean + c, n, ma0, ma1);
    AIO::store(var + c, n, qa0 * inv, qa1 * inv);
  });
}

// ---- elementwise passes --------------------------------------------------------------

// Runs body(i, n, P0, P1, stream) over every value of the tensor in chunks (n ==
// kChunk, or a counted chunk n < kChunk), where P0[k] / P1[k] hold the K per-channel
// parameters params[k] for the chunk's two vectors. `out` is the output the body
// writes (streaming stores start at its 64-byte boundaries).
template <typename scalar_t, int K, typename Body>
void bn_elementwise(const BatchNormShape& s, const void* const* params, const scalar_t* out,
                    bool stream, const Body& body) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const acc_t* prm[K];
  for (int k = 0; k < K; ++k) prm[k] = static_cast<const acc_t*>(params[k]);
  const int64_t C = s.C, HW = s.HW;
  if (!s.channels_last) {
    at::parallel_for(0, s.N * C * HW, kBnGrain, [&](int64_t begin, int64_t end) {
      for (int64_t lo = begin; lo < end;) {
        const int64_t plane = lo / HW;
        const int64_t hi = std::min(end, (plane + 1) * HW);
        const int64_t c = plane % C;
        Vec P[K];
        for (int k = 0; k < K; ++k) P[k] = Vec(prm[k][c]);
        int64_t i = lo;
        if (stream) {
          const int64_t head = align_index(out, lo, hi);
          if (head > lo) body(lo, head - lo, P, P, false);
          i = head;
        }
        for (; i + kChunk <= hi; i += kChunk) body(i, kChunk, P, P, stream);
        if (i < hi) {
          // Without streaming, a run of at least one chunk ends with a full chunk that
          // overlaps the previous one (every body writes a pure function of inputs it
          // does not write): no counted stores.
          if (!stream && hi - lo >= kChunk) {
            body(hi - kChunk, kChunk, P, P, false);
          } else {
            body(i, hi - i, P, P, false);
          }
        }
        lo = hi;
      }
      if (stream) stream_fence();
    });
    return;
  }
  // channels_last: whole rows per task; streaming only when every chunk of a row is a
  // whole, aligned run (C a multiple of kChunk; the output is a fresh allocation).
  const bool stream_rows = stream && C % kChunk == 0;
  at::parallel_for(0, s.N * HW, std::max<int64_t>(1, kBnGrain / C), [&](int64_t begin, int64_t end) {
    Vec P0[K], P1[K];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * C;
      for_each_chunk<kChunk>(C, [&](int64_t c, int64_t n) {
        for (int k = 0; k < K; ++k) AccIO<acc_t>::load(prm[k] + c, n, P0[k], P1[k]);
        body(base + c, n, P0, P1, stream_rows);
      });
    }
    if (stream_rows) stream_fence();
  });
}

template <typename scalar_t>
inline bool stream_output(const BatchNormShape& s) {
  return std::is_same<scalar_t, float>::value &&
         want_stream(s.N * s.C * s.HW * static_cast<int64_t>(sizeof(scalar_t)));
}

// out = relu((x - mean) * scale + bias); NaN propagates as in torch.relu.
template <typename scalar_t>
void bn_forward_typed(const BatchNormForwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* out = static_cast<scalar_t*>(a.out);
  const void* params[3] = {a.mean, a.scale, a.bias};
  bn_elementwise<scalar_t, 3>(a.s, params, out, stream_output<scalar_t>(a.s),
                              [&](int64_t i, int64_t n, const Vec* P0, const Vec* P1, bool stream) {
    const Vec zero(0);
    Vec x0, x1;
    if (n == kChunk) {
      IO::load(x + i, x0, x1);
    } else {
      IO::load(x + i, n, x0, x1);
    }
    const Vec y0 = at::vec::clamp_min(at::vec::fmadd(x0 - P0[0], P0[1], P0[2]), zero);
    const Vec y1 = at::vec::clamp_min(at::vec::fmadd(x1 - P1[0], P1[1], P1[2]), zero);
    if (n == kChunk) {
      store_chunk<scalar_t>(out + i, y0, y1, stream);
    } else {
      IO::store(out + i, n, y0, y1);
    }
  });
}

// ---- backward ------------------------------------------------------------------------

// sum(dy) and sum(dy * (x - mean)) of n contiguous values of one channel.
template <typename scalar_t>
inline void run_dy_sums(const scalar_t* g, const scalar_t* x, int64_t n, typename VecIO<scalar_t>::acc_t mean,
                        typename VecIO<scalar_t>::acc_t scale, typename VecIO<scalar_t>::acc_t bias,
                        typename VecIO<scalar_t>::acc_t* sum_dy, typename VecIO<scalar_t>::acc_t* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const Vec vm(mean), vs(scale), vb(bias), zero(0);
  Vec d0(0), d1(0), e0(0), e1(0);
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    Vec g0, g1, x0, x1;
    prefetch_ahead(g + i);
    prefetch_ahead(x + i);
    IO::load(g + i, g0, g1);
    IO::load(x + i, x0, x1);
    x0 = x0 - vm;
    x1 = x1 - vm;
    g0 = g0 & (at::vec::fmadd(x0, vs, vb) > zero);
    g1 = g1 & (at::vec::fmadd(x1, vs, vb) > zero);
    d0 = d0 + g0;
    d1 = d1 + g1;
    e0 = at::vec::fmadd(g0, x0, e0);
    e1 = at::vec::fmadd(g1, x1, e1);
  }
  acc_t sd = hsum<acc_t>(d0 + d1);
  acc_t se = hsum<acc_t>(e0 + e1);
  for (; i < n; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t dy = resattn::bn_relu_dy<acc_t>(static_cast<acc_t>(g[i]), xv, mean, scale, bias);
    sd += dy;
    se += dy * (xv - mean);
  }
  *sum_dy = sd;
  *sum_dy_xmu = se;
}

template <typename scalar_t>
void bn_backward_reduce_nchw(const BatchNormBackwardReduceArgs& a) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const BatchNormShape& s = a.s;
  const BnUnits units(s);
  const auto* g = static_cast<const scalar_t*>(a.grad);
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* mean = static_cast<const acc_t*>(a.mean);
  const auto* scale = static_cast<const acc_t*>(a.scale);
  const auto* bias = static_cast<const acc_t*>(a.bias);
  std::vector<acc_t> pd(units.count), pe(units.count);
  for_each_nchw_unit(units, s, [&](int64_t u, int64_t c, int64_t off, int64_t n) {
    run_dy_sums<scalar_t>(g + off, x + off, n, mean[c], scale[c], bias[c], &pd[u], &pe[u]);
  });
  auto* sum_dy = static_cast<acc_t*>(a.sum_dy);
  auto* sum_dy_xmu = static_cast<acc_t*>(a.sum_dy_xmu);
  for (int64_t c = 0; c < s.C; ++c) {
    acc_t sd = 0, se = 0;
    for_each_unit_of_channel(units, s, c, [&](int64_t u) {
      sd += pd[u];
      se += pe[u];
    });
    sum_dy[c] = sd;
    sum_dy_xmu[c] = se;
  }
}

template <typename scalar_t>
void bn_backward_reduce_cl(const BatchNormBackwardReduceArgs& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using AIO = AccIO<acc_t>;
  constexpr int64_t kChunk = IO::kChunk;
  const BatchNormShape& s = a.s;
  const int64_t C = s.C;
  const BnUnits units(s);
  const auto* g = static_cast<const scalar_t*>(a.grad);
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* mean = static_cast<const acc_t*>(a.mean);
  const auto* scale = static_cast<const acc_t*>(a.scale);
  const auto* bias = static_cast<const acc_t*>(a.bias);
  std::vector<acc_t> pd(units.count * C), pe(units.count * C);
  for_each_cl_group(
      units, C, 0, pd.data(), pe.data(),
      [&](int64_t, int64_t r, acc_t* ud, acc_t* ue, auto block) {
        constexpr int64_t kRows = decltype(block)::value;
        const Vec zero(0);
        for_each_channel_chunk<kChunk>(C, [&](int64_t c, int64_t n) {
          Vec m0, m1, s0, s1, b0, b1, d0, d1, e0, e1;
          AIO::load(mean + c, n, m0, m1);
          AIO::load(scale + c, n, s0, s1);
          AIO::load(bias + c, n, b0, b1);
          AIO::load(ud + c, n, d0, d1);
          AIO::load(ue + c, n, e0, e1);
          for (int64_t j = 0; j < kRows; ++j) {
            const scalar_t* gp = g + (r + j) * C + c;
            const scalar_t* xp = x + (r + j) * C + c;
            Vec g0, g1, x0, x1;
            prefetch_ahead(gp);
            prefetch_ahead(xp);
            if (n == kChunk) {
              IO::load(gp, g0, g1);
              IO::load(xp, x0, x1);
            } else {
              IO::load(gp, n, g0, g1);
              IO::load(xp, n, x0, x1);
            }
            x0 = x0 - m0;
            x1 = x1 - m1;
            g0 = g0 & (at::vec::fmadd(x0, s0, b0) > zero);
            g1 = g1 & (at::vec::fmadd(x1, s1, b1) > zero);
            d0 = d0 + g0;
            d1 = d1 + g1;
            e0 = at::vec::fmadd(g0, x0, e0);
            e1 = at::vec::fmadd(g1, x1, e1);
          }
          AIO::store(ud + c, n, d0, d1);
          AIO::store(ue + c, n, e0, e1);
        });
      },
      [](int64_t, int64_t, acc_t*, acc_t*) {});
  auto* sum_dy = static_cast<acc_t*>(a.sum_dy);
  auto* sum_dy_xmu = static_cast<acc_t*>(a.sum_dy_xmu);
  for_each_channel_chunk<kChunk>(C, [&](int64_t c, int64_t n) {
    Vec d0, d1, e0, e1;
    AIO::load(pd.data() + c, n, d0, d1);
    AIO::load(pe.data() + c, n, e0, e1);
    for (int64_t u = 1; u < units.count; ++u) {
      Vec f0, f1, h0, h1;
      AIO::load(pd.data() + u * C + c, n, f0, f1);
      AIO::load(pe.data() + u * C + c, n, h0, h1);
      d0 = d0 + f0;
      d1 = d1 + f1;
      e0 = e0 + h0;
      e1 = e1 + h1;
    }
    AIO::store(sum_dy + c, n, d0, d1);
    AIO::store(sum_dy_xmu + c, n, e0, e1);
  });
}

// grad_x = scale * (dy - k_mean - (x - mean) * k_xmu) [+ residual] (train), or
// scale * dy [+ residual] (eval).
template <typename scalar_t, bool kTrain, bool kResidual>
void bn_backward_apply_typed(const BatchNormBackwardApplyArgs& a) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  constexpr int K = kTrain ? 5 : 3;
  const auto* g = static_cast<const scalar_t*>(a.grad);
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* res = static_cast<const scalar_t*>(a.residual);
  auto* gx = static_cast<scalar_t*>(a.grad_x);
  const void* params[5] = {a.mean, a.scale, a.bias, a.k_mean, a.k_xmu};
  bn_elementwise<scalar_t, K>(a.s, params, gx, stream_output<scalar_t>(a.s),
                              [&](int64_t i, int64_t n, const Vec* P0, const Vec* P1, bool stream) {
    const Vec zero(0);
    Vec g0, g1, x0, x1, r0, r1;
    if (n == kChunk) {
      IO::load(g + i, g0, g1);
      IO::load(x + i, x0, x1);
      if constexpr (kResidual) IO::load(res + i, r0, r1);
    } else {
      IO::load(g + i, n, g0, g1);
      IO::load(x + i, n, x0, x1);
      if constexpr (kResidual) IO::load(res + i, n, r0, r1);
    }
    x0 = x0 - P0[0];
    x1 = x1 - P1[0];
    g0 = g0 & (at::vec::fmadd(x0, P0[1], P0[2]) > zero);
    g1 = g1 & (at::vec::fmadd(x1, P1[1], P1[2]) > zero);
    Vec o0, o1;
    if constexpr (kTrain) {
      o0 = P0[1] * (g0 - P0[3] - x0 * P0[4]);
      o1 = P1[1] * (g1 - P1[3] - x1 * P1[4]);
    } else {
      o0 = P0[1] * g0;
      o1 = P1[1] * g1;
    }
    if constexpr (kResidual) {
      o0 = o0 + r0;
      o1 = o1 + r1;
    }
    if (n == kChunk) {
      store_chunk<scalar_t>(gx + i, o0, o1, stream);
    } else {
      IO::store(gx + i, n, o0, o1);
    }
  });
}

template <typename scalar_t>
void bn_backward_apply_dispatch(const BatchNormBackwardApplyArgs& a) {
  const bool train = a.k_mean != nullptr;
  const bool residual = a.residual != nullptr;
  if (train) {
    return residual ? bn_backward_apply_typed<scalar_t, true, true>(a)
                    : bn_backward_apply_typed<scalar_t, true, false>(a);
  }
  return residual ? bn_backward_apply_typed<scalar_t, false, true>(a)
                  : bn_backward_apply_typed<scalar_t, false, false>(a);
}

// ---- entry points (dtype validated by the caller; anything else is unreachable) -------

#define RESATTN_BN_DISPATCH(DTYPE, FN, ARGS)                                          \
  switch (DTYPE) {                                                                    \
    case c10::ScalarType::Float: return FN<float>(ARGS);                              \
    case c10::ScalarType::Double: return FN<double>(ARGS);                            \
    case c10::ScalarType::Half: return FN<c10::Half>(ARGS);                           \
    case c10::ScalarType::BFloat16: return FN<c10::BFloat16>(ARGS);                   \
    default: return;                                                                  \
  }

inline void bn_stats(const BatchNormStatsArgs& a) {
  if (a.s.channels_last) {
    RESATTN_BN_DISPATCH(a.s.dtype, bn_stats_cl, a)
  } else {
    RESATTN_BN_DISPATCH(a.s.dtype, bn_stats_nchw, a)
  }
}

inline void bn_forward(const BatchNormForwardArgs& a) { RESATTN_BN_DISPATCH(a.s.dtype, bn_forward_typed, a) }

inline void bn_backward_reduce(const BatchNormBackwardReduceArgs& a) {
  if (a.s.channels_last) {
    RESATTN_BN_DISPATCH(a.s.dtype, bn_backward_reduce_cl, a)
  } else {
    RESATTN_BN_DISPATCH(a.s.dtype, bn_backward_reduce_nchw, a)
  }
}

inline void bn_backward_apply(const BatchNormBackwardApplyArgs& a) {
  RESATTN_BN_DISPATCH(a.s.dtype, bn_backward_apply_dispatch, a)
}

#undef RESATTN_BN_DISPATCH

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace resattn
