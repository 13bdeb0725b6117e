// Vectorised kernels of upsample_bilinear_add (forward) and its backward, compiled once
// per ISA (included by kernels_<isa>.cpp after <ATen/cpu/vec/vec.h>). Indices and
// weights arrive precomputed by upsample_bilinear_add.cpp from kernels/bilinear.h.
//
// Numerics: every path blends horizontally first, then vertically, then adds skip,
//   out = wy0 * (wx0 * x[y0,x0] + wx1 * x[y0,x1]) + wy1 * (wx0 * x[y1,x0] + wx1 * x[y1,x1]) + skip
// in acc_t (float32; float64 for double), rounding once at the store.
#pragma once

#include "vec_io.h"

namespace resattn {
namespace cpu {
namespace CPU_CAPABILITY {

// Work per at::parallel_for task: enough elements that a thread's start-up cost is
// small, few enough that 8x256 planes still spread over every thread.
constexpr int64_t kUpsampleGrainElements = 1 << 15;

inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kUpsampleGrainElements / std::max<int64_t>(1, elements_per_item));
}

// ---- forward, NCHW -----------------------------------------------------------------
// Per (n, c) plane and output row: the horizontal blend of the (at most two) input rows
// it reads is computed once into a small float row cache (consecutive output rows share
// input rows when upsampling), then one vectorised pass blends the two cached rows
// vertically and adds skip.
template <typename scalar_t>
void upsample_forward_nchw(const UpsampleForwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const int64_t h = a.h, w = a.w, H = a.H, W = a.W;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* skip = static_cast<const scalar_t*>(a.skip);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t* y0 = a.rows.i0;
  const int64_t* y1 = a.rows.i1;
  const auto* wy0 = static_cast<const acc_t*>(a.rows.w0);
  const auto* wy1 = static_cast<const acc_t*>(a.rows.w1);
  const int64_t* x0 = a.cols.i0;
  const int64_t* x1 = a.cols.i1;
  const auto* wx0 = static_cast<const acc_t*>(a.cols.w0);
  const auto* wx1 = static_cast<const acc_t*>(a.cols.w1);

  at::parallel_for(0, a.N * a.C, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cache(2 * W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* xp = x + plane * h * w;
      const scalar_t* sp = skip != nullptr ? skip + plane * H * W : nullptr;
      scalar_t* op = out + plane * H * W;
      int64_t cached[2] = {-1, -1};
      // The horizontally blended input row iy, without evicting row `keep`.
      auto row = [&](int64_t iy, int64_t keep) -> const acc_t* {
        if (cached[0] == iy) return cache.data();
        if (cached[1] == iy) return cache.data() + W;
        const int slot = cached[0] == keep ? 1 : 0;
        acc_t* r = cache.data() + slot * W;
        const scalar_t* xr = xp + iy * w;
        for (int64_t ox = 0; ox < W; ++ox) {
          r[ox] = wx0[ox] * static_cast<acc_t>(xr[x0[ox]]) + wx1[ox] * static_cast<acc_t>(xr[x1[ox]]);
        }
        cached[slot] = iy;
        return r;
      };
      for (int64_t oy = 0; oy < H; ++oy) {
        const acc_t* r0 = row(y0[oy], y1[oy]);
        const acc_t* r1 = row(y1[oy], y0[oy]);
        const Vec v0(wy0[oy]);
        const Vec v1(wy1[oy]);
        scalar_t* orow = op + oy * W;
        const scalar_t* srow = sp != nullptr ? sp + oy * W : nullptr;
        for_each_chunk<kChunk>(W, [&](int64_t i, int64_t n) {
          Vec a0, a1, b0, b1;
          AccIO<acc_t>::load(r0 + i, n, a0, a1);
          AccIO<acc_t>::load(r1 + i, n, b0, b1);
          Vec o0 = at::vec::fmadd(v1, b0, v0 * a0);
          Vec o1 = at::vec::fmadd(v1, b1, v0 * a1);
          if (srow != nullptr) {
            Vec s0, s1;
            if (n == kChunk) {
              IO::load(srow + i, s0, s1);
            } else {
              IO::load(srow + i, n, s0, s1);
            }
            o0 = o0 + s0;
            o1 = o1 + s1;
          }
          // Ordinary stores: rows are rarely whole cache lines, and the overlapping last
          // chunk rewrites part of one (see store_chunk for why streaming needs both).
          if (n == kChunk) {
            IO::store(orow + i, o0, o1);
          } else {
            IO::store(orow + i, n, o0, o1);
          }
        });
      }
    }
  });
}

