// CUDA kernels of the affine-free per-sample LayerNorm of the latent (latent_layernorm and its
// backward). A sample's C*H*W values are one dense block in either memory format, so the kernels
// see (B, N) arrays.
//
// Each direction is "two per-sample sums, then an elementwise pass":
//   forward  : shifted sums of z (shift = the sample's first value) -> mean, rstd -> y = (z - mean) rstd
//   backward : sum g, sum g y -> dz = g c1 + y c2 + c3 with c1 = rstd, c2 = -rstd mean(g y),
//              c3 = -rstd mean(g)  (= rstd (g - mean(g) - y mean(g y)))
// When one block per sample fills the GPU (or the sample is small) a single fused kernel does
// both passes, the second read mostly hitting L2. Otherwise a stats kernel writes one partial per
// (sample, chunk) block and the apply kernel's blocks each add their sample's partials in a fixed
// order: deterministic, no atomics. Threads accumulate in acc_t, block and cross-block sums are
// in double, as in the CPU kernels.
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
#include <tuple>
#include <type_traits>

#include <dito_fast/check.h>
#include <dito_fast/cuda_utils.cuh>
#include <dito_fast/math.h>

namespace dito_fast {
namespace {

using namespace cuda;

// ---- forward -----------------------------------------------------------------------------------------

// Stats. Launch: grid (chunks, min(B, 65535)), block T. Block (j, b) accumulates (z - k) and
// (z - k)^2 with k = z[b, 0] over the packs j*T + tid of sample b, stepping by chunks*T, and
// writes partial[(b * chunks + j) * 2 + {0, 1}] (double).
template <typename scalar_t, typename acc_t, int V>
__global__ void ln_stats_kernel(const scalar_t* __restrict__ z, int64_t B, int64_t N, double* __restrict__ partial) {
  __shared__ double sh[2 * kWarp];
  chunked_shifted_sums<acc_t, V>(z, B, N, partial, sh);
}

// Apply. Launch: grid (chunks, min(B, 65535)), block T. Every block of sample b first forms the
// sample's shifted sums: from the chunks partials in index order, or, when partial is null (fused
// path, chunks == 1), by reading the whole sample itself. Then mean/rstd (math::moments_to_mean_rstd),
// block (0, b) stores rstd[b], and the block writes y = (z - mean) rstd over its packs (grid-stride).
template <typename scalar_t, typename acc_t, int V>
__global__ void ln_apply_kernel(const scalar_t* __restrict__ z, const double* __restrict__ partial, int64_t B,
                                int64_t N, double eps, scalar_t* __restrict__ y, acc_t* __restrict__ rstd_out) {
  __shared__ double sh[2 * kWarp];
  const int64_t npack = N / V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const scalar_t* zb = z + b * N;
    const acc_t k = static_cast<acc_t>(zb[0]);
    double d1 = 0, d2 = 0;
    if (partial != nullptr) {
      add_pairs_strided(partial + b * gridDim.x * 2, gridDim.x, d1, d2);
    } else {
      acc_t s1 = 0, s2 = 0;
      shifted_sums<V>(zb, npack, threadIdx.x, blockDim.x, k, s1, s2);
      d1 = s1;
      d2 = s2;
    }
    block_sum2(d1, d2, sh);
    refine_overflowed_sums(zb, 1, N, 0, static_cast<double>(k), d1, d2, sh);
    double mean_d, rstd_d;
    math::moments_to_mean_rstd<double>(d1, d2, static_cast<double>(N), static_cast<double>(k), eps, mean_d, rstd_d);
    const acc_t mean = static_cast<acc_t>(mean_d), rstd = static_cast<acc_t>(rstd_d);
    if (blockIdx.x == 0 && threadIdx.x == 0) rstd_out[b] = rstd;
    scalar_t* yb = y + b * N;
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      const auto zv = load_pack<V>(zb + i * V);
      Pack<scalar_t, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) out.v[q] = static_cast<scalar_t>((static_cast<acc_t>(zv.v[q]) - mean) * rstd);
      store_pack<V>(yb + i * V, out);
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------------

// Stats. Launch: like ln_stats_kernel. Block (j, b) writes partial[(b * chunks + j) * 2 + {0, 1}]
// = (sum g, sum g y) over its packs.
template <typename scalar_t, typename acc_t, int V>
__global__ void ln_bwd_stats_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y, int64_t B,
                                    int64_t N, double* __restrict__ partial) {
  __shared__ double sh[2 * kWarp];
  const int64_t npack = N / V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const scalar_t* gb = g + b * N;
    const scalar_t* yb = y + b * N;
    acc_t s1 = 0, s2 = 0;
    sum_and_dot<V>(gb, yb, npack, grid_stride_first(), grid_stride_step(), s1, s2);
    block_sum2_store(s1, s2, sh, partial + (b * gridDim.x + blockIdx.x) * 2);
  }
}

