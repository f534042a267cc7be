// CPU kernels of the fused ops, compiled once per instruction set (DEFAULT, AVX2, AVX512) into
// namespaces of those names (setup.py / CMakeLists.txt build csrc/ops/*/*_cpu_kernel.cpp with the
// matching -m flags and -DCPU_CAPABILITY=...). The wrappers call DITO_CPU_KERNEL(name)(...), which
// picks the variant for torch's run-time CPU capability (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY), so one binary runs on any x86-64 CPU and uses AVX-512 where it exists.
//
// All tensors passed in are dense in the layout stated (the wrappers make them so) and outputs are
// preallocated; kernels never allocate tensors.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>

#define DITO_FAST_DECLARE_CPU_KERNELS(CAP)                                                            \
  namespace CAP {                                                                                     \
  /* x, noise, x_t, v: (B, N) contiguous; t: (B,) floating, any stride (per-sample times). */         \
  void fm_noise_kernel(const at::TensorBase& x, const at::TensorBase& noise, const at::TensorBase& t, \
                       double sigma_min, const at::TensorBase& x_t, const at::TensorBase& v);          \
  /* grad_xt, grad_v (either may be undefined, not both), grad_x, grad_noise: (B, N) contiguous,  \
     one dtype; t: (B,) floating, any stride. */                                                     \
  void fm_noise_backward_kernel(const at::TensorBase& grad_xt, const at::TensorBase& grad_v,         \
                                const at::TensorBase& t, double sigma_min, const at::TensorBase& grad_x, \
                                const at::TensorBase& grad_noise);                                    \
  /* pred, target: (B, N) contiguous; loss: (B,) float32 or float64. */                               \
  void fm_loss_kernel(const at::TensorBase& pred, const at::TensorBase& target, const at::TensorBase& loss); \
  /* grad: (B,) floating, any stride; grad_pred: (B, N) like pred. */                                 \
  void fm_loss_backward_kernel(const at::TensorBase& grad, const at::TensorBase& pred,                \
                               const at::TensorBase& target, const at::TensorBase& grad_pred);        \
  /* z, y: (B, N) dense per sample; rstd: (B,) opmath. */                                             \
  void latent_layernorm_kernel(const at::TensorBase& z, double eps, const at::TensorBase& y,          \
                               const at::TensorBase& rstd);                                           \
  void latent_layernorm_backward_kernel(const at::TensorBase& grad_y, const at::TensorBase& y,        \
                                        const at::TensorBase& rstd, const at::TensorBase& grad_z);    \
  /* x, y: (B, C, H, W) contiguous or channels_last (the same for both); mean, rstd: (B, G) opmath;  \
     weight/bias (C,), scale/shift (B, C) may be undefined. */                                        \
  void gnms_kernel(const at::TensorBase& x, int64_t groups, const at::TensorBase& weight,             \
                   const at::TensorBase& bias, const at::TensorBase& scale, const at::TensorBase& shift, \
                   double eps, bool silu, const at::TensorBase& y, const at::TensorBase& mean,        \
                   const at::TensorBase& rstd);                                                       \
  /* grads of absent optional inputs are undefined TensorBases and are not written. */                \
  void gnms_backward_kernel(const at::TensorBase& grad_y, const at::TensorBase& x,                    \
                            const at::TensorBase& mean, const at::TensorBase& rstd, int64_t groups,   \
                            const at::TensorBase& weight, const at::TensorBase& bias,                 \
                            const at::TensorBase& scale, const at::TensorBase& shift, bool silu,      \
                            const at::TensorBase& grad_x, const at::TensorBase& grad_weight,          \
                            const at::TensorBase& grad_bias, const at::TensorBase& grad_scale,        \
                            const at::TensorBase& grad_shift);                                        \
  /* Winograd F(MxM,3x3), M = tile = 2 or 4 (csrc/ops/conv3x3): x, grad_y, y are float/double with \
     contiguous channels (stride(1) == 1: channels_last, or a channel slice of a channels_last       \
     tensor); v, m, dm are dense ((M+2)^2, n, C) buffers for the n tiles from                        \
     t0; bias (C_out,) may be undefined; flip: read and write the image rotated by 180 degrees (the  \
     input gradient). */                                                                             \
  void winograd_input_transform_kernel(const at::TensorBase& x, int64_t tile, int64_t t0, int64_t n, \
                                       bool flip, const at::TensorBase& v);                          \
  void winograd_output_transform_kernel(const at::TensorBase& m, const at::TensorBase& bias,          \
                                        int64_t tile, int64_t t0, int64_t n, bool flip,               \
                                        const at::TensorBase& y);                                     \
  /* bias_sums: undefined, or (at::get_num_threads(), C_out) double that each thread adds its     \
     tiles' per-channel sums of grad_y into (row at::get_thread_num()). */                           \
  void winograd_grad_output_transform_kernel(const at::TensorBase& grad_y, int64_t tile, int64_t t0,  \
                                             int64_t n, const at::TensorBase& dm,                     \
                                             const at::TensorBase& bias_sums);                        \
  /* The whole float32 convolution (flip: the input gradient) in blocks of block_tiles tiles, each  \
     transformed, multiplied and transformed back by one thread; g ((M+2)^2, C, C_out) dense. */    \
  void winograd_fused_conv_kernel(const at::TensorBase& x, const at::TensorBase& g,                   \
                                  const at::TensorBase& bias, int64_t tile, bool flip,                \
                                  int64_t block_tiles, const at::TensorBase& y);                      \
  /* The filter transform u of weight (C_out, C_in, 3, 3), any strides, into u's memory:            \
     ((M+2)^2, C_out, C_in) dense, or ((M+2)^2, C_in, C_out) dense for out_channels_last; and its     \
     adjoint: grad_weight (C_out, C_in, 3, 3) dense from grad_u ((M+2)^2, C_out, C_in) dense. */      \
  void winograd_filter_kernel(const at::TensorBase& weight, int64_t tile, bool out_channels_last,     \
                              const at::TensorBase& u);                                               \
  void winograd_filter_adjoint_kernel(const at::TensorBase& grad_u, int64_t tile,                     \
                                      const at::TensorBase& grad_weight);                             \
  }

