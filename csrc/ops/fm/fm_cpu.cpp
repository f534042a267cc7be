// CPU entry points of the flow-matching ops: checks, allocation, capability dispatch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <dito_fast/check.h>
#include <dito_fast/cpu_kernels.h>

namespace dito_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> fm_noise_cpu(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t,
                                                double sigma_min) {
  constexpr const char* op = "fm_noise";
  check_floating(x, op, "x");
  TORCH_CHECK(noise.scalar_type() == x.scalar_type(), op, ": noise dtype ", noise.scalar_type(), " != x dtype ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(0) > 0, op, ": x must have a non-empty batch dimension, got shape ", x.sizes());
  TORCH_CHECK(noise.sizes() == x.sizes(), op, ": x ", x.sizes(), " and noise ", noise.sizes(), " differ in shape");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), op, ": t must have shape (", x.size(0), "), got ", t.sizes());
  check_floating(t, op, "t");
  // Elementwise within each sample: any dense layout whose samples are contiguous blocks works, so
  // channels_last inputs are kept (and noise is brought to x's layout).
  const auto fmt = preferred_format(x);
  const auto xc = x.contiguous(fmt), nc = noise.contiguous(fmt);
  auto x_t = at::empty_like(xc), v = at::empty_like(xc);
  DITO_CPU_CALL(fm_noise_kernel, xc, nc, t, sigma_min, x_t, v);
  return {x_t, v};
}

std::tuple<at::Tensor, at::Tensor> fm_noise_backward_cpu(const std::optional<at::Tensor>& grad_xt,
                                                         const std::optional<at::Tensor>& grad_v, const at::Tensor& t,
                                                         double sigma_min) {
  const at::Tensor& like = check_fm_noise_backward(grad_xt, grad_v, t);
  const bool has_xt = grad_xt.has_value() && grad_xt->defined(), has_v = grad_v.has_value() && grad_v->defined();
  const auto fmt = preferred_format(like);
  const auto a = has_xt ? grad_xt->contiguous(fmt) : at::Tensor();
  const auto g = has_v ? grad_v->contiguous(fmt) : at::Tensor();
  auto grad_x = at::empty(like.sizes(), like.options().memory_format(fmt));
  auto grad_noise = at::empty_like(grad_x);
  DITO_CPU_CALL(fm_noise_backward_kernel, a, g, t, sigma_min, grad_x, grad_noise);
  return {grad_x, grad_noise};
}

at::ScalarType loss_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor fm_loss_cpu(const at::Tensor& pred, const at::Tensor& target) {
  constexpr const char* op = "fm_loss";
  check_floating(pred, op, "pred");
  TORCH_CHECK(target.scalar_type() == pred.scalar_type(), op, ": target dtype ", target.scalar_type(), " != pred dtype ", pred.scalar_type());
  TORCH_CHECK(pred.dim() >= 1 && pred.size(0) > 0, op, ": pred must have a non-empty batch dimension, got shape ", pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": pred ", pred.sizes(), " and target ", target.sizes(), " differ in shape");
  auto loss = at::empty({pred.size(0)}, pred.options().dtype(loss_dtype(pred.scalar_type())));
  const auto fmt = preferred_format(pred);  // the per-sample sums are taken in memory order
  DITO_CPU_CALL(fm_loss_kernel, pred.contiguous(fmt), target.contiguous(fmt), loss);
  return loss;
}

at::Tensor fm_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target) {
  constexpr const char* op = "fm_loss_backward";
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == pred.size(0), op, ": grad must have shape (", pred.size(0), "), got ", grad.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes() && target.scalar_type() == pred.scalar_type(), op, ": pred and target must match");
  check_floating(grad, op, "grad");
  const auto fmt = preferred_format(pred);
  const auto pc = pred.contiguous(fmt);
  auto out = at::empty_like(pc);
  DITO_CPU_CALL(fm_loss_backward_kernel, grad, pc, target.contiguous(fmt), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, CPU, m) {
  m.impl("fm_noise", &fm_noise_cpu);
  m.impl("fm_noise_backward", &fm_noise_backward_cpu);
  m.impl("fm_loss", &fm_loss_cpu);
  m.impl("fm_loss_backward", &fm_loss_backward_cpu);
}

}  // namespace dito_fast