// Apply. Launch: like ln_apply_kernel (partial null = fused, chunks == 1). dz = g c1 + y c2 + c3.
template <typename scalar_t, typename acc_t, int V>
__global__ void ln_bwd_apply_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                    const acc_t* __restrict__ rstd, const double* __restrict__ partial, int64_t B,
                                    int64_t N, scalar_t* __restrict__ dz) {
  __shared__ double sh[2 * kWarp];
  const int64_t npack = N / V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const scalar_t* gb = g + b * N;
    const scalar_t* yb = y + b * N;
    double d1 = 0, d2 = 0;
    if (partial != nullptr) {
      add_pairs_strided(partial + b * gridDim.x * 2, gridDim.x, d1, d2);
    } else {
      acc_t s1 = 0, s2 = 0;
      sum_and_dot<V>(gb, yb, npack, threadIdx.x, blockDim.x, s1, s2);
      d1 = s1;
      d2 = s2;
    }
    block_sum2(d1, d2, sh);
    const acc_t r = rstd[b];
    const acc_t c1 = r;
    const acc_t c2 = static_cast<acc_t>(-static_cast<double>(r) * d2 / static_cast<double>(N));
    const acc_t c3 = static_cast<acc_t>(-static_cast<double>(r) * d1 / static_cast<double>(N));
    scalar_t* ob = dz + b * N;
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      const auto gv = load_pack<V>(gb + i * V);
      const auto yv = load_pack<V>(yb + i * V);
      Pack<scalar_t, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) {
        out.v[q] = static_cast<scalar_t>(static_cast<acc_t>(yv.v[q]) * c2 + (static_cast<acc_t>(gv.v[q]) * c1 + c3));
      }
      store_pack<V>(ob + i * V, out);
    }
  }
}

// ---- host wrappers ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> latent_layernorm_cuda(const at::Tensor& z, double eps) {
  constexpr const char* op = "latent_layernorm";
  check_floating(z, op, "z");
  check_is_cuda(z, op, "z");
  TORCH_CHECK(z.dim() == 4, op, ": z must be (B, C, H, W), got shape ", z.sizes());
  TORCH_CHECK(z.size(0) > 0 && z.numel() > 0, op, ": z is empty, shape ", z.sizes());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);

  c10::cuda::CUDAGuard guard(z.device());
  const auto zc = z.contiguous(preferred_format(z));  // a sample is one dense block either way
  auto y = at::empty_like(zc);
  const int64_t B = zc.size(0), N = zc.numel() / B;
  auto rstd = at::empty({B}, zc.options().dtype(opmath_dtype(z.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "latent_layernorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool packed = packable<scalar_t>(N, zc.const_data_ptr(), y.const_data_ptr());
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const ReducePlan plan = plan_reduce(N / V, B);
      const dim3 grid(plan.chunks, std::min(B, kMaxGridY));
      at::Tensor partial;
      if (plan.chunks > 1) {
        partial = at::empty({B * plan.chunks * 2}, zc.options().dtype(at::kDouble));
        ln_stats_kernel<scalar_t, acc_t, V><<<grid, plan.threads, 0, stream>>>(
            zc.const_data_ptr<scalar_t>(), B, N, partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      ln_apply_kernel<scalar_t, acc_t, V><<<grid, plan.threads, 0, stream>>>(
          zc.const_data_ptr<scalar_t>(), plan.chunks > 1 ? partial.const_data_ptr<double>() : nullptr, B, N, eps,
          y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_pack_width<scalar_t>(packed, launch);
  });
  return {y, rstd};
}

at::Tensor latent_layernorm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rstd) {
  constexpr const char* op = "latent_layernorm_backward";
  check_floating(y, op, "y");
  check_floating(grad_y, op, "grad_y");
  check_floating(rstd, op, "rstd");
  check_is_cuda(y, op, "y");
  check_is_cuda(grad_y, op, "grad_y");
  check_is_cuda(rstd, op, "rstd");
  check_same_device(grad_y, y, op, "grad_y", "y");
  check_same_device(rstd, y, op, "rstd", "y");
  TORCH_CHECK(y.dim() == 4, op, ": y must be (B, C, H, W), got shape ", y.sizes());
  TORCH_CHECK(y.size(0) > 0 && y.numel() > 0, op, ": y is empty, shape ", y.sizes());
  TORCH_CHECK(grad_y.sizes() == y.sizes(), op, ": grad_y ", grad_y.sizes(), " and y ", y.sizes(), " differ in shape");
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == y.size(0), op, ": rstd must have shape (", y.size(0), "), got ",
              rstd.sizes());

  c10::cuda::CUDAGuard guard(y.device());
  const auto fmt = preferred_format(y);
  const auto yc = y.contiguous(fmt);
  const auto gc = grad_y.to(y.scalar_type()).contiguous(fmt);
  const auto rc = rstd.to(opmath_dtype(y.scalar_type())).contiguous();
  auto dz = at::empty_like(yc);
  const int64_t B = yc.size(0), N = yc.numel() / B;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "latent_layernorm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool packed = packable<scalar_t>(N, yc.const_data_ptr(), gc.const_data_ptr(), dz.const_data_ptr());
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const ReducePlan plan = plan_reduce(N / V, B);
      const dim3 grid(plan.chunks, std::min(B, kMaxGridY));
      at::Tensor partial;
      if (plan.chunks > 1) {
        partial = at::empty({B * plan.chunks * 2}, yc.options().dtype(at::kDouble));
        ln_bwd_stats_kernel<scalar_t, acc_t, V><<<grid, plan.threads, 0, stream>>>(
            gc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), B, N, partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      ln_bwd_apply_kernel<scalar_t, acc_t, V><<<grid, plan.threads, 0, stream>>>(
          gc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), rc.const_data_ptr<acc_t>(),
          plan.chunks > 1 ? partial.const_data_ptr<double>() : nullptr, B, N, dz.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_pack_width<scalar_t>(packed, launch);
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, CUDA, m) {
  m.impl("latent_layernorm", &latent_layernorm_cuda);
  m.impl("latent_layernorm_backward", &latent_layernorm_backward_cuda);
}

}  // namespace dito_fast
