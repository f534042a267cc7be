// Per-element math shared by the CPU (C++) and CUDA kernels of dito_fast's fused ops.
//
// Every formula a kernel evaluates lives here once, as a C10_HOST_DEVICE template, so the CPU
// tests exercise the same code the GPU runs. T is float/double on both sides; on the CPU it is
// also at::vec::Vectorized<float|double> (the overloads of exp_ below make that work).
// CUDA-only helpers (vector packs, block reductions, grid sizing) are in dito_fast/cuda_utils.cuh.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

namespace dito_fast {
namespace math {

// ---- exp for every T the kernels use ---------------------------------------------------------
C10_HOST_DEVICE inline float exp_(float a) {
#if defined(__CUDA_ARCH__)
  return __expf(a);
#else
  return std::exp(a);
#endif
}
C10_HOST_DEVICE inline double exp_(double a) { return ::exp(a); }
#if !defined(__CUDACC__)
template <typename S>
inline at::vec::Vectorized<S> exp_(const at::vec::Vectorized<S>& a) { return a.exp_u20(); }
// float, vectorised: callers get exp(a) for a in [-87, 87] to a few 1e-7 relative error in the
// range that matters (below) and, outside, the value at the nearer end (exp(-87) = 1.6e-38, still
// normal; exp(87) = 6e37, whose reciprocal is still normal). A NaN stays NaN on AVX2; on AVX-512
// vrangeps returns the bound for it (measured on an AMD EPYC, Zen 4), so exp(NaN) is finite there,
// and silu and silu' (sigmoid's only callers) are still NaN, a NaN factor in each
// (tests/cpp/vec_test.cpp checks both). sigmoid needs nothing more, and the clamp saves the masks
// and special cases of ATen's exp_u20.
// The two instruction sets reduce the argument differently:
// - AVX-512: exp(a) = 2^t with t = a log2 e, split as 2^floor(t) 2^f: vreduceps gives f = t -
//   floor(t) in [0, 1) and vscalefps multiplies by 2^floor(t) (both one instruction), 2^f is a
//   degree-5 near-minimax polynomial (9e-8 relative error on [0, 1), fitted here), evaluated by
//   Estrin's scheme. t = a log2 e is rounded to float, an absolute error of up to |t| 6e-8 that
//   becomes the relative error of 2^t (with log2 e's own rounding, up to ~7.3e-8 |a|): within
//   2.5e-7 + 7.5e-8 |a| in all, 1e-6 at |a| = 10, 6.8e-6 at the clamp (tests/cpp/vec_test.cpp; the
//   largest error of its sweep is 0.94 of that bound). sigmoid's relative
//   error is that times exp(-a) / (1 + exp(-a)), so it reaches 1e-6 only where a < -12 and
//   silu(a) = a sigmoid(a) is below 1e-4 in magnitude. On the development machine (Xeon) SiLU's
//   cost per vector tracks its count of 512-bit instructions: with a correction term carried
//   into f for t's rounding (3 more instructions) and Horner's scheme it measured 1.16-1.41x
//   slower per vector than this (a standalone loop over cached data, 2026-12-02).
// - AVX2 (no vreduceps/vscalefps): exp(a) = 2^n e^r with n = round(a log2 e), r = a - n ln2 (ln2
//   in two parts, so r is exact to float rounding for |n| <= 128), e^r a degree-5 near-minimax
//   polynomial on |r| <= ln2/2 (1.6e-7 relative error), 2^n placed in the exponent field (n fits
//   it, a being clamped). n comes from adding 1.5 2^23 (whose float sum rounds to an integer and
//   holds n in its low mantissa bits, which shift straight into the exponent field) instead of a
//   round and a conversion; the sign is folded into the constants as on AVX-512 (no negation);
//   the polynomial is evaluated by Estrin's scheme. Those shorten the chain of dependent
//   instructions per vector, which bounds this code on the AMD EPYC (Zen 3) machine: a loop of
//   SiLU' over cached data (the backward's pass 1) took 14.2-16.9 cycles per vector against
//   16.9-19.1 with a round, a conversion and Horner's scheme (2026-12-02).
#if defined(CPU_CAPABILITY_AVX512)
namespace detail {
constexpr float kLog2e = 1.44269504f;
// 2^f on [0, 1): c0 + c1 f + ... + c5 f^5
constexpr float kExp2C0 = 0.99999994f, kExp2C1 = 0.693153083f, kExp2C2 = 0.240153611f, kExp2C3 = 0.0558263175f,
                kExp2C4 = 0.00898934063f, kExp2C5 = 0.00187757658f;

// exp(s a) for s = +-1 (the sign folded into log2 e, which saves sigmoid a negation).
inline __m512 exp_signed(__m512 a, float s) {
  // vrangeps, min-abs with a's sign: clamp(a, -87, 87) (a NaN gives +-87: see above).
  const __m512 x = _mm512_range_ps(a, _mm512_set1_ps(87.f), 0x02);
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(s * kLog2e));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f2 = _mm512_mul_ps(f, f);
  const __m512 p01 = _mm512_fmadd_ps(_mm512_set1_ps(kExp2C1), f, _mm512_set1_ps(kExp2C0));
  const __m512 p23 = _mm512_fmadd_ps(_mm512_set1_ps(kExp2C3), f, _mm512_set1_ps(kExp2C2));
  const __m512 p45 = _mm512_fmadd_ps(_mm512_set1_ps(kExp2C5), f, _mm512_set1_ps(kExp2C4));
  const __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(p45, f2, p23), f2, p01);
  return _mm512_scalef_ps(p, t);  // p 2^floor(t)
}
}  // namespace detail

