// CUDA's execution model, emulated in plain C++ so that the CUDA kernels (kernels/*.cu)
// run on the CPU, from the same source, in a build with RESATTN_BUILD_CUDA_EMULATION=1.
//
// What is modelled, because the kernels depend on it:
// - A launch runs every block of the grid (in reverse order: no kernel may rely on block
//   order). The threads of a block run concurrently, one OS thread each (a pool reused
//   across blocks), all started before any of them enters the kernel; __syncthreads() is a
//   real barrier across them, and a thread that has returned no longer counts towards it
//   (as on sm_70 and later).
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
// - Warps: lanes 32k..32k+31 of the block's linear thread index form warp k. The warp
//   shuffles (__shfl_sync, __shfl_down_sync, __shfl_xor_sync) and __syncwarp are
//   warp-synchronous exchanges: every lane named in the mask must arrive at the same
//   exchange (with the same mask) before any of them reads another lane's value. A lane
//   that calls one without being in its mask, a mask that names a lane which does not
//   exist or has returned, or a read from a lane outside the mask is an error (undefined
//   behaviour on a GPU), raised instead of hanging.
// - Every synchronisation (__syncthreads, the warp exchanges, the start and end of a block)
//   goes through a mutex and a condition variable, which ThreadSanitizer understands: in
//   the TSan build a shared-memory access that no barrier orders is reported as a race.
// - atomicAdd on unsigned int is a real atomic; __threadfence() and __ldcg() exist for the
//   kernels whose last block combines the others' partials (blocks run in sequence here).
//
// Not modelled (only a GPU shows them): the scheduling of warps (lanes run independently
// between exchanges), the memory model beyond barriers, speed, the real device's limits
// and caches.
#pragma once

#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
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

// The warp size of every NVIDIA GPU, as CUDA's built-in variable.
constexpr int warpSize = 32;

namespace resattn {
namespace emu {

// The dynamic shared memory of the running block (nullptr when launched with 0 bytes).
unsigned char* dynamic_shared_memory();

// One warp-synchronous exchange: the calling lane offers `bits` and receives those that
// lane `src_lane` (of the same warp) offered to the same exchange. Every lane in `mask`
// must call it (see the header comment); `op` names the primitive in error messages.
std::uint64_t warp_exchange(const char* op, unsigned int mask, std::uint64_t bits, int src_lane);
// The lane index (0..31) of the calling thread within its warp.
int lane_id();

template <typename T>
T warp_shuffle(const char* op, unsigned int mask, T var, int src_lane) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t) && std::is_trivially_copyable<T>::value,
                "emulated warp shuffles move values of at most 64 bits");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_exchange(op, mask, bits, src_lane);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// The source lane of a shuffle within segments of `width` lanes (a power of two <= 32):
// a target outside the caller's segment yields the caller's own value, as on a GPU.
inline int shuffle_source(int lane, int target, int width) {
  const int base = lane & ~(width - 1);
  return target >= base && target < base + width ? target : lane;
}

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

// ------------------------------------------------------------------ warp primitives
template <typename T>
T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {
  const int lane = ::resattn::emu::lane_id();
  const int base = lane & ~(width - 1);
  return ::resattn::emu::warp_shuffle("__shfl_sync", mask, var, base + (src_lane & (width - 1)));
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  const int lane = ::resattn::emu::lane_id();
  return ::resattn::emu::warp_shuffle(
      "__shfl_down_sync", mask, var,
      ::resattn::emu::shuffle_source(lane, lane + static_cast<int>(delta), width));
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize) {
  const int lane = ::resattn::emu::lane_id();
  return ::resattn::emu::warp_shuffle("__shfl_xor_sync", mask, var,
                                      ::resattn::emu::shuffle_source(lane, lane ^ lane_mask, width));
}

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  ::resattn::emu::warp_exchange("__syncwarp", mask, 0, ::resattn::emu::lane_id());
}

// ------------------------------------------------------------- atomics and fences
// atomicAdd: a sequentially consistent host atomic (the threads of a block run
// concurrently). __threadfence: nothing to do here, because blocks run one after another
// and the end of a block is a synchronisation (the memory model beyond barriers is not
// modelled; see the header comment).
inline unsigned int atomicAdd(unsigned int* address, unsigned int val) {
  return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}
inline void __threadfence() {}
// __ldcg (a load that bypasses the non-coherent L1 cache): a plain load.
template <typename T>
T __ldcg(const T* address) {
  return *address;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...) is spelled
// RESATTN_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...).
#define RESATTN_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ((void)(stream), ::resattn::emu::Launch<&__VA_ARGS__>{dim3(grid), dim3(block), static_cast<std::size_t>(shared_bytes)})

// extern __shared__ T name[] is spelled RESATTN_DYNAMIC_SHARED(T, name).
#define RESATTN_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::resattn::emu::dynamic_shared_memory())

#define RESATTN_KERNEL_LAUNCH_CHECK() ::resattn::emu::check_last_launch()
