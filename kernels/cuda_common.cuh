// Launch helpers shared by the CUDA kernels (kernels/*.cu): 128-bit vector access,
// alignment tests, grid sizing for grid-stride loops, the 32/64-bit index choice.
#pragma once

// Only light CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that
// a minimal toolkit (nvcc + cudart, as on the CI machine) does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace resattn {
namespace cuda {

constexpr int kThreads = 256;

// VEC elements of T moved as one 128-bit (or narrower) load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) AlignedVec {
  T val[VEC];
};

// Elements per 128-bit access: 8 for half types, 4 for float, 2 for double.
template <typename T>
constexpr int vec_width() {
  return sizeof(T) >= 16 ? 1 : static_cast<int>(16 / sizeof(T));
}

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Blocks for a grid-stride loop over `work` items: one full wave of resident blocks at
// most (more would only re-run the index math), never more than the work needs.
inline unsigned int num_blocks(int64_t work, int threads = kThreads) {
  const int device = c10::cuda::current_device();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t per_sm = std::max<int64_t>(threads_per_sm / threads, 1);
  const int64_t wave = static_cast<int64_t>(sms) * per_sm;
  const int64_t needed = (work + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wave, needed)));
}

// 32-bit index math (much cheaper divisions) whenever every offset fits.
inline bool fits_int32(const at::Tensor& t) {
  return t.numel() <= static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

// Runs `body` with `index_t` bound to int32_t or int64_t.
#define RESATTN_DISPATCH_INDEX(use32, ...)   \
  [&] {                                      \
    if (use32) {                             \
      using index_t = int32_t;               \
      return __VA_ARGS__();                  \
    } else {                                 \
      using index_t = int64_t;               \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// Runs `body` with constexpr int `VEC` bound to vec_width<scalar_t>() or 1.
#define RESATTN_DISPATCH_VEC(vectorised, ...)                       \
  [&] {                                                             \
    if (vectorised) {                                               \
      constexpr int VEC = ::resattn::cuda::vec_width<scalar_t>();   \
      return __VA_ARGS__();                                         \
    } else {                                                        \
      constexpr int VEC = 1;                                        \
      return __VA_ARGS__();                                         \
    }                                                               \
  }()

}  // namespace cuda
}  // namespace resattn
