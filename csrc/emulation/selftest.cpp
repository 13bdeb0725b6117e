// Kernels that are wrong on purpose, to show that the emulation's nets catch what they are
// for (tests/test_cuda_emulation.py, tests/test_cuda_emulation_asan.py). Spelled like
// kernels/*.cu. Only in the emulated build.
#include <ATen/ATen.h>

#include "cuda_common.cuh"

namespace resattn {
namespace emu_selftest {
namespace {

// Thread t of each block writes its own shared slot, then reads the slot of thread
// t + blockDim/2. Correct only with the barrier in between.
__global__ void shared_exchange_kernel(float* out, bool barrier) {
  RESATTN_DYNAMIC_SHARED(float, slots);
  const unsigned int t = threadIdx.x, n = blockDim.x;
  slots[t] = static_cast<float>(t + 1);
  if (barrier) __syncthreads();
  out[blockIdx.x * n + t] = slots[(t + n / 2) % n];
}

// Four values per thread of a 1-D block, from warp shuffles of v = global thread index + 1:
// the warp's sum by a __shfl_down_sync tree (complete in lane 0), the same by a
// __shfl_xor_sync butterfly (complete in every lane), lane 3's v broadcast by __shfl_sync,
// and the half-warp's sum by __shfl_down_sync with a 16-lane mask and width (complete in
// lanes 0 and 16).
__global__ void warp_shuffle_kernel(float* out) {
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = static_cast<float>(i + 1);
  float down = v;
  for (int offset = 16; offset > 0; offset /= 2) down += __shfl_down_sync(0xffffffffu, down, offset);
  float butterfly = v;
  for (int m = 1; m < 32; m *= 2) butterfly += __shfl_xor_sync(0xffffffffu, butterfly, m);
  const float lane3 = __shfl_sync(0xffffffffu, v, 3);
  const unsigned int half_mask = threadIdx.x % 32 < 16 ? 0x0000ffffu : 0xffff0000u;
  float half = v;
  for (int offset = 8; offset > 0; offset /= 2) half += __shfl_down_sync(half_mask, half, offset, 16);
  out[4 * i + 0] = down;
  out[4 * i + 1] = butterfly;
  out[4 * i + 2] = lane3;
  out[4 * i + 3] = half;
}

// The odd lanes return early; the even ones then shuffle with the full mask, which names
// lanes that are gone (a hang or undefined on a GPU).
__global__ void divergent_shuffle_kernel(float* out) {
  if (threadIdx.x % 2 == 1) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 2);
}

// Writes elements 0..n of an n-element buffer: one element past its end.
__global__ void off_by_one_kernel(float* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i <= n; i += stride) {
    out[i] = 1.0f;
  }
}

// Reads 128-bit vectors from `in`, whatever its alignment (the kernels check first).
__global__ void unchecked_vector_copy_kernel(const float* in, float* out, int64_t nvec) {
  using vec_t = cuda::AlignedVec<float, 4>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    reinterpret_cast<vec_t*>(out)[i] = reinterpret_cast<const vec_t*>(in)[i];
  }
}

}  // namespace

// (blocks * threads) floats; element b*threads + t is (t + threads/2) % threads + 1 when
// the exchange is synchronised.
at::Tensor shared_exchange(int64_t blocks, int64_t threads, bool barrier) {
  TORCH_CHECK(blocks >= 1 && threads >= 2, "shared_exchange: blocks >= 1 and threads >= 2");
  at::Tensor out = at::empty({blocks * threads}, at::kFloat);
  RESATTN_LAUNCH(static_cast<unsigned int>(blocks), static_cast<unsigned int>(threads),
                 threads * sizeof(float), cuda::current_stream(), shared_exchange_kernel)(
      out.data_ptr<float>(), barrier);
  RESATTN_KERNEL_LAUNCH_CHECK();
  return out;
}

// (blocks * threads, 4) floats, see warp_shuffle_kernel.
at::Tensor warp_shuffle(int64_t blocks, int64_t threads) {
  TORCH_CHECK(blocks >= 1 && threads >= 32 && threads % 32 == 0,
              "warp_shuffle: blocks >= 1 and threads a multiple of 32");
  at::Tensor out = at::empty({blocks * threads, 4}, at::kFloat);
  RESATTN_LAUNCH(static_cast<unsigned int>(blocks), static_cast<unsigned int>(threads), 0,
                 cuda::current_stream(), warp_shuffle_kernel)(out.data_ptr<float>());
  RESATTN_KERNEL_LAUNCH_CHECK();
  return out;
}

// Raises: a shuffle whose mask names lanes that have returned.
at::Tensor divergent_shuffle() {
  at::Tensor out = at::zeros({32}, at::kFloat);
  RESATTN_LAUNCH(1, 32, 0, cuda::current_stream(), divergent_shuffle_kernel)(out.data_ptr<float>());
  RESATTN_KERNEL_LAUNCH_CHECK();
  return out;
}

// Fills a fresh n-element tensor with ones, and one element past its end.
at::Tensor out_of_bounds_write(int64_t n) {
  at::Tensor out = at::empty({n}, at::kFloat);
  RESATTN_LAUNCH(cuda::num_blocks(n), cuda::kThreads, 0, cuda::current_stream(), off_by_one_kernel)(
      out.data_ptr<float>(), n);
  RESATTN_KERNEL_LAUNCH_CHECK();
  return out;
}

// Copies 4 * nvec floats starting one float into a fresh buffer with 128-bit vector
// loads: a misaligned access (a fault on a GPU; UBSan's alignment check in the ASan build).
at::Tensor misaligned_vector_read(int64_t nvec) {
  at::Tensor in = at::zeros({4 * nvec + 1}, at::kFloat);
  at::Tensor out = at::empty({4 * nvec}, at::kFloat);
  RESATTN_LAUNCH(cuda::num_blocks(nvec), cuda::kThreads, 0, cuda::current_stream(),
                 unchecked_vector_copy_kernel)(in.data_ptr<float>() + 1, out.data_ptr<float>(), nvec);
  RESATTN_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace emu_selftest
}  // namespace resattn
