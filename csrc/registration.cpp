// Every schema of dito_fast's custom ops, in one place. Implementations register per device in
// csrc/ops/<op>/<op>_cpu.cpp and <op>_cuda.cu (TORCH_LIBRARY_IMPL), the autograd formulas in
// csrc/autograd.cpp; fake (meta) implementations are registered from Python (dito_fast/ops/_cpp.py).
#include <torch/library.h>

#include <dito_fast/cpu_kernels.h>

#include <ATen/Version.h>

#include <mutex>
#include <string>

TORCH_LIBRARY(dito_fast, m) {
  // Flow matching: x_t = (1 - t) x + (s + t (1 - s)) noise, v = (1 - s) noise - x.
  m.def("fm_noise(Tensor x, Tensor noise, Tensor t, float sigma_min) -> (Tensor, Tensor)");
  // Its backward: (grad_x, grad_noise) from the gradients of (x_t, v); either may be absent (zero).
  m.def("fm_noise_backward(Tensor? grad_xt, Tensor? grad_v, Tensor t, float sigma_min) -> (Tensor, Tensor)");
  // Per-sample mean squared error (B,): float32, or float64 for float64 inputs.
  m.def("fm_loss(Tensor pred, Tensor target) -> Tensor");
  m.def("fm_loss_backward(Tensor grad, Tensor pred, Tensor target) -> Tensor");
  // Affine-free LayerNorm over (C, H, W): returns (y, rstd (B,)).
  m.def("latent_layernorm(Tensor z, float eps) -> (Tensor, Tensor)");
  m.def("latent_layernorm_backward(Tensor grad_y, Tensor y, Tensor rstd) -> Tensor");
  // GroupNorm -> y (1 + scale) + shift -> SiLU: returns (y, mean (B, G), rstd (B, G)).
  m.def("group_norm_modulate_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, "
        "Tensor? shift, float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  // Returns (dx, dweight, dbias, dscale, dshift); gradients of absent inputs are empty (0,) tensors.
  m.def("group_norm_modulate_silu_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, int num_groups, "
        "Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, bool silu) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // 3x3 convolution, stride 1, padding 1, by Winograd F(MxM, 3x3), M = 2 or 4. u: the transformed
  // filter (K, C_out, C_in) of a weight (C_out, C_in, 3, 3), K = (M + 2)^2 = 16 or 36, which gives M
  // (dito_fast/ops/conv3x3.py). transposed=False:
  // x (B, C_in, H, W) -> (B, C_out, H, W), plus bias (C_out,). transposed=True: the input gradient of
  // that convolution (the convolution with the flipped filter, channels swapped): x (B, C_out, H, W)
  // -> (B, C_in, H, W), plus bias (C_in,).
  m.def("winograd_conv3x3(Tensor x, Tensor u, Tensor? bias, bool transposed) -> Tensor");
  // The gradient with respect to u: (K, C_out, C_in) for tile M (2 or 4), from x (B, C_in, H, W) and
  // grad_y (B, C_out, H, W); with bias=True also the bias gradient (C_out,) (grad_y summed over
  // batch and pixels, formed in the same pass over grad_y), else an empty (0,) tensor.
  m.def("winograd_conv3x3_weight_grad(Tensor x, Tensor grad_y, int tile, bool bias) -> (Tensor, Tensor)");
  // The filter transform u = G g G^T ((M + 2)^2, C_out, C_in) of weight (C_out, C_in, 3, 3), and its
  // adjoint: the weight's gradient (C_out, C_in, 3, 3) from u's (the tile follows from its 16 or 36
  // positions). out_channels_last: u's memory is ((M + 2)^2, C_in, C_out), C_out fastest (strides
  // (C_out C_in, 1, C_out)), the layout of the forward convolution's GEMMs.
  m.def("winograd_filter(Tensor weight, int tile, bool out_channels_last) -> Tensor");
  m.def("winograd_filter_adjoint(Tensor grad_u) -> Tensor");
}

namespace dito_fast {
namespace cpu {

int capability_level() {
  static const int level = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    int built = 0;
#if defined(DITO_FAST_HAVE_AVX2)
    built = 1;
#endif
#if defined(DITO_FAST_HAVE_AVX512)
    built = 2;
#endif
    const int want = cap == "AVX512" ? 2 : cap == "AVX2" ? 1 : 0;
    return want < built ? want : built;
  }();
  return level;
}

const char* capability_name() {
  static const char* names[] = {"DEFAULT", "AVX2", "AVX512"};
  return names[capability_level()];
}

}  // namespace cpu
}  // namespace dito_fast
