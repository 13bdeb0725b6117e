// CPU kernels of resattn_fast::upsample_bilinear_add and its backward (schemas in
// csrc/ops.cpp): input checks, memory formats, and the per-call tap tables computed with
// kernels/bilinear.h; the vectorised loops live in upsample_bilinear_add_kernel.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "bilinear.h"
#include "checks.h"
#include "cpu/dispatch.h"

namespace resattn {
namespace cpu {
namespace {

// linear_tap for every output index of one axis.
template <typename acc_t>
struct ForwardTaps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> w0, w1;

  ForwardTaps(int64_t in_size, int64_t out_size, bool align_corners)
      : i0(out_size), i1(out_size), w0(out_size), w1(out_size) {
    const acc_t scale = bilinear_scale<acc_t>(in_size, out_size, align_corners);
    for (int64_t d = 0; d < out_size; ++d) {
      const LinearTap<acc_t> t = linear_tap<acc_t>(d, in_size, scale, align_corners);
      i0[d] = t.i0;
      i1[d] = t.i1;
      w0[d] = t.w0;
      w1[d] = t.w1;
    }
  }
  AxisTaps view() const { return {i0.data(), i1.data(), w0.data(), w1.data()}; }
};

// For every input index of one axis: the output range that reads it (output_range) and
// the weight of each of those outputs (tap_weight), flattened.
template <typename acc_t>
struct GatherTaps {
  std::vector<int64_t> lo, hi, off;
  std::vector<acc_t> w;

  GatherTaps(int64_t in_size, int64_t out_size, bool align_corners)
      : lo(in_size), hi(in_size), off(in_size) {
    const acc_t scale = bilinear_scale<acc_t>(in_size, out_size, align_corners);
    for (int64_t s = 0; s < in_size; ++s) {
      output_range<acc_t>(s, in_size, out_size, scale, align_corners, &lo[s], &hi[s]);
      off[s] = static_cast<int64_t>(w.size());
      for (int64_t d = lo[s]; d < hi[s]; ++d) {
        w.push_back(tap_weight<acc_t>(linear_tap<acc_t>(d, in_size, scale, align_corners), s));
      }
    }
  }
  AxisGather view() const { return {lo.data(), hi.data(), off.data(), w.data()}; }
};

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "resattn_fast: ", name, " must be a CPU tensor for the cpu backend, got ",
              t.device());
}

template <typename acc_t>
void run_forward(UpsampleForwardArgs& args, bool align_corners) {
  const ForwardTaps<acc_t> rows(args.h, args.H, align_corners);
  const ForwardTaps<acc_t> cols(args.w, args.W, align_corners);
  args.rows = rows.view();
  args.cols = cols.view();
  cpu_kernels().upsample_forward(args);
}

template <typename acc_t>
void run_backward(UpsampleBackwardArgs& args, bool align_corners) {
  const GatherTaps<acc_t> rows(args.h, args.H, align_corners);
  const GatherTaps<acc_t> cols(args.w, args.W, align_corners);
  args.rows = rows.view();
  args.cols = cols.view();
  cpu_kernels().upsample_backward(args);
}

// x (N, C, h, w), skip (N, C, H, W) or None -> (N, C, H, W) in skip's memory format
// (x's without skip). Inputs of another layout or with gaps are copied once into that
// format (x is the small tensor of the two).
at::Tensor upsample_bilinear_add_cpu(const at::Tensor& x, const std::optional<at::Tensor>& skip,
                                     at::IntArrayRef size, bool align_corners) {
  check_upsample_args(x, skip, size);
  check_cpu(x, "x");
  const at::MemoryFormat fmt = follow_format(skip.has_value() ? *skip : x);
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N, C, size[0], size[1]}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor sc;
  if (skip.has_value()) sc = skip->contiguous(fmt);

  UpsampleForwardArgs args{};
  args.dtype = x.scalar_type();
  args.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  args.N = N;
  args.C = C;
  args.h = x.size(2);
  args.w = x.size(3);
  args.H = size[0];
  args.W = size[1];
  args.x = xc.const_data_ptr();
  args.skip = sc.defined() ? sc.const_data_ptr() : nullptr;
  args.out = out.mutable_data_ptr();
  if (args.dtype == at::kDouble) {
    run_forward<double>(args, align_corners);
  } else {
    run_forward<float>(args, align_corners);
  }
  return out;
}

// grad (N, C, H, W) -> grad_x (N, C, h, w) in grad's memory format.
at::Tensor upsample_bilinear_add_backward_cpu(const at::Tensor& grad, at::IntArrayRef input_size,
                                              bool align_corners) {
  check_upsample_backward_args(grad, input_size);
  check_cpu(grad, "grad");
  const at::MemoryFormat fmt = follow_format(grad);
  const int64_t N = grad.size(0), C = grad.size(1);
  at::Tensor grad_x =
      at::empty({N, C, input_size[0], input_size[1]}, grad.options().memory_format(fmt));
  if (grad_x.numel() == 0) return grad_x;
  const at::Tensor gc = grad.contiguous(fmt);

  UpsampleBackwardArgs args{};
  args.dtype = grad.scalar_type();
  args.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  args.N = N;
  args.C = C;
  args.h = input_size[0];
  args.w = input_size[1];
  args.H = grad.size(2);
  args.W = grad.size(3);
  args.grad = gc.const_data_ptr();
  args.grad_x = grad_x.mutable_data_ptr();
  if (args.dtype == at::kDouble) {
    run_backward<double>(args, align_corners);
  } else {
    run_backward<float>(args, align_corners);
  }
  return grad_x;
}

}  // namespace
}  // namespace cpu
}  // namespace resattn

TORCH_LIBRARY_IMPL(resattn_fast, CPU, m) {
  m.impl("upsample_bilinear_add", &resattn::cpu::upsample_bilinear_add_cpu);
  m.impl("upsample_bilinear_add_backward", &resattn::cpu::upsample_bilinear_add_backward_cpu);
}
