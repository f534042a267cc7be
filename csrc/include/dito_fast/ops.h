// dito_fast's fused ops for C++ callers: typed calls through the c10 dispatcher, the route that
// torch.ops.dito_fast.<op> takes from Python, so every dispatch key applies (the C++ autograd
// formulas of csrc/autograd.cpp, the CPU or CUDA kernels, fake tensors). The ops are registered
// when the library holding them loads: libdito_fast_ops.so of the CMake build (CMakeLists.txt) in
// a C++ program, or dito_fast._C in a Python process (csrc/module.cpp uses these calls).
//
// Inputs and results are as the Python signatures of dito_fast.ops describe (shapes, dtypes,
// layouts); bad input raises c10::Error (c10::TypeError / c10::ValueError for dtypes and values)
// whose message names the op and the problem. These functions do not choose a backend: the
// Python dispatcher's backend selection (ref, triton, DITO_FAST_BACKEND) is Python's.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace dito_fast {
namespace ops {
namespace detail {

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace detail

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Flow-matching noising of x (B, ...) with noise (like x) at times t (B,):
// (x_t, v) = ((1 - t) x + (s + t (1 - s)) noise, (1 - s) noise - x), s = sigma_min.
inline std::tuple<Tensor, Tensor> fm_noise(const Tensor& x, const Tensor& noise, const Tensor& t,
                                           double sigma_min = 1e-5) {
  using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double);
  static const auto op = detail::find<Sig>("dito_fast::fm_noise");
  return op.call(x, noise, t, sigma_min);
}

// Per-sample mean squared error (B,) of pred and target (B, ...): float32, or float64 for float64.
inline Tensor fm_loss(const Tensor& pred, const Tensor& target) {
  using Sig = Tensor(const Tensor&, const Tensor&);
  static const auto op = detail::find<Sig>("dito_fast::fm_loss");
  return op.call(pred, target);
}

// Affine-free LayerNorm of z (B, C, H, W) over (C, H, W) per sample: (y, rstd (B,)).
inline std::tuple<Tensor, Tensor> latent_layernorm(const Tensor& z, double eps = 1e-5) {
  using Sig = std::tuple<Tensor, Tensor>(const Tensor&, double);
  static const auto op = detail::find<Sig>("dito_fast::latent_layernorm");
  return op.call(z, eps);
}

// GroupNorm(num_groups; weight (C,), bias (C,)) of x (B, C, H, W), then y (1 + scale) + shift
// (scale, shift (B, C)), then SiLU if silu: (y, mean (B, G), rstd (B, G)). Absent parameters read
// as weight 1, bias 0, scale 0, shift 0.
inline std::tuple<Tensor, Tensor, Tensor> group_norm_modulate_silu(const Tensor& x, int64_t num_groups,
                                                                   const OptTensor& weight = std::nullopt,
                                                                   const OptTensor& bias = std::nullopt,
                                                                   const OptTensor& scale = std::nullopt,
                                                                   const OptTensor& shift = std::nullopt,
                                                                   double eps = 1e-5, bool silu = true) {
  using Sig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, const OptTensor&, const OptTensor&,
                                                 const OptTensor&, const OptTensor&, double, bool);
  static const auto op = detail::find<Sig>("dito_fast::group_norm_modulate_silu");
  return op.call(x, num_groups, weight, bias, scale, shift, eps, silu);
}

}  // namespace ops
}  // namespace dito_fast
