// The vectorised math (dito_fast/math.h) and vector helpers (dito_fast/cpu_vec.h) of one instruction
// set, against double precision: compiled once per instruction set with the kernels' flags
// (CMakeLists.txt), registered as vec.<CAPABILITY>.<name>, skipped (by main.cpp) where this CPU
// lacks it. The
// Python tests reach this code only through whole kernels, and only for the instruction set the
// process runs; these check each function's documented accuracy and edge cases directly.
#include "harness.h"

#include <dito_fast/cpu_vec.h>
#include <dito_fast/math.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace dito_fast_tests {
namespace CPU_CAPABILITY {
namespace {

using dito_fast::cpu::CPU_CAPABILITY::Vec;
namespace cv = dito_fast::cpu::CPU_CAPABILITY;
namespace math = dito_fast::math;

constexpr const char* kCap = DITO_TEST_STR(CPU_CAPABILITY);
#define VEC_TEST(name) DITO_TEST_IMPL("vec", kCap, name)

// Whether exp_/recip_ of Vectorized<float> are the hand-written AVX2/AVX-512 versions (clamped exp,
// reciprocal estimate) rather than ATen's (exp_u20, a true division).
constexpr bool kFastFloat =
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    true;
#else
    false;
#endif

constexpr int64_t V = Vec<float>::size();

// f applied lane by lane to xs (any count: the last vector is padded with xs' last value).
template <typename F>
std::vector<float> map_vec(const std::vector<float>& xs, F f) {
  std::vector<float> out(xs.size());
  for (size_t i = 0; i < xs.size(); i += V) {
    float buf[V];
    for (int64_t j = 0; j < V; ++j) buf[j] = xs[std::min(xs.size() - 1, i + static_cast<size_t>(j))];
    float res[V];
    f(Vec<float>::loadu(buf)).store(res);
    for (int64_t j = 0; j < V && i + static_cast<size_t>(j) < xs.size(); ++j) out[i + static_cast<size_t>(j)] = res[j];
  }
  return out;
}

// Evenly spaced points of [lo, hi] plus random floats of it.
std::vector<float> sweep(float lo, float hi, int n) {
  std::vector<float> xs;
  for (int i = 0; i <= n; ++i) xs.push_back(lo + (hi - lo) * static_cast<float>(i) / static_cast<float>(n));
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int i = 0; i < n; ++i) xs.push_back(u(gen));
  return xs;
}

double rel(double got, double want) { return std::abs(got - want) / std::abs(want); }

// math.h: exp(a) for a in [-87, 87] to 2.5e-7 + 7.5e-8 |a| relative: t = a log2 e rounded to float
// (2^-24 |a|) with log2 e rounded to float (1.3e-8 |a|), the polynomial and the roundings of its
// evaluation (1e-6 at |a| = 10, 6.8e-6 at the clamp). ATen's exp_u20 is within that too.
VEC_TEST(exp_accuracy) {
  const auto xs = sweep(-87.f, 87.f, 400000);
  const auto got = map_vec(xs, [](const Vec<float>& a) { return math::exp_(a); });
  const auto neg = map_vec(xs, [](const Vec<float>& a) { return math::exp_neg_(a); });
  for (size_t i = 0; i < xs.size(); ++i) {
    const double a = xs[i], bound = 2.5e-7 + 7.5e-8 * std::abs(a);
    EXPECT(rel(got[i], std::exp(a)) <= bound) << "exp(" << a << ") = " << got[i] << ", want " << std::exp(a);
    EXPECT(rel(neg[i], std::exp(-a)) <= bound) << "exp(-" << a << ") = " << neg[i] << ", want " << std::exp(-a);
  }
}

// Beyond [-87, 87] the hand-written exp gives the value at the nearer end (1/(1 + exp) stays
// normal). NaN: silu and silu' (sigmoid's only callers) give NaN on every path; exp itself does on
// AVX2 and DEFAULT, while on AVX-512 vrangeps returns the clamp's bound for a NaN (math.h).
VEC_TEST(clamp_and_nan) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const std::vector<float> xs = {nan, -nan, 87.f, 100.f, 1e30f, inf, -87.f, -100.f, -1e30f, -inf};
  const auto got = map_vec(xs, [](const Vec<float>& a) { return math::exp_(a); });
  const auto si = map_vec(xs, [](const Vec<float>& a) { return math::silu(a); });
  const auto grad = map_vec(xs, [](const Vec<float>& a) { return math::silu_grad(a); });
  for (int i = 0; i < 2; ++i) {
    EXPECT(std::isnan(si[i]) && std::isnan(grad[i])) << "silu(NaN) = " << si[i] << ", silu'(NaN) = " << grad[i];
  }
#if !defined(CPU_CAPABILITY_AVX512)
  EXPECT(std::isnan(got[0]) && std::isnan(got[1])) << "exp(NaN) = " << got[0] << ", " << got[1];
#endif
  if (kFastFloat) {
    for (size_t i = 3; i < 6; ++i) EXPECT(got[i] == got[2]) << "exp(" << xs[i] << ") = " << got[i] << ", exp(87) = " << got[2];
    for (size_t i = 7; i < 10; ++i) EXPECT(got[i] == got[6]) << "exp(" << xs[i] << ") = " << got[i] << ", exp(-87) = " << got[6];
    EXPECT(std::isnormal(got[6]) && std::isnormal(1.f / (1.f + got[2]))) << got[6] << " " << got[2];
  } else {
    EXPECT(got[5] == inf && got[9] == 0.f) << "exp(inf) = " << got[5] << ", exp(-inf) = " << got[9];
  }
}

