// The scalar formulas of dito_fast/math.h that the CPU and CUDA kernels share, in double: the
// folded GroupNorm -> modulation forward and its gradient coefficients against the unfolded
// definition and central differences, the statistics, the flow-matching coefficients.
#include "harness.h"

#include <dito_fast/math.h>

#include <cmath>
#include <random>
#include <vector>

namespace {

namespace math = dito_fast::math;

double silu(double a) { return a / (1.0 + std::exp(-a)); }

// One group of one sample: C channels of n values each, their per-channel parameters, the output
// silu(((x - mean) rstd w + b)(1 + s) + sh) and L = sum dy * out.
struct Group {
  int C, n;
  std::vector<double> x, dy, w, b, s, sh;
  double eps = 1e-5;

  double mean() const {
    double m = 0;
    for (double v : x) m += v;
    return m / x.size();
  }
  double rstd() const {
    const double m = mean();
    double var = 0;
    for (double v : x) var += (v - m) * (v - m);
    return 1.0 / std::sqrt(var / x.size() + eps);
  }
  double loss() const {
    const double m = mean(), r = rstd();
    double l = 0;
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < n; ++i) l += dy[c * n + i] * silu(((x[c * n + i] - m) * r * w[c] + b[c]) * (1 + s[c]) + sh[c]);
    return l;
  }
};

Group random_group(int C, int n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  Group g{C, n, {}, {}, {}, {}, {}, {}};
  for (int i = 0; i < C * n; ++i) g.x.push_back(2.0 + 3.0 * nd(gen)), g.dy.push_back(nd(gen));
  for (int c = 0; c < C; ++c) g.w.push_back(nd(gen)), g.b.push_back(nd(gen)), g.s.push_back(0.3 * nd(gen)), g.sh.push_back(nd(gen));
  return g;
}

// x alpha + beta (gnms_coef) is the unfolded affine map.
DITO_TEST("math", gnms_coef_folds_the_affine_map) {
  const Group g = random_group(5, 7, 3);
  const double m = g.mean(), r = g.rstd();
  for (int c = 0; c < g.C; ++c) {
    const auto k = math::gnms_coef(m, r, g.w[c], g.b[c], g.s[c], g.sh[c]);
    for (int i = 0; i < g.n; ++i) {
      const double x = g.x[c * g.n + i], want = ((x - m) * r * g.w[c] + g.b[c]) * (1 + g.s[c]) + g.sh[c];
      EXPECT(std::abs(x * k.alpha + k.beta - want) <= 1e-12 * (1 + std::abs(want))) << "channel " << c << ", value " << i;
    }
  }
}

// dx = da c1 + x c2 + c3 (gnms_grad_coef, with the per-channel sums S1 = sum da, S2 = sum da xhat
// and the group's A, B as the CPU kernels form them) is the derivative of L: central differences.
DITO_TEST("math", gnms_grad_coef_is_the_derivative) {
  Group g = random_group(3, 6, 4);
  const int N = g.C * g.n;
  const double m = g.mean(), r = g.rstd();
  std::vector<double> da(N), S1(g.C, 0.0), S2(g.C, 0.0);
  for (int c = 0; c < g.C; ++c) {
    const auto k = math::gnms_coef(m, r, g.w[c], g.b[c], g.s[c], g.sh[c]);
    for (int i = 0; i < g.n; ++i) {
      const int j = c * g.n + i;
      da[j] = g.dy[j] * math::silu_grad(g.x[j] * k.alpha + k.beta);
      S1[c] += da[j];
      S2[c] += da[j] * (g.x[j] - m) * r;
    }
  }
  double A = 0, B = 0;
  for (int c = 0; c < g.C; ++c) A += (1 + g.s[c]) * g.w[c] * S1[c], B += (1 + g.s[c]) * g.w[c] * S2[c];
  A /= N, B /= N;
  for (int c = 0; c < g.C; ++c) {
    const auto k = math::gnms_grad_coef(m, r, (1 + g.s[c]) * g.w[c], A, B);
    for (int i = 0; i < g.n; ++i) {
      const int j = c * g.n + i;
      const double dx = da[j] * k.c1 + g.x[j] * k.c2 + k.c3, x0 = g.x[j], h = 1e-5;
      g.x[j] = x0 + h;
      const double lp = g.loss();
      g.x[j] = x0 - h;
      const double lm = g.loss();
      g.x[j] = x0;
      const double fd = (lp - lm) / (2 * h);
      EXPECT(std::abs(dx - fd) <= 1e-6 * (1 + std::abs(fd))) << "x[" << j << "]: " << dx << ", central difference " << fd;
    }
  }
}

