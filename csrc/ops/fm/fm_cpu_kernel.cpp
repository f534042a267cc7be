// Flow-matching CPU kernels (compiled once per CPU capability; see cpu_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>

#include <dito_fast/cpu_kernels.h>
#include <dito_fast/cpu_vec.h>
#include <dito_fast/math.h>

#include <vector>

namespace dito_fast {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

// Call fn(b, i0, i1) for the part [i0, i1) of sample b of every sample overlapping [begin, end)
// of the flattened (B, N) index space.
template <typename F>
inline void for_sample_ranges(int64_t begin, int64_t end, int64_t N, const F& fn) {
  while (begin < end) {
    const int64_t b = begin / N, i0 = begin - b * N;
    const int64_t i1 = std::min(N, i0 + (end - begin));
    fn(b, i0, i1);
    begin += i1 - i0;
  }
}

}  // namespace

void fm_noise_kernel(const at::TensorBase& x, const at::TensorBase& noise, const at::TensorBase& t,
                     double sigma_min, const at::TensorBase& x_t, const at::TensorBase& v) {
  const int64_t B = x.size(0), N = x.numel() / std::max<int64_t>(B, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fm_noise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vec<acc_t>::size();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* ep = noise.const_data_ptr<scalar_t>();
    const auto tv = per_sample_doubles(t);
    const double* tp = tv.data();
    scalar_t* xtp = x_t.mutable_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N, kMinParallelValues, [&](int64_t begin, int64_t end) {
      for_sample_ranges(begin, end, N, [&](int64_t b, int64_t i0, int64_t i1) {
        const auto c = math::fm_coef<acc_t>(static_cast<acc_t>(tp[b]), static_cast<acc_t>(sigma_min));
        const int64_t o = b * N;
        int64_t i = i0;
        for (; i + V <= i1; i += V) {
          auto xv = vload<acc_t>(xp + o + i), ev = vload<acc_t>(ep + o + i);
          vstore<acc_t>(xtp + o + i, math::fm_xt(xv, ev, c));
          vstore<acc_t>(vp + o + i, math::fm_v(xv, ev, c));
        }
        for (; i < i1; ++i) {
          acc_t xv = xp[o + i], ev = ep[o + i];
          xtp[o + i] = static_cast<scalar_t>(math::fm_xt(xv, ev, c));
          vp[o + i] = static_cast<scalar_t>(math::fm_v(xv, ev, c));
        }
      });
    });
  });
}

// One of three instantiations (both upstream gradients, only grad_x_t, only grad_v): absent
// gradients are never read (their pointers are null).
template <bool kXt, bool kV, typename scalar_t>
void fm_noise_backward_impl(const scalar_t* gxtp, const scalar_t* gvp, const double* tp, double sigma_min,
                            scalar_t* gxp, scalar_t* gep, int64_t B, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = Vec<acc_t>::size();
  at::parallel_for(0, B * N, kMinParallelValues, [&](int64_t begin, int64_t end) {
    for_sample_ranges(begin, end, N, [&](int64_t b, int64_t i0, int64_t i1) {
      const auto c = math::fm_coef<acc_t>(static_cast<acc_t>(tp[b]), static_cast<acc_t>(sigma_min));
      const int64_t o = b * N;
      int64_t i = i0;
      for (; i + V <= i1; i += V) {
        const Vec<acc_t> a = kXt ? vload<acc_t>(gxtp + o + i) : Vec<acc_t>(0);
        const Vec<acc_t> g = kV ? vload<acc_t>(gvp + o + i) : Vec<acc_t>(0);
        vstore<acc_t>(gxp + o + i, math::fm_grad_x<kXt, kV>(a, g, c));
        vstore<acc_t>(gep + o + i, math::fm_grad_noise<kXt, kV>(a, g, c));
      }
      for (; i < i1; ++i) {
        const acc_t a = kXt ? static_cast<acc_t>(gxtp[o + i]) : acc_t(0);
        const acc_t g = kV ? static_cast<acc_t>(gvp[o + i]) : acc_t(0);
        gxp[o + i] = static_cast<scalar_t>(math::fm_grad_x<kXt, kV>(a, g, c));
        gep[o + i] = static_cast<scalar_t>(math::fm_grad_noise<kXt, kV>(a, g, c));
      }
    });
  });
}