// The reciprocal over the range sigmoid gives it, [1, 6e37]: an estimate refined by one Newton step
// on AVX-512 and AVX2 (1.1e-7 and 1.2e-7 relative at most over this sweep), a division elsewhere.
VEC_TEST(recip_accuracy) {
  std::vector<float> xs;
  for (int i = 0; i <= 200000; ++i) xs.push_back(std::exp2(static_cast<float>(i) * 125.f / 200000.f));
  const auto got = map_vec(xs, [](const Vec<float>& a) { return math::recip_(a); });
  for (size_t i = 0; i < xs.size(); ++i) {
    EXPECT(rel(got[i], 1.0 / xs[i]) <= 2e-7) << "1/" << xs[i] << " = " << got[i];
  }
}

// sigmoid within 1e-6 relative where a >= -12 (math.h), silu alike, and silu' within 2e-6 of
// |silu'| + 1e-6 (its terms cancel near a = -1.28, where it crosses zero) + 1.2e-7 a: with the
// reciprocal estimate sigmoid can sit an ulp below 1, which 1 - sigmoid carries times a (math.h).
VEC_TEST(sigmoid_silu_accuracy) {
  const auto xs = sweep(-12.f, 87.f, 400000);
  const auto sig = map_vec(xs, [](const Vec<float>& a) { return math::sigmoid(a); });
  const auto si = map_vec(xs, [](const Vec<float>& a) { return math::silu(a); });
  const auto grad = map_vec(xs, [](const Vec<float>& a) { return math::silu_grad(a); });
  for (size_t i = 0; i < xs.size(); ++i) {
    const double a = xs[i], s = 1.0 / (1.0 + std::exp(-a)), g = s * (1.0 + a * (1.0 - s));
    EXPECT(rel(sig[i], s) <= 1e-6) << "sigmoid(" << a << ") = " << sig[i] << ", want " << s;
    if (a != 0) EXPECT(rel(si[i], a * s) <= 1e-6) << "silu(" << a << ") = " << si[i] << ", want " << a * s;
    EXPECT(std::abs(grad[i] - g) <= 2e-6 * std::abs(g) + 1e-6 + 1.2e-7 * std::abs(a)) << "silu'(" << a << ") = " << grad[i] << ", want " << g;
  }
}

// Far out: sigmoid stays in (0, 1], positive and normal below -87 on the hand-written path (math.h),
// and silu' within 1e-6 a of 1 up to a = 1e3 (an ulp of sigmoid below 1, times a: math.h's
// documented drift, 1.0006 at 1e4).
VEC_TEST(sigmoid_tails) {
  const std::vector<float> xs = {-1e6f, -200.f, -88.f, 88.f, 200.f, 1e3f, 1e6f};
  const auto sig = map_vec(xs, [](const Vec<float>& a) { return math::sigmoid(a); });
  const auto grad = map_vec(xs, [](const Vec<float>& a) { return math::silu_grad(a); });
  for (size_t i = 0; i < xs.size(); ++i) {
    EXPECT(sig[i] >= 0.f && sig[i] <= 1.f) << "sigmoid(" << xs[i] << ") = " << sig[i];
    if (xs[i] < 0 && kFastFloat) {
      EXPECT(std::isnormal(sig[i]) && sig[i] < 2e-38f) << "sigmoid(" << xs[i] << ") = " << sig[i];
    }
    if (xs[i] > 0) EXPECT(rel(sig[i], 1.0) <= 1.2e-7) << "sigmoid(" << xs[i] << ") = " << sig[i];
    if (xs[i] > 0 && xs[i] <= 1e3f) EXPECT(std::abs(grad[i] - 1.0) <= 1e-6 * xs[i]) << "silu'(" << xs[i] << ") = " << grad[i];
  }
}