// Mean and rstd from shifted sums (any shift), the variance clamped at 0 (a constant group: 1/sqrt(eps)).
DITO_TEST("math", moments_to_mean_rstd) {
  const std::vector<double> x = {1000.25, 1000.5, 999.75, 1001.0};
  for (double k : {0.0, 1000.25, -3.0}) {
    double s1 = 0, s2 = 0;
    for (double v : x) s1 += v - k, s2 += (v - k) * (v - k);
    double mean = 0, rstd = 0;
    math::moments_to_mean_rstd(s1, s2, 4.0, k, 1e-5, mean, rstd);
    EXPECT(std::abs(mean - 1000.375) <= 1e-9) << "shift " << k << ": mean " << mean;
    EXPECT(std::abs(rstd - 1.0 / std::sqrt(0.203125 + 1e-5)) <= 1e-9) << "shift " << k << ": rstd " << rstd;
  }
  double mean = 0, rstd = 0;
  math::moments_to_mean_rstd(0.0, -1e-12, 8.0, 5.0, 1e-5, mean, rstd);  // rounding made the variance negative
  EXPECT(mean == 5.0 && rstd == 1.0 / std::sqrt(1e-5)) << mean << " " << rstd;
}

// x_t, v and their gradients: the definitions of DESIGN.md §1, at t = 0 and 1 too.
DITO_TEST("math", flow_matching) {
  const double s = 1e-5;
  for (double t : {0.0, 0.3, 1.0}) {
    const auto c = math::fm_coef(t, s);
    const double x = 0.7, e = -1.3;
    EXPECT(std::abs(math::fm_xt(x, e, c) - ((1 - t) * x + (s + t * (1 - s)) * e)) <= 1e-15) << "t = " << t;
    EXPECT(std::abs(math::fm_v(x, e, c) - ((1 - s) * e - x)) <= 1e-15) << "t = " << t;
    // d/dt x_t = v
    const double h = 1e-6, dxt = (math::fm_xt(x, e, math::fm_coef(t + h, s)) - math::fm_xt(x, e, math::fm_coef(t - h, s))) / (2 * h);
    EXPECT(std::abs(dxt - math::fm_v(x, e, c)) <= 1e-8) << "t = " << t << ": dx_t/dt " << dxt;
    const double gxt = 0.4, gv = -2.0;
    EXPECT((std::abs(math::fm_grad_x<true, true>(gxt, gv, c) - ((1 - t) * gxt - gv)) <= 1e-15)) << "t = " << t;
    EXPECT((std::abs(math::fm_grad_noise<true, true>(gxt, gv, c) - ((s + t * (1 - s)) * gxt + (1 - s) * gv)) <= 1e-15));
    EXPECT((math::fm_grad_x<true, false>(gxt, gv, c) == math::fm_grad_x<true, true>(gxt, 0.0, c)));
    EXPECT((math::fm_grad_noise<false, true>(gxt, gv, c) == math::fm_grad_noise<true, true>(0.0, gv, c)));
  }
  EXPECT(math::mse_grad(3.0, 1.0, 0.25) == 0.5);
}

}  // namespace
