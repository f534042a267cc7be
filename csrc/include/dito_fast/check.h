// Input checks shared by the CPU and CUDA wrappers: every message names the op and the problem.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define DITO_CHECK(cond, op, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

namespace dito_fast {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              op, ": ", name, " has unsupported dtype ", t.scalar_type(), " (float32/float64/float16/bfloat16)");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                              const char* nb) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", na, " is on ", a.device(), " but ", nb, " is on ", b.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// The layout a 4-d activation is processed in: channels_last when its strides say so, else
// contiguous (non-dense inputs are copied into that format by the wrappers).
inline at::MemoryFormat preferred_format(const at::Tensor& x) {
  return x.dim() == 4 ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

}  // namespace dito_fast