// The vector path against the scalar one (std::exp, a true division), which the CPU kernels' tails
// and the CUDA kernels evaluate: within the vector exp's error bound (exp_accuracy) and two roundings.
VEC_TEST(vector_matches_scalar) {
  const auto xs = sweep(-12.f, 30.f, 100000);
  const auto si = map_vec(xs, [](const Vec<float>& a) { return math::silu(a); });
  for (size_t i = 0; i < xs.size(); ++i) {
    const float want = math::silu(xs[i]);
    const double bound = 3.7e-7 + 7.5e-8 * std::abs(xs[i]);
    EXPECT(std::abs(si[i] - want) <= bound * std::abs(want) + 1e-30) << "silu(" << xs[i] << "): vector " << si[i] << ", scalar " << want;
  }
}

// vload / vstore of the first n values (n = 0..V): the rest loads as zero and is never written;
// half-precision storage converts.
template <typename scalar_t>
void check_partial_load_store() {
  for (int64_t n = 0; n <= V; ++n) {
    scalar_t src[2 * V], dst[2 * V];
    for (int64_t i = 0; i < 2 * V; ++i) {
      src[i] = static_cast<scalar_t>(0.5f * static_cast<float>(i + 1));
      dst[i] = static_cast<scalar_t>(-7.f);
    }
    const Vec<float> v = cv::vload<float>(src, n);
    float lanes[V];
    v.store(lanes);
    for (int64_t i = 0; i < V; ++i) {
      const float want = i < n ? static_cast<float>(src[i]) : 0.f;
      EXPECT(lanes[i] == want) << "n = " << n << ", lane " << i << ": " << lanes[i] << ", want " << want;
    }
    cv::vstore<float>(dst, v, n);
    for (int64_t i = 0; i < 2 * V; ++i) {
      const float want = i < n ? static_cast<float>(src[i]) : -7.f;
      EXPECT(static_cast<float>(dst[i]) == want) << "n = " << n << ", value " << i << ": " << static_cast<float>(dst[i]);
    }
  }
}

VEC_TEST(partial_load_store) {
  check_partial_load_store<float>();
  check_partial_load_store<c10::Half>();
  check_partial_load_store<c10::BFloat16>();
}

// hsum: the lane sum in double; hsum_batch: the sums of n = 0..16 vectors in order (AVX-512 float adds
// in float: 4 roundings, within 4 2^-24 of the sum of magnitudes), nothing written past n.
VEC_TEST(lane_sums) {
  std::mt19937 gen(1);
  std::normal_distribution<float> nd(3.f, 10.f);
  Vec<float> vs[cv::kHsumBatch];
  double want[cv::kHsumBatch], mag[cv::kHsumBatch];
  for (int64_t j = 0; j < cv::kHsumBatch; ++j) {
    float lanes[V];
    want[j] = mag[j] = 0;
    for (int64_t i = 0; i < V; ++i) {
      lanes[i] = nd(gen);
      want[j] += lanes[i];
      mag[j] += std::abs(lanes[i]);
    }
    vs[j] = Vec<float>::loadu(lanes);
    EXPECT(std::abs(cv::hsum(vs[j]) - want[j]) <= 1e-12 * mag[j]) << "hsum " << cv::hsum(vs[j]) << ", want " << want[j];
  }
  for (int64_t n = 0; n <= cv::kHsumBatch; ++n) {
    double out[cv::kHsumBatch + 1];
    for (auto& o : out) o = -1e300;
    cv::hsum_batch(vs, n, out);
    for (int64_t j = 0; j < n; ++j) {
      EXPECT(std::abs(out[j] - want[j]) <= 2.4e-7 * mag[j]) << "n = " << n << ", sum " << j << ": " << out[j] << ", want " << want[j];
    }
    for (int64_t j = n; j <= cv::kHsumBatch; ++j) EXPECT(out[j] == -1e300) << "n = " << n << ": wrote out[" << j << "]";
  }
}

