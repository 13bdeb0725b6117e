// Launch helpers shared by the CUDA kernels (kernels/*.cu): 128-bit vector access,
// alignment tests, grid sizing for grid-stride loops, the 32/64-bit index choice; and the
// few spellings that differ between the two compilers of those files:
//   nvcc                          -> CUDA kernels on CUDA tensors (namespace resattn_fast)
//   host C++ with RESATTN_CUDA_EMULATION (csrc/emulation/) -> the same kernels on CPU
//                                    tensors under an emulation of CUDA's execution model
//                                    (namespace resattn_fast_emulated, CPU dispatch key)
// Kernels launch with RESATTN_LAUNCH(grid, block, smem, stream, kernel<...>)(args...),
// declare dynamic shared memory with RESATTN_DYNAMIC_SHARED(type, name), and use
// DeviceGuard / current_stream() / RESATTN_KERNEL_LAUNCH_CHECK() / check_on_device().
#pragma once

#include <ATen/ATen.h>

#ifdef RESATTN_CUDA_EMULATION
#include "cuda_emulation.h"
#else
// Only light CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that
// a minimal toolkit (nvcc + cudart, as on the CI machine) does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

#ifdef RESATTN_CUDA_EMULATION
#define RESATTN_CUDA_NAMESPACE resattn_fast_emulated
#define RESATTN_CUDA_DISPATCH_KEY CPU
#else
#define RESATTN_CUDA_NAMESPACE resattn_fast
#define RESATTN_CUDA_DISPATCH_KEY CUDA
#define RESATTN_LAUNCH(grid, block, shared_bytes, stream, ...) \
  __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define RESATTN_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define RESATTN_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

namespace resattn {
namespace cuda {

#ifdef RESATTN_CUDA_EMULATION
using DeviceGuard = ::resattn::emu::DeviceGuard;
using Stream = ::resattn::emu::Stream;
inline Stream current_stream() { return ::resattn::emu::current_stream(); }
constexpr const char* kDeviceName = "CPU (emulated CUDA device)";
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
inline void device_limits(int* sms, int* threads_per_sm) {
  *sms = ::resattn::emu::options().multiprocessors;
  *threads_per_sm = ::resattn::emu::options().threads_per_multiprocessor;
}
// Test switches that exist only in the emulated build (constant false on a GPU): they
// reach, on small tensors, paths that a GPU takes only with huge ones.
inline bool force_int64_index() { return ::resattn::emu::options().force_int64_index; }
inline bool force_in_thread_tables() { return ::resattn::emu::options().force_in_thread_tables; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
constexpr const char* kDeviceName = "CUDA";
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline void device_limits(int* sms, int* threads_per_sm) {
  const int device = c10::cuda::current_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
}
constexpr bool force_int64_index() { return false; }
constexpr bool force_in_thread_tables() { return false; }
#endif

// The tensors a kernel of this build can read: CUDA tensors (CPU tensors when emulated).
inline void check_on_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(on_device(t), "resattn_fast: ", name, " must be a ", kDeviceName, " tensor, got ",
              t.device());
}

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
  int sms = 0, threads_per_sm = 0;
  device_limits(&sms, &threads_per_sm);
  const int64_t per_sm = std::max<int64_t>(threads_per_sm / threads, 1);
  const int64_t wave = static_cast<int64_t>(sms) * per_sm;
  const int64_t needed = (work + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wave, needed)));
}

// 32-bit index math (much cheaper divisions) whenever every offset fits: the element
// count and the storage span (one past the largest offset, which exceeds the count for a
// view with gaps) both at most 2^31 - 1, as needs_int64 decides for the Triton kernels.
inline bool fits_int32(const at::Tensor& t) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (force_int64_index() || t.numel() > kMax) return false;
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * std::abs(t.stride(d));
  return t.numel() == 0 || span <= kMax;
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
