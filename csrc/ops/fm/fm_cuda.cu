// CUDA kernels of the flow-matching ops: fm_noise, fm_noise_backward, fm_loss, fm_loss_backward.
//
// All three are memory-bound passes over (B, N) arrays (N = numel per sample). Samples map to
// blockIdx.y (grid-strided past 65535), the elements of a sample to blockIdx.x and the threads,
// which load 16-byte packs (4 float, 8 half/bfloat16, 2 double) when every pointer is 16-byte
// aligned and N is a multiple of the pack width; otherwise one element at a time.
// Per-element math comes from dito_fast/math.h (shared with the CPU kernels).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include <dito_fast/check.h>
#include <dito_fast/cuda_utils.cuh>
#include <dito_fast/math.h>

namespace dito_fast {
namespace {

using namespace cuda;

// ---- fm_noise ------------------------------------------------------------------------------------
constexpr int kEltThreads = 256;

// Launch: grid (bx, min(B, 65535)), block 256. Block (j, b) covers packs j*256 + tid of sample b,
// stepping by bx*256 (grid-stride), and writes x_t and v with the sample's fm_coef.
template <typename scalar_t, typename acc_t, int V>
__global__ void fm_noise_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ e,
                                const acc_t* __restrict__ t, acc_t sigma_min, scalar_t* __restrict__ xt,
                                scalar_t* __restrict__ v, int64_t B, int64_t N) {
  const int64_t npack = N / V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const auto c = math::fm_coef<acc_t>(t[b], sigma_min);
    const int64_t base = b * N;
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      const int64_t o = base + i * V;
      const auto xv = load_pack<V>(x + o);
      const auto ev = load_pack<V>(e + o);
      Pack<scalar_t, V> xtv, vv;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t xa = static_cast<acc_t>(xv.v[k]), ea = static_cast<acc_t>(ev.v[k]);
        xtv.v[k] = static_cast<scalar_t>(math::fm_xt(xa, ea, c));
        vv.v[k] = static_cast<scalar_t>(math::fm_v(xa, ea, c));
      }
      store_pack<V>(xt + o, xtv);
      store_pack<V>(v + o, vv);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> fm_noise_cuda(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t,
                                                 double sigma_min) {
  constexpr const char* op = "fm_noise";
  check_floating(x, op, "x");
  check_is_cuda(x, op, "x");
  check_cuda(noise, x, op, "noise", "x");
  check_cuda(t, x, op, "t", "x");
  TORCH_CHECK(noise.scalar_type() == x.scalar_type(), op, ": noise dtype ", noise.scalar_type(), " != x dtype ",
              x.scalar_type());
  check_floating(t, op, "t");
  TORCH_CHECK(x.dim() >= 1 && x.size(0) > 0, op, ": x must have a non-empty batch dimension, got shape ", x.sizes());
  TORCH_CHECK(noise.sizes() == x.sizes(), op, ": x ", x.sizes(), " and noise ", noise.sizes(), " differ in shape");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), op, ": t must have shape (", x.size(0), "), got ", t.sizes());

  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = preferred_format(x);  // as the CPU op: channels_last kept
  const auto xc = x.contiguous(fmt), ec = noise.contiguous(fmt);
  auto x_t = at::empty_like(xc), v = at::empty_like(xc);  // as the CPU op: the same strides
  const int64_t B = xc.size(0), N = xc.numel() / B;
  if (N == 0) return {x_t, v};
  const auto tc = t.to(opmath_dtype(x.scalar_type())).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fm_noise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool packed = packable<scalar_t>(N, xc.const_data_ptr(), ec.const_data_ptr(), x_t.const_data_ptr(),
                                           v.const_data_ptr());
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 grid(blocks_per_sample(N / V, B, kEltThreads, 2, 1), std::min(B, kMaxGridY));
      fm_noise_kernel<scalar_t, acc_t, V><<<grid, kEltThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(), tc.const_data_ptr<acc_t>(),
          static_cast<acc_t>(sigma_min), x_t.mutable_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(), B, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_pack_width<scalar_t>(packed, launch);
  });
  return {x_t, v};
}

