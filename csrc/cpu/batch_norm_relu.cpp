// CPU kernels of resattn_fast::batch_norm_relu, its backward, batch_norm_update_stats and
// batch_norm_relu_with_update
// (schemas in csrc/schemas.h): input checks, memory formats and the per-channel
// coefficients (kernels/batch_norm_relu.h); the vectorised passes over x live in
// batch_norm_relu_kernel.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "batch_norm_relu.h"
#include "checks.h"
#include "cpu/dispatch.h"

namespace resattn {
namespace cpu {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "resattn_fast: ", name, " must be a CPU tensor for the cpu backend, got ",
              t.device());
}

// float32 accumulation, float64 for float64 x.
at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel vector as contiguous acc-dtype values (read only: may alias v).
at::Tensor as_acc(const at::Tensor& v, at::ScalarType acc) { return v.to(acc).contiguous(); }

BatchNormShape shape_of(const at::Tensor& x, at::MemoryFormat fmt) {
  BatchNormShape s{};
  s.dtype = x.scalar_type();
  s.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.size(2) * x.size(3);
  return s;
}

// The per-channel coefficients of the normalisation: invstd, scale = weight * invstd,
// and bias (0 when absent), in acc_t.
struct Coefficients {
  at::Tensor invstd, scale, bias;
};

Coefficients coefficients(const at::Tensor& var, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps, at::ScalarType acc) {
  const int64_t C = var.size(0);
  const at::TensorOptions opts = at::TensorOptions().dtype(acc);
  Coefficients k{at::empty({C}, opts), at::empty({C}, opts),
                 bias.has_value() ? as_acc(*bias, acc) : at::zeros({C}, opts)};
  const at::Tensor w = weight.has_value() ? as_acc(*weight, acc) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "batch_norm_relu_coefficients", [&] {
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* inv = k.invstd.mutable_data_ptr<scalar_t>();
    scalar_t* sc = k.scale.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      inv[c] = bn_invstd<scalar_t>(v[c], static_cast<scalar_t>(eps));
      sc[c] = wp != nullptr ? wp[c] * inv[c] : inv[c];
    }
  });
  return k;
}

// (out, mean, var): out = relu((x - mean) * weight * invstd + bias) laid out like x; mean
// and var are new (C,) tensors in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps) {
  check_batch_norm_relu_args(x, weight, bias, running_mean, running_var, training, eps);
  check_cpu(x, "x");
  const at::MemoryFormat fmt = follow_format(x);
  const at::ScalarType acc = acc_type(x);
  const int64_t C = x.size(1);
  const at::TensorOptions acc_opts = x.options().dtype(acc);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor mean, var;
  if (training) {
    if (x.numel() == 0) return {out, at::zeros({C}, acc_opts), at::zeros({C}, acc_opts)};
    mean = at::empty({C}, acc_opts);
    var = at::empty({C}, acc_opts);
  } else {
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    var = running_var->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    if (x.numel() == 0) return {out, mean, var};
  }
  const at::Tensor xc = x.contiguous(fmt);
  const BatchNormShape shape = shape_of(xc, fmt);
  if (training) {
    BatchNormStatsArgs sa{};
    sa.s = shape;
    sa.x = xc.const_data_ptr();
    sa.mean = mean.mutable_data_ptr();
    sa.var = var.mutable_data_ptr();
    cpu_kernels().bn_stats(sa);
  }
  const Coefficients k = coefficients(var, weight, bias, eps, acc);
  BatchNormForwardArgs fa{};
  fa.s = shape;
  fa.x = xc.const_data_ptr();
  fa.out = out.mutable_data_ptr();
  fa.mean = mean.const_data_ptr();
  fa.scale = k.scale.const_data_ptr();
  fa.bias = k.bias.const_data_ptr();
  cpu_kernels().bn_forward(fa);
  return {out, mean, var};
}

