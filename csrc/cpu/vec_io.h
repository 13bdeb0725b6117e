// Loads and stores between a tensor's dtype and the float32 (float64 for double)
// accumulation vectors of the kernels. Included by the kernel headers only, inside an
// ISA-specific translation unit (see isa_prelude.h), after <ATen/cpu/vec/vec.h>.
//
// The unit of work is a "chunk" of two accumulation vectors: 2 x 8 floats on AVX2 is
// exactly one Vectorized<BFloat16/Half>, so half types convert in one instruction pair
// and round once, at the store.
#pragma once

namespace resattn {
namespace cpu {
namespace CPU_CAPABILITY {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename scalar_t>
struct VecIO {
  using acc_t = typename AccType<scalar_t>::type;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same<scalar_t, acc_t>::value;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kChunk = 2 * kVec;
  static_assert(!kReduced || at::vec::Vectorized<scalar_t>::size() == kChunk,
                "a half-type vector must hold exactly two float vectors");

  static inline void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      at::vec::load_to_float<scalar_t>(p, a, b);
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec);
    }
  }

  // 0 < n < kChunk elements; the lanes past n read as zero.
  static inline void load(const scalar_t* p, int64_t n, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(
          at::vec::Vectorized<scalar_t>::loadu(p, n));
    } else if (n > kVec) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec, n - kVec);
    } else if (n == kVec) {  // a full vector: skip the slower counted load
      a = Vec::loadu(p);
      b = Vec(acc_t(0));
    } else {
      a = Vec::loadu(p, n);
      b = Vec(acc_t(0));
    }
  }

  static inline void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + kVec);
    }
  }

  static inline void store(scalar_t* p, int64_t n, const Vec& a, const Vec& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p, n);
    } else if (n > kVec) {
      a.store(p);
      b.store(p + kVec, n - kVec);
    } else if (n == kVec) {
      a.store(p);
    } else {
      a.store(p, n);
    }
  }
};

// Calls f(i, count) over [0, n) in chunks of kChunk elements. When n >= kChunk the
// remainder is covered by one more full chunk that overlaps the previous one, instead of
// a counted (masked) store: masked stores are slow on some CPUs (AMD Zen 4 among them),
// and recomputing a few elements is harmless because every f here writes a pure function
// of inputs it does not write. Only n < kChunk takes a counted chunk.
template <int64_t kChunk, typename F>
inline void for_each_chunk(int64_t n, const F& f) {
  if (n < kChunk) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) f(i, kChunk);
  if (i < n) f(n - kChunk, kChunk);
}

// Stores of a full chunk of float32 results into a large output that the kernel writes
// once and does not read back: non-temporal stores skip the read-for-ownership of each
// cache line (a third of the memory traffic of an out = f(a, b) pass) and keep the
// inputs in cache. Used only for outputs much larger than the caches (see
// kStreamMinBytes); other dtypes, ISAs and unaligned addresses take the ordinary store.
// Callers stream only runs of consecutive, non-overlapping chunks (a cache line written
// partly by streaming and partly by other stores is flushed piecemeal, which is far
// slower than either), and a task that streamed ends with stream_fence() before its
// results are read.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

template <typename scalar_t>
inline void store_chunk(scalar_t* p, const typename VecIO<scalar_t>::Vec& a,
                        const typename VecIO<scalar_t>::Vec& b, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_ps(p, a);
      _mm512_stream_ps(p + 16, b);
      return;
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + 8, b);
      return;
    }
  }
#endif
  (void)stream;
  VecIO<scalar_t>::store(p, a, b);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline bool want_stream(int64_t bytes) { return bytes >= kStreamMinBytes; }

// First index >= i (and <= end) at which p + index is 64-byte aligned: streaming tasks
// run their scalar remainder before it too, so that every chunk starts a cache line.
template <typename scalar_t>
inline int64_t align_index(const scalar_t* p, int64_t i, int64_t end) {
  while (i < end && (reinterpret_cast<uintptr_t>(p + i) & 63) != 0) ++i;
  return i;
}

// Float accumulation buffers (acc_t*) use the same chunk walk.
template <typename acc_t>
struct AccIO {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static inline void load(const acc_t* p, int64_t n, Vec& a, Vec& b) {
    if (n >= 2 * kVec) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec);
    } else if (n > kVec) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec, n - kVec);
    } else if (n == kVec) {  // a full vector: skip the slower counted load
      a = Vec::loadu(p);
      b = Vec(acc_t(0));
    } else {
      a = Vec::loadu(p, n);
      b = Vec(acc_t(0));
    }
  }
  static inline void store(acc_t* p, int64_t n, const Vec& a, const Vec& b) {
    if (n >= 2 * kVec) {
      a.store(p);
      b.store(p + kVec);
    } else if (n > kVec) {
      a.store(p);
      b.store(p + kVec, n - kVec);
    } else if (n == kVec) {
      a.store(p);
    } else {
      a.store(p, n);
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace resattn