// ---- fm_noise_backward -----------------------------------------------------------------------------
// Launch like fm_noise. grad_x = fm_grad_x(gxt, gv), grad_noise = fm_grad_noise(gxt, gv) with the
// sample's fm_coef; kXt / kV say which upstream gradients exist (absent ones are null, never read).
template <typename scalar_t, typename acc_t, int V, bool kXt, bool kV>
__global__ void fm_noise_backward_kernel(const scalar_t* __restrict__ gxt, const scalar_t* __restrict__ gv,
                                         const acc_t* __restrict__ t, acc_t sigma_min, scalar_t* __restrict__ gx,
                                         scalar_t* __restrict__ ge, int64_t B, int64_t N) {
  const int64_t npack = N / V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const auto c = math::fm_coef<acc_t>(t[b], sigma_min);
    const int64_t base = b * N;
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      const int64_t o = base + i * V;
      Pack<scalar_t, V> av, gvv, gxv, gev;
      if constexpr (kXt) av = load_pack<V>(gxt + o);
      if constexpr (kV) gvv = load_pack<V>(gv + o);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t a = kXt ? static_cast<acc_t>(av.v[k]) : acc_t(0);
        const acc_t g = kV ? static_cast<acc_t>(gvv.v[k]) : acc_t(0);
        gxv.v[k] = static_cast<scalar_t>(math::fm_grad_x<kXt, kV>(a, g, c));
        gev.v[k] = static_cast<scalar_t>(math::fm_grad_noise<kXt, kV>(a, g, c));
      }
      store_pack<V>(gx + o, gxv);
      store_pack<V>(ge + o, gev);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> fm_noise_backward_cuda(const std::optional<at::Tensor>& grad_xt,
                                                          const std::optional<at::Tensor>& grad_v, const at::Tensor& t,
                                                          double sigma_min) {
  constexpr const char* op = "fm_noise_backward";
  const at::Tensor& like = check_fm_noise_backward(grad_xt, grad_v, t);
  const bool has_xt = grad_xt.has_value() && grad_xt->defined(), has_v = grad_v.has_value() && grad_v->defined();
  check_is_cuda(like, op, has_xt ? "grad_xt" : "grad_v");
  check_cuda(t, like, op, "t", has_xt ? "grad_xt" : "grad_v");
  if (has_xt && has_v) check_cuda(*grad_v, *grad_xt, op, "grad_v", "grad_xt");
  check_floating(t, op, "t");

  c10::cuda::CUDAGuard guard(like.device());
  const auto fmt = preferred_format(like);
  const auto a = has_xt ? grad_xt->contiguous(fmt) : at::Tensor();
  const auto g = has_v ? grad_v->contiguous(fmt) : at::Tensor();
  auto grad_x = at::empty(like.sizes(), like.options().memory_format(fmt));
  auto grad_noise = at::empty(like.sizes(), like.options().memory_format(fmt));
  const int64_t B = like.size(0), N = like.numel() / B;
  if (N == 0) return {grad_x, grad_noise};
  const auto tc = t.to(opmath_dtype(like.scalar_type())).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "fm_noise_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = has_xt ? a.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = has_v ? g.const_data_ptr<scalar_t>() : nullptr;
    const bool packed = packable<scalar_t>(N, ap, gp, grad_x.const_data_ptr(), grad_noise.const_data_ptr());
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 grid(blocks_per_sample(N / V, B, kEltThreads, 2, 1), std::min(B, kMaxGridY));
      auto run = [&](auto kernel) {
        kernel<<<grid, kEltThreads, 0, stream>>>(ap, gp, tc.const_data_ptr<acc_t>(), static_cast<acc_t>(sigma_min),
                                                 grad_x.mutable_data_ptr<scalar_t>(),
                                                 grad_noise.mutable_data_ptr<scalar_t>(), B, N);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (ap && gp) run(fm_noise_backward_kernel<scalar_t, acc_t, V, true, true>);
      else if (ap) run(fm_noise_backward_kernel<scalar_t, acc_t, V, true, false>);
      else run(fm_noise_backward_kernel<scalar_t, acc_t, V, false, true>);
    };
    with_pack_width<scalar_t>(packed, launch);
  });
  return {grad_x, grad_noise};
}