// ---- forward, channels_last --------------------------------------------------------
// Per output pixel, a blend over C of the four input pixels (each C contiguous values)
// plus skip's C values: the layout vectorises along channels with no gathers.
// Consecutive output rows with the same two input rows (about scale of them when
// upsampling: 2 or 3 for 2x) are computed together: the horizontal blends of the two
// input rows are formed once per output column and reused by every row of the group
// (for groups of two: half the input loads and a third fewer multiply-adds per output
// value). The arithmetic per value is unchanged (horizontal, then vertical, then skip),
// so results are bitwise the same as blending each output pixel on its own.
constexpr int64_t kClMaxGroupRows = 4;

template <typename scalar_t>
void upsample_forward_cl(const UpsampleForwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const int64_t C = a.C, h = a.h, w = a.w, H = a.H, W = a.W;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* skip = static_cast<const scalar_t*>(a.skip);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t* y0 = a.rows.i0;
  const int64_t* y1 = a.rows.i1;
  const auto* wy0 = static_cast<const acc_t*>(a.rows.w0);
  const auto* wy1 = static_cast<const acc_t*>(a.rows.w1);
  const auto* wx0 = static_cast<const acc_t*>(a.cols.w0);
  const auto* wx1 = static_cast<const acc_t*>(a.cols.w1);
  const int64_t row_len = W * C;

  // Streaming stores only with skip, and only when every chunk is a whole,
  // non-overlapping run of the pixel's channels. A plain upsample reads just its small
  // input (a quarter of the output for 2x), so a 25 MiB output plus input stays in a
  // 32 MiB L3 from one call to the next: ordinary stores then hit cache, while streaming
  // sends every line to DRAM (about 0.52 ms without vs 0.70 ms with streaming for
  // 8x256x28x28 -> 56x56, float32, AMD EPYC Zen 5, 2 threads). With skip the pass touches twice the output's bytes and the
  // read-for-ownership that streaming saves is real traffic.
  const bool stream = skip != nullptr && C % kChunk == 0 &&
                      want_stream(a.N * H * row_len * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, a.N * H, grain_for(row_len), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t nb = row / H, oy = row % H;
      // The group: rows oy .. oy + k - 1 of this image (and task) sharing oy's input rows.
      int64_t k = 1;
      while (k < kClMaxGroupRows && row + k < end && oy + k < H && y0[oy + k] == y0[oy] &&
             y1[oy + k] == y1[oy]) {
        ++k;
      }
      const scalar_t* xr0 = x + (nb * h + y0[oy]) * w * C;
      const scalar_t* xr1 = x + (nb * h + y1[oy]) * w * C;
      Vec vy0[kClMaxGroupRows], vy1[kClMaxGroupRows];
      for (int64_t r = 0; r < k; ++r) {
        vy0[r] = Vec(wy0[oy + r]);
        vy1[r] = Vec(wy1[oy + r]);
      }
      scalar_t* orow = out + row * row_len;
      const scalar_t* srow = skip != nullptr ? skip + row * row_len : nullptr;
      for (int64_t ox = 0; ox < W; ++ox) {
        const int64_t c0 = a.cols.i0[ox] * C, c1 = a.cols.i1[ox] * C;
        const Vec vx0(wx0[ox]);
        const Vec vx1(wx1[ox]);
        const int64_t pix = ox * C;
        for_each_chunk<kChunk>(C, [&](int64_t c, int64_t n) {
          Vec p00a, p00b, p01a, p01b, p10a, p10b, p11a, p11b;
          if (n == kChunk) {
            IO::load(xr0 + c0 + c, p00a, p00b);
            IO::load(xr0 + c1 + c, p01a, p01b);
            IO::load(xr1 + c0 + c, p10a, p10b);
            IO::load(xr1 + c1 + c, p11a, p11b);
          } else {
            IO::load(xr0 + c0 + c, n, p00a, p00b);
            IO::load(xr0 + c1 + c, n, p01a, p01b);
            IO::load(xr1 + c0 + c, n, p10a, p10b);
            IO::load(xr1 + c1 + c, n, p11a, p11b);
          }
          const Vec h0a = at::vec::fmadd(vx1, p01a, vx0 * p00a);
          const Vec h0b = at::vec::fmadd(vx1, p01b, vx0 * p00b);
          const Vec h1a = at::vec::fmadd(vx1, p11a, vx0 * p10a);
          const Vec h1b = at::vec::fmadd(vx1, p11b, vx0 * p10b);
          for (int64_t r = 0; r < k; ++r) {
            Vec o0 = at::vec::fmadd(vy1[r], h1a, vy0[r] * h0a);
            Vec o1 = at::vec::fmadd(vy1[r], h1b, vy0[r] * h0b);
            const int64_t off = r * row_len + pix + c;
            if (srow != nullptr) {
              Vec s0, s1;
              if (n == kChunk) {
                IO::load(srow + off, s0, s1);
              } else {
                IO::load(srow + off, n, s0, s1);
              }
              o0 = o0 + s0;
              o1 = o1 + s1;
            }
            if (n == kChunk) {
              store_chunk<scalar_t>(orow + off, o0, o1, stream);
            } else {
              IO::store(orow + off, n, o0, o1);
            }
          }
        });
      }
      row += k;
    }
    if (stream) stream_fence();
  });
}