// (grad_x, grad_weight, grad_bias) from grad, x and the forward's statistics; the ReLU
// mask and x_hat are recomputed from x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, bool training,
    double eps, const std::optional<at::Tensor>& grad_residual, bool weight_grads) {
  check_batch_norm_relu_backward_args(grad, x, mean, var, grad_residual);
  if (weight.has_value()) check_channel_vector(*weight, "weight", x);
  if (bias.has_value()) check_channel_vector(*bias, "bias", x);
  TORCH_CHECK(eps >= 0, "resattn_fast: eps must be >= 0, got ", eps);
  check_cpu(x, "x");
  const at::MemoryFormat fmt = follow_format(x);
  const at::ScalarType acc = acc_type(x);
  const int64_t C = x.size(1);
  const at::TensorOptions acc_opts = x.options().dtype(acc);
  const at::ScalarType w_dtype = weight.has_value() ? weight->scalar_type() : acc;
  const at::ScalarType b_dtype = bias.has_value() ? bias->scalar_type() : acc;
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) {
    if (!weight_grads) return {grad_x, at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
    return {grad_x, at::zeros({C}, acc_opts.dtype(w_dtype)), at::zeros({C}, acc_opts.dtype(b_dtype))};
  }
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor gc = grad.contiguous(fmt);
  at::Tensor rc;
  if (grad_residual.has_value()) rc = grad_residual->contiguous(fmt);
  const at::Tensor mean_a = as_acc(mean, acc);
  const at::Tensor var_a = as_acc(var, acc);
  const Coefficients k = coefficients(var_a, weight, bias, eps, acc);
  const BatchNormShape shape = shape_of(xc, fmt);

  at::Tensor sum_dy, sum_dy_xmu;
  if (training || weight_grads) {
    sum_dy = at::empty({C}, acc_opts);
    sum_dy_xmu = at::empty({C}, acc_opts);
    BatchNormBackwardReduceArgs ra{};
    ra.s = shape;
    ra.grad = gc.const_data_ptr();
    ra.x = xc.const_data_ptr();
    ra.mean = mean_a.const_data_ptr();
    ra.scale = k.scale.const_data_ptr();
    ra.bias = k.bias.const_data_ptr();
    ra.sum_dy = sum_dy.mutable_data_ptr();
    ra.sum_dy_xmu = sum_dy_xmu.mutable_data_ptr();
    cpu_kernels().bn_backward_reduce(ra);
  }
  // grad_weight = sum(dy * x_hat) = sum(dy * (x - mean)) * invstd.
  at::Tensor grad_weight_acc = sum_dy.defined() ? sum_dy_xmu * k.invstd : at::Tensor();

  at::Tensor k_mean, k_xmu;
  if (training) {
    // bn_relu_grad_x_train with x_hat * (grad_weight / M) = (x - mean) * k_xmu.
    const double m = static_cast<double>(x.numel() / C);
    k_mean = sum_dy / m;
    k_xmu = grad_weight_acc / m * k.invstd;
  }
  BatchNormBackwardApplyArgs aa{};
  aa.s = shape;
  aa.grad = gc.const_data_ptr();
  aa.x = xc.const_data_ptr();
  aa.residual = rc.defined() ? rc.const_data_ptr() : nullptr;
  aa.grad_x = grad_x.mutable_data_ptr();
  aa.mean = mean_a.const_data_ptr();
  aa.scale = k.scale.const_data_ptr();
  aa.bias = k.bias.const_data_ptr();
  aa.k_mean = training ? k_mean.const_data_ptr() : nullptr;
  aa.k_xmu = training ? k_xmu.const_data_ptr() : nullptr;
  cpu_kernels().bn_backward_apply(aa);

  if (!weight_grads) return {grad_x, at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  return {grad_x, grad_weight_acc.to(w_dtype), sum_dy.to(b_dtype)};
}

// running = (1 - momentum) * running + momentum * batch (unbiased variance), in place,
// in the accumulation dtype of the running tensors; num_batches_tracked += 1 when given.
void batch_norm_update_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, double momentum,
                                 int64_t count, const std::optional<at::Tensor>& num_batches_tracked) {
  check_batch_norm_update_args(running_mean, running_var, mean, var, count, num_batches_tracked);
  check_cpu(running_mean, "running_mean");
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    *num_batches_tracked->data_ptr<int64_t>() += 1;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "batch_norm_update_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor m = as_acc(mean, acc);
    const at::Tensor v = as_acc(var, acc);
    const acc_t* mp = m.const_data_ptr<acc_t>();
    const acc_t* vp = v.const_data_ptr<acc_t>();
    auto rm = running_mean.accessor<scalar_t, 1>();
    auto rv = running_var.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < running_mean.size(0); ++c) {
      acc_t a = static_cast<acc_t>(rm[c]);
      acc_t b = static_cast<acc_t>(rv[c]);
      bn_update_running<acc_t>(a, b, mp[c], vp[c], static_cast<acc_t>(momentum), count);
      rm[c] = static_cast<scalar_t>(a);
      rv[c] = static_cast<scalar_t>(b);
    }
  });
}

// batch_norm_relu in training, then the running update from the statistics it computed:
// the two functions above, in order (a CPU has no launches to save; the op exists so the
// fast modules make one call on every backend). An empty x updates nothing but the count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_with_update_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, double momentum, double eps,
    const std::optional<at::Tensor>& num_batches_tracked) {
  check_batch_norm_relu_with_update_args(x, weight, bias, running_mean, running_var, eps,
                                         num_batches_tracked);
  check_cpu(running_mean, "running_mean");
  auto result = batch_norm_relu_cpu(x, weight, bias, running_mean, running_var, true, eps);
  if (x.numel() == 0) {
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      *num_batches_tracked->data_ptr<int64_t>() += 1;
    }
    return result;
  }
  batch_norm_update_stats_cpu(running_mean, running_var, std::get<1>(result), std::get<2>(result),
                              momentum, x.numel() / x.size(1), num_batches_tracked);
  return result;
}

}  // namespace
}  // namespace cpu
}  // namespace resattn

TORCH_LIBRARY_IMPL(resattn_fast, CPU, m) {
  m.impl("batch_norm_relu", &resattn::cpu::batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &resattn::cpu::batch_norm_relu_backward_cpu);
  m.impl("batch_norm_update_stats", &resattn::cpu::batch_norm_update_stats_cpu);
  m.impl("batch_norm_relu_with_update", &resattn::cpu::batch_norm_relu_with_update_cpu);
}
