// CUDA kernels of resattn_fast::attention_residual and its backward.
//
//   forward : out = (1 + sigmoid(m)) * trunk
//   backward: grad_trunk = g * (1 + s), grad_m = g * trunk * s * (1 - s),  s = sigmoid(m)
//
// Elementwise over the memory order of the output, which is laid out like trunk
// (at::empty_like with preserve_format, the same rule as the fake kernel). Inputs with
// other strides are first copied into that layout, so the kernels only ever see dense
// buffers of one order: 128-bit vector loads/stores when every pointer is 16-byte
// aligned, a scalar loop for the tail (and for unaligned views). Math in float32 (float64
// for double) from kernels/sigmoid.h, the functions the CPU backend runs too; half types
// round once, at the store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda_common.cuh"
#include "sigmoid.h"

namespace resattn {
namespace cuda {
namespace {

template <typename scalar_t, int VEC>
__global__ void attention_residual_forward_kernel(const scalar_t* __restrict__ m,
                                                  const scalar_t* __restrict__ f,
                                                  scalar_t* __restrict__ out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    const vec_t mv = reinterpret_cast<const vec_t*>(m)[i];
    const vec_t fv = reinterpret_cast<const vec_t*>(f)[i];
    vec_t ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ov.val[k] = static_cast<scalar_t>(attention_residual_forward<acc_t>(
          static_cast<acc_t>(mv.val[k]), static_cast<acc_t>(fv.val[k])));
    }
    reinterpret_cast<vec_t*>(out)[i] = ov;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {  // tail: fewer than VEC elements
    out[i] = static_cast<scalar_t>(
        attention_residual_forward<acc_t>(static_cast<acc_t>(m[i]), static_cast<acc_t>(f[i])));
  }
}

template <typename scalar_t, int VEC>
__global__ void attention_residual_backward_kernel(const scalar_t* __restrict__ g,
                                                   const scalar_t* __restrict__ m,
                                                   const scalar_t* __restrict__ f,
                                                   scalar_t* __restrict__ grad_m,
                                                   scalar_t* __restrict__ grad_f, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    const vec_t gv = reinterpret_cast<const vec_t*>(g)[i];
    const vec_t mv = reinterpret_cast<const vec_t*>(m)[i];
    const vec_t fv = reinterpret_cast<const vec_t*>(f)[i];
    vec_t gmv, gfv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t gm, gf;
      attention_residual_backward<acc_t>(static_cast<acc_t>(gv.val[k]),
                                         static_cast<acc_t>(mv.val[k]),
                                         static_cast<acc_t>(fv.val[k]), &gm, &gf);
      gmv.val[k] = static_cast<scalar_t>(gm);
      gfv.val[k] = static_cast<scalar_t>(gf);
    }
    reinterpret_cast<vec_t*>(grad_m)[i] = gmv;
    reinterpret_cast<vec_t*>(grad_f)[i] = gfv;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    acc_t gm, gf;
    attention_residual_backward<acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(m[i]),
                                       static_cast<acc_t>(f[i]), &gm, &gf);
    grad_m[i] = static_cast<scalar_t>(gm);
    grad_f[i] = static_cast<scalar_t>(gf);
  }
}

// `t` with exactly `like`'s strides (copied only when they differ), so that one flat
// index addresses the same logical element in every buffer. `like` is dense.
at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && t.is_non_overlapping_and_dense()) {
    return t;
  }
  at::Tensor c = at::empty_like(like);
  c.copy_(t);
  return c;
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

at::Tensor attention_residual_cuda(const at::Tensor& mask_logits, const at::Tensor& trunk) {
  check_attention_args(mask_logits, trunk);
  check_on_device(trunk, "trunk");
  const DeviceGuard guard(trunk.device());
  // Same layout rule as the fake kernel: trunk's own strides when dense, else its
  // suggested memory format (contiguous or channels_last).
  at::Tensor out = at::empty_like(trunk, at::MemoryFormat::Preserve);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor m = laid_out_like(mask_logits, out);
  const at::Tensor f = laid_out_like(trunk, out);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "attention_residual_cuda", [&] {
        const scalar_t* mp = m.data_ptr<scalar_t>();
        const scalar_t* fp = f.data_ptr<scalar_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        const bool vec = all_aligned({mp, fp, op});
        RESATTN_DISPATCH_VEC(vec, [&] {
          RESATTN_LAUNCH(num_blocks((n + VEC - 1) / VEC), kThreads, 0, stream,
                         attention_residual_forward_kernel<scalar_t, VEC>)(mp, fp, op, n);
          RESATTN_KERNEL_LAUNCH_CHECK();
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_residual_backward_cuda(const at::Tensor& grad,
                                                                    const at::Tensor& mask_logits,
                                                                    const at::Tensor& trunk) {
  check_attention_args(mask_logits, trunk);
  check_attention_grad(grad, trunk);
  check_on_device(trunk, "trunk");
  const DeviceGuard guard(trunk.device());
  // Each gradient is laid out like its input (the fake kernel's rule); the kernel runs in
  // grad_trunk's order and grad_m is copied into its own layout only if that differs.
  at::Tensor grad_f = at::empty_like(trunk, at::MemoryFormat::Preserve);
  at::Tensor grad_m = at::empty_like(mask_logits, at::MemoryFormat::Preserve);
  const int64_t n = grad_f.numel();
  if (n == 0) return {grad_m, grad_f};
  at::Tensor grad_m_work = grad_m.strides() == grad_f.strides() ? grad_m : at::empty_like(grad_f);
  const at::Tensor g = laid_out_like(grad, grad_f);
  const at::Tensor m = laid_out_like(mask_logits, grad_f);
  const at::Tensor f = laid_out_like(trunk, grad_f);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_f.scalar_type(), "attention_residual_backward_cuda", [&] {
        const scalar_t* gp = g.data_ptr<scalar_t>();
        const scalar_t* mp = m.data_ptr<scalar_t>();
        const scalar_t* fp = f.data_ptr<scalar_t>();
        scalar_t* gmp = grad_m_work.data_ptr<scalar_t>();
        scalar_t* gfp = grad_f.data_ptr<scalar_t>();
        const bool vec = all_aligned({gp, mp, fp, gmp, gfp});
        RESATTN_DISPATCH_VEC(vec, [&] {
          RESATTN_LAUNCH(num_blocks((n + VEC - 1) / VEC), kThreads, 0, stream,
                         attention_residual_backward_kernel<scalar_t, VEC>)(gp, mp, fp, gmp, gfp, n);
          RESATTN_KERNEL_LAUNCH_CHECK();
        });
      });
  if (!grad_m_work.is_same(grad_m)) grad_m.copy_(grad_m_work);
  return {grad_m, grad_f};
}

}  // namespace
}  // namespace cuda
}  // namespace resattn

TORCH_LIBRARY_IMPL(RESATTN_CUDA_NAMESPACE, RESATTN_CUDA_DISPATCH_KEY, m) {
  m.impl("attention_residual", &resattn::cuda::attention_residual_cuda);
  m.impl("attention_residual_backward", &resattn::cuda::attention_residual_backward_cuda);
}
