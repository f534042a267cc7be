// Input checks shared by the CPU and CUDA wrappers: every message names the op and the problem.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#define DITO_CHECK(cond, op, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

namespace dito_fast {

// These three raise Python's TypeError / ValueError with the wording of the Python wrappers' checks
// (dito_fast/ops/*.py), which leave some of them to the C++ op (group_norm_modulate_silu's
// parameters): the same error whichever side finds the problem.
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.is_floating_point(), op, ": ", name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16,
                   op, ": ", name, " has unsupported dtype ", t.scalar_type(), " (float32/float64/float16/bfloat16)");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                              const char* nb) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", na, " is on ", a.device(), " but ", nb, " is on ", b.device());
}

// A shape as Python prints the tuple: (6,), (2, 6).
inline std::string tuple_str(at::IntArrayRef shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", tuple_str(shape), ", got ",
                    tuple_str(t.sizes()));
}

// fm_noise_backward's device-independent checks (the CPU and CUDA wrappers add their own device
// checks): at least one upstream gradient, both alike when both are given, a non-empty batch and
// t of shape (B,). Returns the gradient the outputs are shaped like.
inline const at::Tensor& check_fm_noise_backward(const std::optional<at::Tensor>& grad_xt,
                                                 const std::optional<at::Tensor>& grad_v, const at::Tensor& t) {
  constexpr const char* op = "fm_noise_backward";
  const bool has_xt = grad_xt.has_value() && grad_xt->defined(), has_v = grad_v.has_value() && grad_v->defined();
  TORCH_CHECK(has_xt || has_v, op, ": at least one of grad_xt and grad_v must be given");
  const at::Tensor& like = has_xt ? *grad_xt : *grad_v;
  check_floating(like, op, has_xt ? "grad_xt" : "grad_v");
  if (has_xt && has_v) {
    TORCH_CHECK(grad_v->scalar_type() == grad_xt->scalar_type() && grad_v->sizes() == grad_xt->sizes(), op,
                ": grad_xt ", grad_xt->sizes(), " ", grad_xt->scalar_type(), " and grad_v ", grad_v->sizes(), " ",
                grad_v->scalar_type(), " differ");
  }
  TORCH_CHECK(like.dim() >= 1 && like.size(0) > 0, op, ": gradients must have a non-empty batch dimension, got shape ",
              like.sizes());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0), op, ": t must have shape (", like.size(0), "), got ", t.sizes());
  check_floating(t, op, "t");
  return like;
}

// The layout a 4-d activation is processed in: channels_last when its strides say so (dense or
// not: a channel slice of a channels_last tensor counts), else contiguous; non-dense inputs are
// copied into that format by the wrappers (conv3x3 reads channels_last slices in place). The
// fake kernels use the same rule (memory_format_of in dito_fast/ops/_cpp.py).
inline at::MemoryFormat preferred_format(const at::Tensor& x) {
  return x.dim() == 4 ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

}  // namespace dito_fast
