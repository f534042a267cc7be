// Vector helpers for the per-capability CPU kernel units (csrc/ops/*/*_cpu_kernel.cpp).
//
// Kernels compute in acc_t = at::opmath_type<scalar_t> (float for float/half/bfloat16, double
// for double) with at::vec::Vectorized<acc_t>; loads and stores convert from/to the storage type.
// Only this header and the kernel units depend on CPU_CAPABILITY.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/TensorBase.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

namespace dito_fast {
namespace cpu {
namespace CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Parallel work below this many values runs inline on the calling thread: waking the other
// threads costs more than they would save. grain_for(values per task) is the at::parallel_for
// grain size that keeps every chunk at least that large.
constexpr int64_t kMinParallelValues = 32768;
inline int64_t grain_for(int64_t values_per_task) {
  return std::max<int64_t>(1, kMinParallelValues / std::max<int64_t>(values_per_task, 1));
}

// Kernels that run a compute-heavy pass over cached data (the second pass of a norm) request the
// lines of the blocks they take next meanwhile, so the memory-bound first pass of those finds them
// in L2 instead of waiting on DRAM: the two overlap rather than alternate. Blocks larger than
// kPrefetchMaxBytes are left to the hardware prefetcher (prefetching them would evict the block
// being worked on from a 1-2 MiB L2).
constexpr int64_t kPrefetchMaxBytes = 256 << 10;
constexpr int64_t kPrefetchMinBytes = 16 << 10;  // how far ahead at least (blocks can be 2 KiB)

// The prefetch offset, in values, for the pass over block k of the equal blocks [.., end) of
// `block` values each that one task runs in order: one block ahead, or kPrefetchMinBytes if that is
// further; 0 where that window would leave the task's blocks (they were requested already) or the
// blocks are too large.
template <typename scalar_t>
inline int64_t prefetch_ahead(int64_t k, int64_t end, int64_t block) {
  if (block * static_cast<int64_t>(sizeof(scalar_t)) > kPrefetchMaxBytes) return 0;
  const int64_t ahead = std::max<int64_t>(block, kPrefetchMinBytes / static_cast<int64_t>(sizeof(scalar_t)));
  return (k + 1) * block + ahead <= end * block ? ahead : 0;
}
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// A kernel's per-call work array (per-channel coefficients, sums) of n values, left uninitialised
// for the parallel tasks to fill: a part the calling thread had zeroed or filled beforehand has to
// come over from that core's cache to the task's core, line by line. The channels_last forward at
// dito-S's 8x8 level took ~10 us longer on 2 threads than on 1 thread with half the batch while its
// arrays were zeroed and filled by the calling thread, and 0.75x its former time once the tasks
// filled their own (warm loops of the raw op, 2026-12-02).
template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
}

// The values of a 1-d floating tensor (any dtype, any stride), in double: per-sample scalars such as
// t or a loss gradient, read directly rather than through a conversion op per call.
inline std::vector<double> per_sample_doubles(const at::TensorBase& t) {
  std::vector<double> out(t.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "per_sample_doubles", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.numel() > 1 ? t.stride(0) : 1;
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[static_cast<int64_t>(i) * stride]);
  });
  return out;
}

// Load Vec<acc_t>::size() values (or the first n, the rest zero) starting at p.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> vload(const scalar_t* p, int64_t n = Vec<acc_t>::size()) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return n == Vec<acc_t>::size() ? Vec<acc_t>::loadu(p) : Vec<acc_t>::loadu(p, n);
  } else {
    alignas(64) acc_t buf[Vec<acc_t>::size()] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
    return Vec<acc_t>::loadu(buf);
  }
}

// Store the first n lanes (all by default) of v at p.
template <typename acc_t, typename scalar_t>
inline void vstore(scalar_t* p, const Vec<acc_t>& v, int64_t n = Vec<acc_t>::size()) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (n == Vec<acc_t>::size()) v.store(p); else v.store(p, n);
  } else {
    alignas(64) acc_t buf[Vec<acc_t>::size()];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  }
}

// Sum of the lanes of v, in double. Pairwise (a tree of independent adds), not a chain: the
// kernels take one per channel plane, so on small planes (8x8) a sequential chain of 16 dependent
// adds cost as much as the plane's arithmetic.
template <typename acc_t>
inline double hsum(const Vec<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 x = v;
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  } else if constexpr (std::is_same_v<acc_t, double>) {
    return _mm512_reduce_add_pd(v);
  }
#endif
  constexpr int64_t V = Vec<acc_t>::size();
  alignas(64) acc_t buf[V];
  v.store(buf);
  double d[V];
  for (int64_t i = 0; i < V; ++i) d[i] = buf[i];
  for (int64_t w = V / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) d[i] += d[i + w];
  return d[0];
}