template <>
inline at::vec::Vectorized<float> exp_(const at::vec::Vectorized<float>& a) { return detail::exp_signed(a, 1.f); }
#elif defined(CPU_CAPABILITY_AVX2)
namespace detail {
constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f, kRound = 12582912.f;  // 1.5 2^23
// e^r on |r| <= ln2/2: 1 + c1 r + ... + c5 r^5
constexpr float kExpC1 = 0.999999702f, kExpC2 = 0.499991506f, kExpC3 = 0.166676357f, kExpC4 = 0.0418979302f,
                kExpC5 = 0.00829031225f;

// exp(s a) for s = +-1.
inline __m256 exp_signed(__m256 a, float s) {
  // [-87, 87]; NaN stays NaN (max/min return their second operand when one is NaN).
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(87.f), _mm256_max_ps(_mm256_set1_ps(-87.f), a));
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(s * kLog2e), _mm256_set1_ps(kRound));  // kRound + n
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kRound));
  // q = x - s n ln2, so s x = n ln2 + s q: the polynomial in s q is one in q with c_k s^k.
  __m256 q = _mm256_fmadd_ps(n, _mm256_set1_ps(-s * kLn2Hi), x);
  q = _mm256_fmadd_ps(n, _mm256_set1_ps(-s * kLn2Lo), q);
  const __m256 q2 = _mm256_mul_ps(q, q);
  const __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(s * kExpC1), q, _mm256_set1_ps(1.f));
  const __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(s * kExpC3), q, _mm256_set1_ps(kExpC2));
  const __m256 p45 = _mm256_fmadd_ps(_mm256_set1_ps(s * kExpC5), q, _mm256_set1_ps(kExpC4));
  const __m256 p = _mm256_fmadd_ps(_mm256_fmadd_ps(p45, q2, p23), q2, p01);
  // 2^n in the exponent field: t's low bits hold n (two's complement), the bits above shift out.
  // A NaN lane of p stays NaN whatever the bits give.
  const __m256i e = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23), _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
}  // namespace detail

template <>
inline at::vec::Vectorized<float> exp_(const at::vec::Vectorized<float>& a) { return detail::exp_signed(a, 1.f); }
#endif
#endif

// ---- flow matching (DESIGN.md §1; s = sigma_min) ---------------------------------------------
// x_t = (1 - t) x + (s + t (1 - s)) e ;  v = dx_t/dt = (1 - s) e - x
// The per-sample coefficients are computed once per sample in the accumulation type.
template <typename A>
struct FmCoef {
  A keep;   // 1 - t
  A sigma;  // s + t (1 - s)
  A vnoise; // 1 - s
};

template <typename A>
C10_HOST_DEVICE inline FmCoef<A> fm_coef(A t, A sigma_min) {
  return {A(1) - t, sigma_min + t * (A(1) - sigma_min), A(1) - sigma_min};
}

template <typename T, typename A>
C10_HOST_DEVICE inline T fm_xt(T x, T e, const FmCoef<A>& c) { return x * T(c.keep) + e * T(c.sigma); }

