// CPU entry points of the latent LayerNorm: checks, allocation, capability dispatch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <dito_fast/check.h>
#include <dito_fast/cpu_kernels.h>

namespace dito_fast {
namespace {

at::ScalarType opmath(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> latent_layernorm_cpu(const at::Tensor& z, double eps) {
  constexpr const char* op = "latent_layernorm";
  check_floating(z, op, "z");
  TORCH_CHECK(z.dim() == 4, op, ": z must be (B, C, H, W), got shape ", z.sizes());
  TORCH_CHECK(z.size(0) > 0 && z.numel() > 0, op, ": z is empty, shape ", z.sizes());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const auto zc = z.contiguous(preferred_format(z));  // a sample is one dense block either way
  auto y = at::empty_like(zc);
  auto rstd = at::empty({z.size(0)}, z.options().dtype(opmath(z.scalar_type())));
  DITO_CPU_CALL(latent_layernorm_kernel, zc, eps, y, rstd);
  return {y, rstd};
}

at::Tensor latent_layernorm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rstd) {
  constexpr const char* op = "latent_layernorm_backward";
  TORCH_CHECK(grad_y.sizes() == y.sizes(), op, ": grad_y ", grad_y.sizes(), " and y ", y.sizes(), " differ in shape");
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == y.size(0), op, ": rstd must have shape (", y.size(0), ")");
  const auto fmt = preferred_format(y);
  const auto yc = y.contiguous(fmt);
  auto gz = at::empty_like(yc);
  DITO_CPU_CALL(latent_layernorm_backward_kernel, grad_y.to(y.scalar_type()).contiguous(fmt), yc,
                rstd.to(opmath(y.scalar_type())).contiguous(), gz);
  return gz;
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, CPU, m) {
  m.impl("latent_layernorm", &latent_layernorm_cpu);
  m.impl("latent_layernorm_backward", &latent_layernorm_backward_cpu);
}

}  // namespace dito_fast
