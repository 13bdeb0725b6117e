// CUDA's execution model, emulated in plain C++ so that the CUDA kernels (kernels/*.cu)
// run on the CPU, from the same source, in a build with RESATTN_BUILD_CUDA_EMULATION=1.
//
// What is modelled, because the kernels depend on it:
// - A launch runs every block of the grid (in reverse order: no kernel may rely on block
//   order). The threads of a block run concurrently, one OS thread each (a pool reused
//   across blocks); __syncthreads() is a real barrier across them, and a thread that has
//   returned no longer counts towards it (as on sm_70 and later).
// - threadIdx / blockIdx / blockDim / gridDim are those of the launch (thread-local).
// - Dynamic shared memory is allocated per block, exactly as large as launched (so
//   AddressSanitizer sees an overrun), aligned to 16 bytes and poisoned with 0xFF bytes
//   (NaN as float, -1 as int) before the block starts: a read of shared memory that no
//   thread of this block has written yet cannot pass unnoticed.
// - Each thread receives its own copy of the kernel's by-value parameters.
// - Launch checks of a real device: block size <= 1024 threads, a non-empty grid, dynamic
//   shared memory <= 48 KiB (no opt-in), reported by RESATTN_KERNEL_LAUNCH_CHECK().
// - A small device (few multiprocessors) sizes grids, so grid-stride loops take several
//   turns; set_device() changes it for tests.
//
// Not modelled (only a GPU shows them): warps and their scheduling, the memory model
// beyond barriers, speed, the real device's limits and caches.
#pragma once

#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// --------------------------------------------------------------- CUDA's spellings
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)  // NOLINT
      : x(x_), y(y_), z(z_) {}
};

// The built-in variables of the running emulated thread.
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// Barrier across the threads of the running block.
void __syncthreads();

namespace resattn {
namespace emu {

// The dynamic shared memory of the running block (nullptr when launched with 0 bytes).
unsigned char* dynamic_shared_memory();

// ------------------------------------------------------------- device and options
struct Options {
  int multiprocessors = 2;               // cudaDevAttrMultiProcessorCount
  int threads_per_multiprocessor = 512;  // cudaDevAttrMaxThreadsPerMultiProcessor
  bool force_int64_index = false;        // kernels take their 64-bit index path
  bool force_in_thread_tables = false;   // the upsample backward computes its axis tables in-thread
  bool record_launches = true;           // keep a log of launches (see launches())
};
Options& options();

// One launch as the kernel saw it.
struct LaunchRecord {
  std::string kernel;  // e.g. "upsample_forward_nchw_kernel<float, int, 4>"
  dim3 grid;
  dim3 block;
  std::size_t shared_bytes;
};
std::vector<LaunchRecord> launches();
void clear_launches();

// Device, stream and guard: one emulated device, one stream; launches are synchronous.
using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

// Raises (TORCH_CHECK) if the last launch on this thread failed, like
// C10_CUDA_KERNEL_LAUNCH_CHECK after a launch with an invalid configuration.
void check_last_launch();

// Runs `thread_body` once for every thread of every block of the grid.
void run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t shared_bytes,
              const std::function<void()>& thread_body);

// "ns::{anonymous}::kernel<float, int, 4>" from the compiler's name of kernel_name<K>.
std::string tidy_kernel_name(const char* pretty_function);

template <auto Kernel>
const std::string& kernel_name() {
  static const std::string name = tidy_kernel_name(__PRETTY_FUNCTION__);
  return name;
}

template <typename F>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

// The emulated `kernel<<<grid, block, shared_bytes, stream>>>(args...)`: arguments are
// converted to the kernel's parameter types once, as a launch does, and every thread
// calls the kernel with its own copy of them.
template <auto Kernel>
struct Launch {
  dim3 grid;
  dim3 block;
  std::size_t shared_bytes;

  template <typename... A>
  void operator()(A&&... args) const {
    using Params = typename KernelParams<decltype(Kernel)>::type;
    const Params params(std::forward<A>(args)...);
    run_grid(kernel_name<Kernel>().c_str(), grid, block, shared_bytes, [&params] {
      Params own = params;
      std::apply(Kernel, std::move(own));
    });
  }
};

}  // namespace emu
}  // namespace resattn

// kernel<<<grid, block, shared_bytes, stream>>>(args...) is spelled
// RESATTN_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...).
#define RESATTN_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ((void)(stream), ::resattn::emu::Launch<&__VA_ARGS__>{dim3(grid), dim3(block), static_cast<std::size_t>(shared_bytes)})

// extern __shared__ T name[] is spelled RESATTN_DYNAMIC_SHARED(T, name).
#define RESATTN_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::resattn::emu::dynamic_shared_memory())

#define RESATTN_KERNEL_LAUNCH_CHECK() ::resattn::emu::check_last_launch()