// shifted_moments over counts around the vector width, the 4-vector unroll and the 256-vector block
// (tails must add nothing for absent values: a shift of 300 would show each one), float32 and the
// half-precision types (converted on load), float64.
template <typename scalar_t>
void check_moments(double tol) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::size(), kBlock = 256 * W;
  std::mt19937 gen(2);
  std::normal_distribution<double> nd(300.0, 2.0);
  for (int64_t n : {int64_t(1), W - 1, W, W + 1, 4 * W - 1, 4 * W, 4 * W + 3, kBlock - 1, kBlock, kBlock + 1,
                    3 * kBlock + 5}) {
    std::vector<scalar_t> x(n);
    for (auto& v : x) v = static_cast<scalar_t>(nd(gen));
    const acc_t k = static_cast<acc_t>(x[0]);
    double s1 = 0, s2 = 0, w1 = 0, w2 = 0, m1 = 0, m2 = 0;
    cv::shifted_moments(x.data(), n, k, s1, s2);
    for (const auto& v : x) {
      const double d = static_cast<double>(static_cast<acc_t>(v)) - static_cast<double>(k);
      w1 += d, w2 += d * d, m1 += std::abs(d), m2 += d * d;
    }
    EXPECT(std::abs(s1 - w1) <= tol * m1 + 1e-300) << "n = " << n << ": sum " << s1 << ", want " << w1;
    EXPECT(std::abs(s2 - w2) <= tol * m2 + 1e-300) << "n = " << n << ": sum of squares " << s2 << ", want " << w2;
  }
}

VEC_TEST(shifted_moments) {
  // float lanes add at most 256 values each before the double sum: error < 256 2^-24 of the magnitudes
  check_moments<float>(1.6e-5);
  check_moments<c10::Half>(1.6e-5);
  check_moments<c10::BFloat16>(1.6e-5);
  check_moments<double>(1e-13);
}

// Finite float values whose squares overflow the float lanes are summed again in double; a group
// holding inf keeps the lanes' (non-finite) sums.
VEC_TEST(overflowed_moments_refined) {
  std::vector<float> x(3 * V + 1);
  for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 2 ? 3e19f : -3e19f);
  double s1 = 0, s2 = 0;
  cv::shifted_moments(x.data(), static_cast<int64_t>(x.size()), x[0], s1, s2);
  EXPECT(!std::isfinite(s2)) << "expected the float lanes to overflow, got " << s2;
  cv::refine_overflowed_moments(x.data(), 1, static_cast<int64_t>(x.size()), 0, static_cast<double>(x[0]), s1, s2);
  double w1 = 0, w2 = 0;
  for (float v : x) {
    const double d = static_cast<double>(v) - static_cast<double>(x[0]);
    w1 += d, w2 += d * d;
  }
  EXPECT(s1 == w1 && std::abs(s2 - w2) <= 1e-15 * w2) << "refined " << s1 << ", " << s2 << "; want " << w1 << ", " << w2;
  x[5] = std::numeric_limits<float>::infinity();
  s1 = s2 = 0;
  cv::shifted_moments(x.data(), static_cast<int64_t>(x.size()), x[0], s1, s2);
  cv::refine_overflowed_moments(x.data(), 1, static_cast<int64_t>(x.size()), 0, static_cast<double>(x[0]), s1, s2);
  EXPECT(!std::isfinite(s1) || !std::isfinite(s2)) << "a group with inf got finite sums " << s1 << ", " << s2;
}

// prefetch_ahead: one block ahead or 16 KiB if further, 0 for the last blocks and for blocks over 256 KiB.
VEC_TEST(prefetch_ahead) {
  // 2 KiB float blocks: 16 KiB ahead (8 blocks); block k of 20 prefetches while k + 1 + 8 <= 20
  EXPECT(cv::prefetch_ahead<float>(0, 20, 512) == 4096) << cv::prefetch_ahead<float>(0, 20, 512);
  EXPECT(cv::prefetch_ahead<float>(11, 20, 512) == 4096) << cv::prefetch_ahead<float>(11, 20, 512);
  EXPECT(cv::prefetch_ahead<float>(12, 20, 512) == 0) << cv::prefetch_ahead<float>(12, 20, 512);
  // 64 KiB blocks: one block ahead, not past the end
  EXPECT(cv::prefetch_ahead<float>(0, 2, 16384) == 16384) << cv::prefetch_ahead<float>(0, 2, 16384);
  EXPECT(cv::prefetch_ahead<float>(1, 2, 16384) == 0) << cv::prefetch_ahead<float>(1, 2, 16384);
  // over 256 KiB: left to the hardware
  EXPECT(cv::prefetch_ahead<float>(0, 100, 65537) == 0) << cv::prefetch_ahead<float>(0, 100, 65537);
  EXPECT(cv::prefetch_ahead<double>(0, 100, 32769) == 0) << cv::prefetch_ahead<double>(0, 100, 32769);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace dito_fast_tests