namespace dito_fast {
namespace cpu {

DITO_FAST_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(DITO_FAST_HAVE_AVX2)
DITO_FAST_DECLARE_CPU_KERNELS(AVX2)
#endif
#if defined(DITO_FAST_HAVE_AVX512)
DITO_FAST_DECLARE_CPU_KERNELS(AVX512)
#endif

// 0 = DEFAULT, 1 = AVX2, 2 = AVX512: the best variant both built and allowed by torch's capability.
int capability_level();
const char* capability_name();

}  // namespace cpu
}  // namespace dito_fast

#if defined(DITO_FAST_HAVE_AVX512)
#define DITO_FAST_AVX512_BRANCH(name, ...) if (level_ >= 2) { ::dito_fast::cpu::AVX512::name(__VA_ARGS__); } else
#else
#define DITO_FAST_AVX512_BRANCH(name, ...)
#endif
#if defined(DITO_FAST_HAVE_AVX2)
#define DITO_FAST_AVX2_BRANCH(name, ...) if (level_ >= 1) { ::dito_fast::cpu::AVX2::name(__VA_ARGS__); } else
#else
#define DITO_FAST_AVX2_BRANCH(name, ...)
#endif

// DITO_CPU_CALL(gnms_kernel, args...): run the best built variant of a kernel.
#define DITO_CPU_CALL(name, ...)                                  \
  do {                                                            \
    const int level_ = ::dito_fast::cpu::capability_level();     \
    (void)level_;                                                 \
    DITO_FAST_AVX512_BRANCH(name, __VA_ARGS__)                    \
    DITO_FAST_AVX2_BRANCH(name, __VA_ARGS__)                      \
    { ::dito_fast::cpu::DEFAULT::name(__VA_ARGS__); }             \
  } while (0)