// The vertical half of the backward gather: out[i] = sum over output rows oy in [lo, hi)
// of wk[oy - lo] * g[oy * len + i], for i in [0, len), accumulated in acc_t. Shared by the
// NCHW (len = W) and channels_last (len = W * C) backward kernels.
template <typename scalar_t>
inline void gather_rows(const scalar_t* g, int64_t len, int64_t lo, int64_t hi,
                        const typename VecIO<scalar_t>::acc_t* wk,
                        typename VecIO<scalar_t>::acc_t* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  for_each_chunk<kChunk>(len, [&](int64_t i, int64_t n) {
    Vec s0(acc_t(0)), s1(acc_t(0));
    for (int64_t oy = lo; oy < hi; ++oy) {
      const Vec wv(wk[oy - lo]);
      Vec g0, g1;
      if (n == kChunk) {
        IO::load(g + oy * len + i, g0, g1);
      } else {
        IO::load(g + oy * len + i, n, g0, g1);
      }
      s0 = at::vec::fmadd(wv, g0, s0);
      s1 = at::vec::fmadd(wv, g1, s1);
    }
    AccIO<acc_t>::store(out + i, n, s0, s1);
  });
}

// ---- backward, NCHW ----------------------------------------------------------------
// grad_x[iy, ix] = sum over oy in rows(iy), ox in cols(ix) of wy * wx * grad[oy, ox].
// Per plane and input row: a vectorised vertical gather of the output rows that read
// iy into a float row of width W, then a horizontal gather per input column. Every
// output element is written exactly once (zero when nothing reads it), in a fixed
// order: deterministic, no atomics, no zero-fill pass.
template <typename scalar_t>
void upsample_backward_nchw(const UpsampleBackwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t h = a.h, w = a.w, H = a.H, W = a.W;
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  auto* gx = static_cast<scalar_t*>(a.grad_x);
  const auto* wy = static_cast<const acc_t*>(a.rows.w);
  const auto* wx = static_cast<const acc_t*>(a.cols.w);

  at::parallel_for(0, a.N * a.C, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> vrow(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* gp = grad + plane * H * W;
      scalar_t* op = gx + plane * h * w;
      for (int64_t iy = 0; iy < h; ++iy) {
        const int64_t lo = a.rows.lo[iy], hi = a.rows.hi[iy];
        const acc_t* wk = wy + a.rows.off[iy];
        scalar_t* orow = op + iy * w;
        if (lo == hi) {
          std::fill(orow, orow + w, static_cast<scalar_t>(0));
          continue;
        }
        gather_rows<scalar_t>(gp, W, lo, hi, wk, vrow.data());
        for (int64_t ix = 0; ix < w; ++ix) {
          const int64_t xlo = a.cols.lo[ix], xhi = a.cols.hi[ix];
          const acc_t* wc = wx + a.cols.off[ix];
          acc_t s = 0;
          for (int64_t ox = xlo; ox < xhi; ++ox) s += wc[ox - xlo] * vrow[ox];
          orow[ix] = static_cast<scalar_t>(s);
        }
      }
    }
  });
}

