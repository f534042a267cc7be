// Affine-free per-sample LayerNorm CPU kernels (compiled once per CPU capability).
// Each sample's C*H*W values are one dense block, whatever the memory format, so the kernels
// see (B, N) arrays.
#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>

#include <dito_fast/cpu_kernels.h>
#include <dito_fast/cpu_vec.h>
#include <dito_fast/math.h>

namespace dito_fast {
namespace cpu {
namespace CPU_CAPABILITY {

void latent_layernorm_kernel(const at::TensorBase& z, double eps, const at::TensorBase& y,
                             const at::TensorBase& rstd) {
  const int64_t B = z.size(0), N = z.numel() / std::max<int64_t>(B, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "latent_layernorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vec<acc_t>::size();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain_for(N), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* p = zp + b * N;
        scalar_t* q = yp + b * N;
        const acc_t k = static_cast<acc_t>(p[0]);
        double s1 = 0, s2 = 0;
        shifted_moments(p, N, k, s1, s2);
        refine_overflowed_moments(p, 1, N, 0, static_cast<double>(k), s1, s2);
        double mean, r;
        math::moments_to_mean_rstd<double>(s1, s2, static_cast<double>(N), k, eps, mean, r);
        rp[b] = static_cast<acc_t>(r);
        const Vec<acc_t> mv(static_cast<acc_t>(mean)), rv(static_cast<acc_t>(r));
        int64_t i = 0;
        for (; i + V <= N; i += V) vstore<acc_t>(q + i, (vload<acc_t>(p + i) - mv) * rv);
        if (i < N) vstore<acc_t>(q + i, (vload<acc_t>(p + i, N - i) - mv) * rv, N - i);
      }
    });
  });
}

void latent_layernorm_backward_kernel(const at::TensorBase& grad_y, const at::TensorBase& y,
                                      const at::TensorBase& rstd, const at::TensorBase& grad_z) {
  const int64_t B = y.size(0), N = y.numel() / std::max<int64_t>(B, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "latent_layernorm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vec<acc_t>::size();
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    scalar_t* op = grad_z.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(N), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* g = gp + b * N;
        const scalar_t* yy = yp + b * N;
        scalar_t* o = op + b * N;
        // dz = rstd (g - mean(g) - y mean(g y))
        double sg = 0, sgy = 0;
        int64_t i = 0;
        Vec<acc_t> a1(0), a2(0);
        for (; i + V <= N; i += V) {
          auto gv = vload<acc_t>(g + i);
          a1 = a1 + gv;
          a2 = at::vec::fmadd(gv, vload<acc_t>(yy + i), a2);
        }
        sg = hsum(a1);
        sgy = hsum(a2);
        for (; i < N; ++i) {
          sg += static_cast<acc_t>(g[i]);
          sgy += static_cast<double>(static_cast<acc_t>(g[i])) * static_cast<acc_t>(yy[i]);
        }
        const acc_t r = rp[b], k0 = static_cast<acc_t>(-r * sg / N), ky = static_cast<acc_t>(-r * sgy / N);
        const Vec<acc_t> rv(r), c0(k0), cy(ky);
        i = 0;
        for (; i + V <= N; i += V) {
          vstore<acc_t>(o + i, at::vec::fmadd(vload<acc_t>(yy + i), cy, at::vec::fmadd(vload<acc_t>(g + i), rv, c0)));
        }
        for (; i < N; ++i) {
          o[i] = static_cast<scalar_t>(static_cast<acc_t>(yy[i]) * ky + static_cast<acc_t>(g[i]) * r + k0);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dito_fast