// ---- fm_loss ---------------------------------------------------------------------------------------
// Deterministic two-stage reduction (no atomics): stage 1 writes one partial sum per
// (sample, chunk) block, stage 2 adds a sample's partials in a fixed order. The number of chunks
// depends only on (B, N, SM count), so results repeat exactly on a given GPU model.
constexpr int kLossThreads = 256;

// Stage 1. Launch: grid (chunks, min(B, 65535)), block 256. Block (j, b) sums (p - y)^2 over the
// packs j*256 + tid, stepping by chunks*256, of sample b (each thread in acc_t, the block tree in
// double, as the CPU kernel's partial sums). With one chunk it writes the sample's mean directly
// into out[b]; otherwise partial[b * chunks + j] (double).
template <typename scalar_t, typename acc_t, int V>
__global__ void fm_loss_partial_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ y, int64_t B,
                                       int64_t N, double* __restrict__ partial, acc_t* __restrict__ out) {
  __shared__ double sh[kWarp];
  const int64_t npack = N / V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t base = b * N;
    acc_t s = 0;
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      const auto pv = load_pack<V>(p + base + i * V);
      const auto yv = load_pack<V>(y + base + i * V);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t d = static_cast<acc_t>(pv.v[k]) - static_cast<acc_t>(yv.v[k]);
        s += d * d;
      }
    }
    const double total = block_sum(static_cast<double>(s), sh);
    if (threadIdx.x == 0) {
      if (gridDim.x == 1) out[b] = static_cast<acc_t>(total / static_cast<double>(N));
      else partial[b * gridDim.x + blockIdx.x] = total;
    }
  }
}

// Stage 2. Launch: grid (min(B, 65535)), block 256. Thread i adds partials i, i + 256, ... of
// sample b, then a fixed block tree, all in double; out[b] = total / N.
template <typename acc_t>
__global__ void fm_loss_finish_kernel(const double* __restrict__ partial, int64_t B, int64_t chunks, int64_t N,
                                      acc_t* __restrict__ out) {
  __shared__ double sh[kWarp];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    double s = 0;
    for (int64_t j = threadIdx.x; j < chunks; j += blockDim.x) s += partial[b * chunks + j];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[b] = static_cast<acc_t>(s / static_cast<double>(N));
  }
}

at::Tensor fm_loss_cuda(const at::Tensor& pred, const at::Tensor& target) {
  constexpr const char* op = "fm_loss";
  check_floating(pred, op, "pred");
  check_is_cuda(pred, op, "pred");
  check_cuda(target, pred, op, "target", "pred");
  TORCH_CHECK(target.scalar_type() == pred.scalar_type(), op, ": target dtype ", target.scalar_type(),
              " != pred dtype ", pred.scalar_type());
  TORCH_CHECK(pred.dim() >= 1 && pred.size(0) > 0, op, ": pred must have a non-empty batch dimension, got shape ",
              pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": pred ", pred.sizes(), " and target ", target.sizes(),
              " differ in shape");

  c10::cuda::CUDAGuard guard(pred.device());
  const auto fmt = preferred_format(pred);  // as the CPU op
  const auto pc = pred.contiguous(fmt), yc = target.contiguous(fmt);
  const int64_t B = pc.size(0), N = pc.numel() / B;
  const auto acc_dtype = opmath_dtype(pred.scalar_type());
  auto loss = at::empty({B}, pc.options().dtype(acc_dtype));
  if (N == 0) return loss.zero_();  // like the CPU kernel: no elements, zero loss
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "fm_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool packed = packable<scalar_t>(N, pc.const_data_ptr(), yc.const_data_ptr());
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t chunks = blocks_per_sample(N / V, B, kLossThreads, 4, 1);
      at::Tensor partial;
      if (chunks > 1) partial = at::empty({B * chunks}, pc.options().dtype(at::kDouble));
      const dim3 grid(chunks, std::min(B, kMaxGridY));
      fm_loss_partial_kernel<scalar_t, acc_t, V><<<grid, kLossThreads, 0, stream>>>(
          pc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), B, N,
          chunks > 1 ? partial.mutable_data_ptr<double>() : nullptr, loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (chunks > 1) {
        fm_loss_finish_kernel<acc_t><<<std::min(B, kMaxGridY), kLossThreads, 0, stream>>>(
            partial.const_data_ptr<double>(), B, chunks, N, loss.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    with_pack_width<scalar_t>(packed, launch);
  });
  return loss;
}