void fm_noise_backward_kernel(const at::TensorBase& grad_xt, const at::TensorBase& grad_v, const at::TensorBase& t,
                              double sigma_min, const at::TensorBase& grad_x, const at::TensorBase& grad_noise) {
  const int64_t B = grad_x.size(0), N = grad_x.numel() / std::max<int64_t>(B, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "fm_noise_backward_cpu", [&] {
    const scalar_t* a = grad_xt.defined() ? grad_xt.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad_v.defined() ? grad_v.const_data_ptr<scalar_t>() : nullptr;
    const auto tv = per_sample_doubles(t);
    const double* tp = tv.data();
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* ge = grad_noise.mutable_data_ptr<scalar_t>();
    if (a && g) fm_noise_backward_impl<true, true>(a, g, tp, sigma_min, gx, ge, B, N);
    else if (a) fm_noise_backward_impl<true, false>(a, g, tp, sigma_min, gx, ge, B, N);
    else fm_noise_backward_impl<false, true>(a, g, tp, sigma_min, gx, ge, B, N);
  });
}

void fm_loss_kernel(const at::TensorBase& pred, const at::TensorBase& target, const at::TensorBase& loss) {
  const int64_t B = pred.size(0), N = pred.numel() / std::max<int64_t>(B, 1);
  // Partial sums per (sample, chunk) so that batch 1 still uses every thread; fixed chunking
  // makes the result independent of the thread count.
  const int64_t chunk = std::max<int64_t>(kMinParallelValues, (N + 63) / 64);
  const int64_t nchunk = (N + chunk - 1) / chunk;
  std::vector<double> partial(B * nchunk, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "fm_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vec<acc_t>::size();
    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
    const scalar_t* yp = target.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * nchunk, grain_for(std::min(chunk, N)), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nchunk, i0 = (task % nchunk) * chunk, i1 = std::min(N, i0 + chunk);
        const scalar_t* p = pp + b * N;
        const scalar_t* y = yp + b * N;
        double s = 0;
        int64_t i = i0;
        while (i < i1) {  // blocks of 256 vectors in acc_t, then into double
          const int64_t bend = std::min(i1, i + 256 * V);
          Vec<acc_t> a(0);
          for (; i + V <= bend; i += V) {
            auto d = vload<acc_t>(p + i) - vload<acc_t>(y + i);
            a = at::vec::fmadd(d, d, a);
          }
          s += hsum(a);
          for (; i < bend; ++i) {
            const double d = static_cast<double>(static_cast<acc_t>(p[i]) - static_cast<acc_t>(y[i]));
            s += d * d;
          }
        }
        partial[task] = s;
      }
    });
  });
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "fm_loss_cpu_out", [&] {
    scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      double s = 0;
      for (int64_t c = 0; c < nchunk; ++c) s += partial[b * nchunk + c];
      lp[b] = static_cast<scalar_t>(N ? s / static_cast<double>(N) : 0.0);
    }
  });
}

void fm_loss_backward_kernel(const at::TensorBase& grad, const at::TensorBase& pred,
                             const at::TensorBase& target, const at::TensorBase& grad_pred) {
  const int64_t B = pred.size(0), N = pred.numel() / std::max<int64_t>(B, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "fm_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vec<acc_t>::size();
    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
    const scalar_t* yp = target.const_data_ptr<scalar_t>();
    const auto gv = per_sample_doubles(grad);
    const double* gp = gv.data();
    scalar_t* op = grad_pred.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N, kMinParallelValues, [&](int64_t begin, int64_t end) {
      for_sample_ranges(begin, end, N, [&](int64_t b, int64_t i0, int64_t i1) {
        const acc_t k = static_cast<acc_t>(2.0 * gp[b] / static_cast<double>(N));
        const Vec<acc_t> kv(k);
        const int64_t o = b * N;
        int64_t i = i0;
        for (; i + V <= i1; i += V) {
          vstore<acc_t>(op + o + i, math::mse_grad(vload<acc_t>(pp + o + i), vload<acc_t>(yp + o + i), kv));
        }
        for (; i < i1; ++i) {
          op[o + i] = static_cast<scalar_t>(math::mse_grad<acc_t>(pp[o + i], yp[o + i], k));
        }
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dito_fast