template <typename T, typename A>
C10_HOST_DEVICE inline T fm_v(T x, T e, const FmCoef<A>& c) { return e * T(c.vnoise) - x; }

// Backward of (x_t, v) with upstream gradients gxt, gv (an absent one counts as zero; the kernels
// instantiate the three cases through the flags so that no zeros are read):
//   grad_x = (1 - t) gxt - gv ;  grad_noise = (s + t (1 - s)) gxt + (1 - s) gv
template <bool kXt, bool kV, typename T, typename A>
C10_HOST_DEVICE inline T fm_grad_x(T gxt, T gv, const FmCoef<A>& c) {
  if constexpr (kXt && kV) return gxt * T(c.keep) - gv;
  else if constexpr (kXt) return gxt * T(c.keep);
  else return T(0) - gv;
}

template <bool kXt, bool kV, typename T, typename A>
C10_HOST_DEVICE inline T fm_grad_noise(T gxt, T gv, const FmCoef<A>& c) {
  if constexpr (kXt && kV) return gxt * T(c.sigma) + gv * T(c.vnoise);
  else if constexpr (kXt) return gxt * T(c.sigma);
  else return gv * T(c.vnoise);
}

// d(mean_i (p_i - y_i)^2)/dp_i = 2 (p_i - y_i) / n, times the upstream gradient of that sample.
template <typename T>
C10_HOST_DEVICE inline T mse_grad(T p, T y, T two_g_over_n) { return (p - y) * two_g_over_n; }

// ---- exp(-a): sigmoid's argument -------------------------------------------------------------
template <typename T>
C10_HOST_DEVICE inline T exp_neg_(T a) { return exp_(T(0) - a); }
#if !defined(__CUDACC__) && (defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2))
template <>
inline at::vec::Vectorized<float> exp_neg_(at::vec::Vectorized<float> a) { return detail::exp_signed(a, -1.f); }
#endif