// ---- fm_loss_backward --------------------------------------------------------------------------------
// Launch: grid (bx, min(B, 65535)), block 256, grid-stride over the packs of sample b like
// fm_noise: grad_pred = mse_grad(p, y, 2 g[b] / N).
template <typename scalar_t, typename acc_t, int V>
__global__ void fm_loss_backward_kernel(const acc_t* __restrict__ g, const scalar_t* __restrict__ p,
                                        const scalar_t* __restrict__ y, scalar_t* __restrict__ out, int64_t B,
                                        int64_t N) {
  const int64_t npack = N / V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const acc_t k = static_cast<acc_t>(2.0 * static_cast<double>(g[b]) / static_cast<double>(N));  // as the CPU op
    const int64_t base = b * N;
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      const int64_t o = base + i * V;
      const auto pv = load_pack<V>(p + o);
      const auto yv = load_pack<V>(y + o);
      Pack<scalar_t, V> r;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        r.v[j] = static_cast<scalar_t>(math::mse_grad(static_cast<acc_t>(pv.v[j]), static_cast<acc_t>(yv.v[j]), k));
      }
      store_pack<V>(out + o, r);
    }
  }
}

at::Tensor fm_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target) {
  constexpr const char* op = "fm_loss_backward";
  check_floating(pred, op, "pred");
  check_is_cuda(pred, op, "pred");
  check_cuda(target, pred, op, "target", "pred");
  check_cuda(grad, pred, op, "grad", "pred");
  check_floating(grad, op, "grad");
  TORCH_CHECK(pred.dim() >= 1 && pred.size(0) > 0, op, ": pred must have a non-empty batch dimension, got shape ",
              pred.sizes());
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == pred.size(0), op, ": grad must have shape (", pred.size(0),
              "), got ", grad.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes() && target.scalar_type() == pred.scalar_type(), op,
              ": pred and target must match in shape and dtype, got ", pred.sizes(), " ", pred.scalar_type(), " and ",
              target.sizes(), " ", target.scalar_type());

  c10::cuda::CUDAGuard guard(pred.device());
  const auto fmt = preferred_format(pred);  // as the CPU op
  const auto pc = pred.contiguous(fmt), yc = target.contiguous(fmt);
  auto out = at::empty_like(pc);
  const int64_t B = pc.size(0), N = pc.numel() / B;
  if (N == 0) return out;
  const auto gc = grad.to(opmath_dtype(pred.scalar_type())).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "fm_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool packed = packable<scalar_t>(N, pc.const_data_ptr(), yc.const_data_ptr(), out.const_data_ptr());
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 grid(blocks_per_sample(N / V, B, kEltThreads, 2, 1), std::min(B, kMaxGridY));
      fm_loss_backward_kernel<scalar_t, acc_t, V><<<grid, kEltThreads, 0, stream>>>(
          gc.const_data_ptr<acc_t>(), pc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), B, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_pack_width<scalar_t>(packed, launch);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, CUDA, m) {
  m.impl("fm_noise", &fm_noise_cuda);
  m.impl("fm_noise_backward", &fm_noise_backward_cuda);
  m.impl("fm_loss", &fm_loss_cuda);
  m.impl("fm_loss_backward", &fm_loss_backward_cuda);
}

}  // namespace dito_fast