// The lane sums of n vectors at once: out[j] = sum of v[j]'s lanes, for j < n <= kHsumBatch. For
// kernels that take one sum per small plane (an 8x8 plane is 4 vectors), where a reduction per
// vector, a chain of about a dozen dependent instructions, costs as much as the plane's arithmetic.
// AVX-512 float: one transposing tree over 16 vectors (absent ones zero): pairs of vectors are
// folded into one at every stage (256-bit halves, then 128-bit quarters, then pairs and single
// lanes: 45 instructions), and a final permutation puts the sums in order; the tree adds in float
// (4 roundings more than hsum's double, on sums the kernels form in float anyway). Elsewhere: hsum
// of each vector. Kept out of line: in a build where the compiler inlined it into the NCHW backward
// (which calls it once per 16 sums), that backward ran 1.09-1.19x slower at 16x16 and 32x32 planes,
// its source unchanged (probably the batch's 16 vectors crowding the registers of the per-value
// loop around the call; out of line again, the slowdown went away; 2026-12-02).
constexpr int64_t kHsumBatch = 16;

template <typename acc_t>
C10_NOINLINE void hsum_batch(const Vec<acc_t>* v, int64_t n, double* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    __m512 u[kHsumBatch];
    for (int64_t j = 0; j < kHsumBatch; ++j) u[j] = j < n ? __m512(v[j]) : _mm512_setzero_ps();
    // w[k]: u[2k]'s 8 partial sums in lanes 0-7, u[2k + 1]'s in lanes 8-15
    __m512 w[8];
    for (int k = 0; k < 8; ++k)
      w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0x44),
                           _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0xEE));
    // x[k]: 128-bit quarter q holds u[4k + q]'s 4 partial sums
    __m512 x[4];
    for (int k = 0; k < 4; ++k)
      x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
    // y[m]: quarter q holds 2 partial sums of u[8m + q], then 2 of u[8m + 4 + q]
    __m512 y[2];
    for (int m = 0; m < 2; ++m)
      y[m] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * m], x[2 * m + 1], 0x44),
                           _mm512_shuffle_ps(x[2 * m], x[2 * m + 1], 0xEE));
    // z[4q + j] = sum of u[q + 4j]; the permutation puts sum j in lane j
    const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    alignas(64) float sums[kHsumBatch];
    _mm512_store_ps(sums, _mm512_permutexvar_ps(order, z));
    for (int64_t j = 0; j < n; ++j) out[j] = sums[j];
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) out[j] = hsum(v[j]);
}

// Shifted moments of n values at p: s1 += sum(x - k), s2 += sum((x - k)^2). Vector lanes
// accumulate at most kBlock values each in acc_t before being added in double, which keeps
// float32 sums accurate for planes of any size. Four independent accumulator pairs: one pair is a
// chain of dependent adds (4 cycles each), which made the statistics pass latency-bound.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void shifted_moments(const scalar_t* p, int64_t n, acc_t k, double& s1, double& s2) {
  constexpr int64_t V = Vec<acc_t>::size(), kU = 4;
  constexpr int64_t kBlock = 256 * V;
  const Vec<acc_t> kv(k);
  int64_t i = 0;
  while (i < n) {
    const int64_t end = std::min(n, i + kBlock);
    Vec<acc_t> a1[kU], a2[kU];
    for (int64_t u = 0; u < kU; ++u) a1[u] = a2[u] = Vec<acc_t>(0);
    for (; i + kU * V <= end; i += kU * V)
      for (int64_t u = 0; u < kU; ++u) {
        const Vec<acc_t> d = vload<acc_t>(p + i + u * V) - kv;
        a1[u] = a1[u] + d;
        a2[u] = at::vec::fmadd(d, d, a2[u]);
      }
    for (; i + V <= end; i += V) {
      const Vec<acc_t> d = vload<acc_t>(p + i) - kv;
      a1[0] = a1[0] + d;
      a2[0] = at::vec::fmadd(d, d, a2[0]);
    }
    if (i < end) {  // tail: zero lanes must not contribute (x - k) for absent x
      const int64_t r = end - i;
      const Vec<acc_t> d = Vec<acc_t>::set(Vec<acc_t>(0), vload<acc_t>(p + i, r) - kv, r);
      a1[1] = a1[1] + d;
      a2[1] = at::vec::fmadd(d, d, a2[1]);
      i = end;
    }
    s1 += hsum((a1[0] + a1[1]) + (a1[2] + a1[3]));
    s2 += hsum((a2[0] + a2[1]) + (a2[2] + a2[3]));
  }
}

// Finite values with |x - k| above ~1.8e19 (float32) overflow the lanes' sum of squares: rstd
// would come out 0 and the output silently 0 (or silu of the bias) for a finite input. Where the
// lanes' sums s1, s2 are not finite, the group's values (rows of row_len values, row_stride
// apart) are summed again in double, and those sums replace them when finite; a group holding
// inf or NaN keeps the lanes' sums (its output is not finite, as before). Only that rare path
// pays the extra pass.
template <typename scalar_t>
inline void refine_overflowed_moments(const scalar_t* p, int64_t rows, int64_t row_len, int64_t row_stride, double k,
                                      double& s1, double& s2) {
  if (std::isfinite(s1) && std::isfinite(s2)) return;
  double d1 = 0, d2 = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* q = p + r * row_stride;
    for (int64_t i = 0; i < row_len; ++i) {
      const double d = static_cast<double>(q[i]) - k;
      d1 += d;
      d2 += d * d;
    }
  }
  if (std::isfinite(d1) && std::isfinite(d2)) {
    s1 = d1;
    s2 = d2;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dito_fast
