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
    } else {
      a.store(p, n);
    }
  }
};

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
    } else {
      a.store(p, n);
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace resattn