// ---- reciprocal for every T --------------------------------------------------------------
C10_HOST_DEVICE inline float recip_(float a) { return 1.0f / a; }
C10_HOST_DEVICE inline double recip_(double a) { return 1.0 / a; }
#if !defined(__CUDACC__)
template <typename S>
inline at::vec::Vectorized<S> recip_(const at::vec::Vectorized<S>& a) { return at::vec::Vectorized<S>(S(1)) / a; }
// float: the hardware reciprocal estimate refined by one Newton step, r (2 - a r), is accurate to
// ~1e-7 relative (1.1e-7 at most over tests/cpp/vec_test.cpp's sweep of [1, 6e37]; the final
// multiply and FMA round) and several times cheaper than a division (which dominated SiLU's cost here).
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline at::vec::Vectorized<float> recip_(const at::vec::Vectorized<float>& a) {
  const __m512 r = _mm512_rcp14_ps(a);
  return at::vec::Vectorized<float>(_mm512_mul_ps(r, _mm512_fnmadd_ps(a, r, _mm512_set1_ps(2.f))));
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline at::vec::Vectorized<float> recip_(const at::vec::Vectorized<float>& a) {
  // 12 bits (relative error <= 1.5 2^-12); one Newton step, r + r (1 - a r), squares that to
  // ~1.3e-7, about the exp polynomial's error (sigmoid measured to 2.4e-7 relative, as with two steps).
  const __m256 r = _mm256_rcp_ps(a);
  return at::vec::Vectorized<float>(_mm256_fmadd_ps(r, _mm256_fnmadd_ps(a, r, _mm256_set1_ps(1.f)), r));
}
#endif
#endif

// ---- SiLU --------------------------------------------------------------------------------------
// sigmoid(a) = 1 / (1 + exp(-a)). Scalar, double and DEFAULT-capability vectors: exp(-a) = inf
// gives 1 / inf = 0 (a true division). AVX2/AVX-512 float: the clamped exp_ keeps 1 + exp(-a) <=
// 6e37, so the reciprocal estimate stays normal: sigmoid(a) >= 1.6e-38 where the exact value is
// smaller (a < -87), and silu(a) = a sigmoid(a) is then off by at most |a| 1.6e-38, which passes
// 1e-8 only for |a| > 6e29.
template <typename T>
C10_HOST_DEVICE inline T sigmoid(T a) { return recip_(T(1) + exp_neg_(a)); }

template <typename T>
C10_HOST_DEVICE inline T silu(T a) { return a * sigmoid(a); }

// d silu(a) / da = sig(a) (1 + a (1 - sig(a))). With the AVX2/AVX-512 reciprocal estimate (one
// Newton step) sig(a) can sit an ulp below 1 where it should round to 1, and 1 - sig(a) carries
// that ulp times a into the result: silu'(1e4) = 1.0006, silu'(1e6) = 1.06 (the scalar kernels'
// true division gives 1). Forming 1 - sig(a) as exp(-a) sig(a) instead is exact there but made
// the backward kernels 3% slower (dito-S's 8x8 level, 2026-12-03: one more multiply on the FMA
// ports the exp already fills): pre-activations beyond ~1e3 mean a diverging run, so not taken.
template <typename T>
C10_HOST_DEVICE inline T silu_grad(T a) {
  T s = sigmoid(a);
  return s * (T(1) + a * (T(1) - s));
}

// ---- normalisation statistics ------------------------------------------------------------------
// Given sum and sum of squares of n values taken relative to a shift k (the first value of the
// group, which keeps E[x^2] - E[x]^2 from cancelling when |mean| >> std), return mean and
// 1/sqrt(var + eps) with the biased variance, as GroupNorm/LayerNorm define it.
template <typename A>
C10_HOST_DEVICE inline void moments_to_mean_rstd(A shifted_sum, A shifted_sumsq, A n, A k, A eps,
                                                 A& mean, A& rstd) {
  A m = shifted_sum / n;
  A var = shifted_sumsq / n - m * m;
  var = var < A(0) ? A(0) : var;
  mean = m + k;
#if defined(__CUDA_ARCH__)
  rstd = A(1) / sqrt(var + eps);
#else
  rstd = A(1) / std::sqrt(var + eps);
#endif
}

// ---- GroupNorm -> (1 + scale), shift -> SiLU, folded per (sample, channel) ----------------------
// a = ((x - mean) rstd w + b)(1 + s) + sh = x alpha + beta, so the forward is one FMA (+ SiLU)
// per element. w = 1, b = 0, s = 0, sh = 0 when the optional tensor is absent. An infinite
// parameter (w, b, s or sh: a diverged run) makes the channel NaN (x alpha + beta is inf - inf)
// where the unfolded form gives +-inf; finite parameters with a non-finite x agree with it.
template <typename A>
struct GnmsCoef {
  A alpha;
  A beta;
};

template <typename A>
C10_HOST_DEVICE inline GnmsCoef<A> gnms_coef(A mean, A rstd, A w, A b, A s, A sh) {
  A m = A(1) + s;
  return {rstd * w * m, (b - mean * rstd * w) * m + sh};
}

// Backward, per (sample, channel): with xhat = (x - mean) rstd, da = dy * silu'(a) (or dy), and
// the plane sums S1 = sum da, S2 = sum da xhat over H*W:
//   dshift = S1, dscale = w S2 + b S1, dweight += (1 + s) S2, dbias += (1 + s) S1,
//   and dx = rstd (k da - A - xhat B) with k = (1 + s) w and, per group of n = C_g H W values,
//   A = sum_c k_c S1_c / n, B = sum_c k_c S2_c / n.
// So dx = da * (rstd k) + xhat * (-rstd B) + (-rstd A) = da * c1 + x * c2 + c3 with c1 = rstd k
// (the forward fold's alpha, gnms_coef) per channel and c2, c3 the same for every channel of the group:
template <typename A>
struct GnmsGroupGradCoef {
  A c2;  // -rstd^2 B
  A c3;  // rstd (mean rstd B - A)
};

template <typename A>
C10_HOST_DEVICE inline GnmsGroupGradCoef<A> gnms_group_grad_coef(A mean, A rstd, A group_a, A group_b) {
  return {-rstd * rstd * group_b, rstd * (mean * rstd * group_b - group_a)};
}

template <typename A>
struct GnmsGradCoef {
  A c1;  // rstd k
  A c2;
  A c3;
};

template <typename A>
C10_HOST_DEVICE inline GnmsGradCoef<A> gnms_grad_coef(A mean, A rstd, A k, A group_a, A group_b) {
  const auto g = gnms_group_grad_coef(mean, rstd, group_a, group_b);
  return {rstd * k, g.c2, g.c3};
}

}  // namespace math
}  // namespace dito_fast
