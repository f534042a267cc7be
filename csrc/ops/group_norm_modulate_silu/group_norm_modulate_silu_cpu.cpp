// CPU entry points of group_norm_modulate_silu: checks, allocation, capability dispatch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <dito_fast/check.h>
#include <dito_fast/cpu_kernels.h>

#include <utility>

namespace dito_fast {
namespace {

constexpr const char* kOp = "group_norm_modulate_silu";

at::ScalarType opmath(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& shift) {
  check_floating(x, kOp, "x");
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, kOp, ": x is empty, shape ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, kOp, ": ", C, " channels are not divisible by ", groups, " groups");
  auto check_opt = [&](const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) {
    if (!t.has_value() || !t->defined()) return;
    check_floating(*t, kOp, name);
    check_same_device(*t, x, kOp, name, "x");
    check_shape(*t, shape, kOp, name);
  };
  check_opt(weight, "weight", {C});
  check_opt(bias, "bias", {C});
  check_opt(scale, "scale", {B, C});
  check_opt(shift, "shift", {B, C});
}

at::Tensor opt_contig(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gnms_cpu(const at::Tensor& x, int64_t groups,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& scale,
                                                        const std::optional<at::Tensor>& shift, double eps, bool silu) {
  check_inputs(x, groups, weight, bias, scale, shift);
  const auto xc = x.contiguous(preferred_format(x));
  auto y = at::empty_like(xc);
  auto mean = at::empty({x.size(0), groups}, x.options().dtype(opmath(x.scalar_type())));
  auto rstd = at::empty_like(mean);
  DITO_CPU_CALL(gnms_kernel, xc, groups, opt_contig(weight), opt_contig(bias), opt_contig(scale), opt_contig(shift),
                eps, silu, y, mean, rstd);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gnms_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool silu) {
  check_inputs(x, groups, weight, bias, scale, shift);
  constexpr const char* op = "group_norm_modulate_silu_backward";
  check_floating(grad_y, op, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y ", grad_y.sizes(), " and x ", x.sizes(), " differ in shape");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
    // the kernels read B * groups values of each (a shorter one had been read past its end)
    check_floating(t, op, name);
    check_same_device(t, x, op, name, "x");
    TORCH_CHECK(t.numel() == x.size(0) * groups, op, ": mean and rstd must have shape (", x.size(0), ", ", groups,
                "), got ", mean.sizes(), " and ", rstd.sizes());
  }
  const auto fmt = preferred_format(x);
  const auto xc = x.contiguous(fmt);
  const auto gc = grad_y.to(x.scalar_type()).contiguous(fmt);
  const auto dt = opmath(x.scalar_type());
  auto dx = at::empty_like(xc);
  auto grad_like = [](const std::optional<at::Tensor>& t, const at::Tensor& x_) {
    return t.has_value() && t->defined() ? at::empty_like(*t, at::MemoryFormat::Contiguous) : at::empty({0}, x_.options());
  };
  auto dw = grad_like(weight, x), db = grad_like(bias, x), ds = grad_like(scale, x), dsh = grad_like(shift, x);
  auto def = [](const at::Tensor& t) { return t.numel() ? t : at::Tensor(); };
  DITO_CPU_CALL(gnms_backward_kernel, gc, xc, mean.to(dt).contiguous(), rstd.to(dt).contiguous(), groups,
                opt_contig(weight), opt_contig(bias), opt_contig(scale), opt_contig(shift), silu, dx,
                def(dw), def(db), def(ds), def(dsh));
  return {dx, dw, db, ds, dsh};
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, CPU, m) {
  m.impl("group_norm_modulate_silu", &gnms_cpu);
  m.impl("group_norm_modulate_silu_backward", &gnms_backward_cpu);
}

}  // namespace dito_fast