// ---- backward, channels_last -------------------------------------------------------
// Per (n, input row): the vertical gather runs over whole output rows (W * C contiguous
// values) into a float buffer, then each input pixel gathers its output columns from
// that buffer, vectorised along C.
template <typename scalar_t>
void upsample_backward_cl(const UpsampleBackwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kChunk = IO::kChunk;
  const int64_t C = a.C, h = a.h, w = a.w, H = a.H, W = a.W;
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  auto* gx = static_cast<scalar_t*>(a.grad_x);
  const auto* wy = static_cast<const acc_t*>(a.rows.w);
  const auto* wx = static_cast<const acc_t*>(a.cols.w);
  const int64_t row_len = W * C;

  at::parallel_for(0, a.N * h, grain_for(row_len * 2), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> vbuf(row_len);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t nb = row / h, iy = row % h;
      const int64_t lo = a.rows.lo[iy], hi = a.rows.hi[iy];
      const acc_t* wk = wy + a.rows.off[iy];
      scalar_t* orow = gx + row * w * C;
      if (lo == hi) {
        std::fill(orow, orow + w * C, static_cast<scalar_t>(0));
        continue;
      }
      const scalar_t* gbase = grad + nb * H * row_len;
      gather_rows<scalar_t>(gbase, row_len, lo, hi, wk, vbuf.data());
      for (int64_t ix = 0; ix < w; ++ix) {
        const int64_t xlo = a.cols.lo[ix], xhi = a.cols.hi[ix];
        const acc_t* wc = wx + a.cols.off[ix];
        scalar_t* op = orow + ix * C;
        for_each_chunk<kChunk>(C, [&](int64_t c, int64_t n) {
          Vec s0(acc_t(0)), s1(acc_t(0));
          for (int64_t ox = xlo; ox < xhi; ++ox) {
            const Vec wv(wc[ox - xlo]);
            Vec b0, b1;
            AccIO<acc_t>::load(vbuf.data() + ox * C + c, n, b0, b1);
            s0 = at::vec::fmadd(wv, b0, s0);
            s1 = at::vec::fmadd(wv, b1, s1);
          }
          if (n == kChunk) {
            IO::store(op + c, s0, s1);
          } else {
            IO::store(op + c, n, s0, s1);
          }
        });
      }
    }
  });
}

template <typename scalar_t>
void upsample_forward_typed(const UpsampleForwardArgs& a) {
  if (a.channels_last) {
    upsample_forward_cl<scalar_t>(a);
  } else {
    upsample_forward_nchw<scalar_t>(a);
  }
}

template <typename scalar_t>
void upsample_backward_typed(const UpsampleBackwardArgs& a) {
  if (a.channels_last) {
    upsample_backward_cl<scalar_t>(a);
  } else {
    upsample_backward_nchw<scalar_t>(a);
  }
}

// dtype was validated by the caller (csrc/checks.h); anything else is unreachable.
inline void upsample_forward(const UpsampleForwardArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return upsample_forward_typed<float>(a);
    case c10::ScalarType::Double: return upsample_forward_typed<double>(a);
    case c10::ScalarType::Half: return upsample_forward_typed<c10::Half>(a);
    case c10::ScalarType::BFloat16: return upsample_forward_typed<c10::BFloat16>(a);
    default: return;
  }
}

inline void upsample_backward(const UpsampleBackwardArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return upsample_backward_typed<float>(a);
    case c10::ScalarType::Double: return upsample_backward_typed<double>(a);
    case c10::ScalarType::Half: return upsample_backward_typed<c10::Half>(a);
    case c10::ScalarType::BFloat16: return upsample_backward_typed<c10::BFloat16>(a);
    default: return;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace resattn
