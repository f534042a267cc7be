// GroupNorm -> (1 + scale), shift -> SiLU: CPU kernels (compiled once per CPU capability).
//
// Forward, per (sample, group): shifted moments -> mean, rstd; then a = x alpha + beta with the
// per-(sample, channel) folded coefficients of math::gnms_coef, y = silu(a).
// Backward recomputes a from x (nothing but mean/rstd is saved): pass 1 forms the per-channel
// sums S1 = sum da, S2 = sum da xhat (keeping da in dx's buffer for fp32/fp64); pass 2 writes
// dx = da c1 + x c2 + c3 (math::gnms_grad_coef).
// Groups far from zero (|mean| rstd > kShiftAbove, see shift_group) run in coordinates shifted by
// their first value k: a = (x - k) alpha' + beta', dx = da c1 + (x - k) c2 + c3' with the
// coefficients of the shifted mean (mean - k).
//
// NCHW: one task per (sample, group); the group's block is read twice, the second time mostly
// from cache (e.g. 4 channels x 64 x 64 fp32 = 64 KiB). channels_last: each row vectorised across
// channels; one task per sample (up to kFusedSampleBytes, read back from cache) when the samples
// are enough for the threads, and otherwise tasks over (sample, chunk of rows) with per-chunk
// partial sums and a second parallel pass (each thread's chunks last first, so it starts on what
// is still in cache). Either layout: the compute-heavy pass (SiLU forward, SiLU' backward) prefetches
// the next block into L2 (cpu_vec.h prefetch_ahead).
#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>

#include <dito_fast/cpu_kernels.h>
#include <dito_fast/cpu_vec.h>
#include <dito_fast/math.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace dito_fast {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

// Optional per-channel / per-(sample, channel) parameters as acc_t arrays (contiguous tensors): the
// tensor's own data when it already has that type, else a converted copy; an absent one reads as
// its default (w 1, b 0, s 0, sh 0).
template <typename acc_t>
class Params {
 public:
  Params(const at::TensorBase& weight, const at::TensorBase& bias, const at::TensorBase& scale,
         const at::TensorBase& shift, int64_t B, int64_t C)
      : w(view(weight, C, acc_t(1), own_[0])),
        b(view(bias, C, acc_t(0), own_[1])),
        s(view(scale, B * C, acc_t(0), own_[2])),
        sh(view(shift, B * C, acc_t(0), own_[3])) {}
  Params(const Params&) = delete;  // the pointers may point into own_
  Params& operator=(const Params&) = delete;

 private:
  std::vector<acc_t> own_[4];

 public:
  const acc_t* const w;   // (C,)
  const acc_t* const b;   // (C,)
  const acc_t* const s;   // (B * C,)
  const acc_t* const sh;  // (B * C,)

 private:
  static const acc_t* view(const at::TensorBase& t, int64_t n, acc_t fill, std::vector<acc_t>& own) {
    if (t.defined() && t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) return t.const_data_ptr<acc_t>();
    if (!t.defined()) {
      own.assign(n, fill);
      return own.data();
    }
    own.resize(n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "gnms_param", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) own[i] = static_cast<acc_t>(p[i]);
    });
    return own.data();
  }
};

template <typename acc_t, bool kSilu>
inline Vec<acc_t> activate(const Vec<acc_t>& a) {
  if constexpr (kSilu) return math::silu(a); else return a;
}

// Backward pass 1 stores da in the dx buffer and pass 2 reads it back instead of recomputing
// SiLU' (an exp and a division per value, the dominant cost): exact when dx has the accumulation
// type; half-precision storage would round da, so those recompute.
template <typename scalar_t, bool kSilu>
constexpr bool kKeepDa = kSilu && std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;

// Values summed in acc_t lanes before the partial sum moves into double (float32 stays accurate
// for planes of any size).
template <typename acc_t>
constexpr int64_t kSumBlock = 256 * Vec<acc_t>::size();

template <typename acc_t, bool kSilu>
inline Vec<acc_t> act_grad(const Vec<acc_t>& a, const Vec<acc_t>& dy) {
  if constexpr (kSilu) return dy * math::silu_grad(a); else return dy;
}

// Folding x alpha + beta makes two terms of size |mean| rstd cancel: an error of about |mean| rstd
// 2^-24 a few times over (at mean 300, std 0.01, 3x PyTorch's own float32 error; a constant group
// has rstd 1/sqrt(eps)). Groups past this ratio are normalised in coordinates shifted by their
// first value k (x - k is exact for values near k, and mean - k is formed in double). Below it the
// error stays under 1e-5 of the output, and the subtraction per value, which cost the large-plane
// kernels 7-10% when applied to every group (2026-12-03), is left out. The forward and the
// backward decide alike, from the saved mean and rstd.
constexpr double kShiftAbove = 16;

template <typename acc_t>
inline bool shift_group(acc_t mean, acc_t rstd) {
  return std::abs(static_cast<double>(mean)) * static_cast<double>(rstd) > kShiftAbove;
}

// body(std::true_type) where shift, else body(std::false_type): two compiled loops.
template <typename Body>
C10_ALWAYS_INLINE void with_shift(bool shift, const Body& body) {
  if (shift) body(std::true_type{}); else body(std::false_type{});
}

template <bool kShift, typename acc_t>
inline Vec<acc_t> shifted(const Vec<acc_t>& x, const Vec<acc_t>& k) {
  if constexpr (kShift) return x - k; else return x;
}

// The folded coefficients (math::gnms_coef) for a group's mean m (less k where shifted): in
// double where the group is shifted, in acc_t where it is not (nothing to gain there, and the
// double arithmetic per channel cost the NCHW backward at dito-S's 8x8 level 8%).
template <bool kShift, typename acc_t>
inline math::GnmsCoef<acc_t> fold(double m, acc_t r, acc_t w, acc_t b, acc_t s, acc_t sh) {
  if constexpr (kShift) {
    const auto cf = math::gnms_coef<double>(m, r, w, b, s, sh);
    return {static_cast<acc_t>(cf.alpha), static_cast<acc_t>(cf.beta)};
  } else {
    return math::gnms_coef<acc_t>(static_cast<acc_t>(m), r, w, b, s, sh);
  }
}

// NCHW forward: groups up to this size are software-pipelined (see forward_nchw). Pipelined, against
// not (2 threads, warm loops of the raw op, old and new builds alternated, 2026-12-02): groups of
// 1 KiB 0.80x the time, 2 KiB (dito-S's 8x8 level) 0.86-0.88x, 4 KiB 0.94x, 8 KiB no change,
// 16 KiB 1.14x.
constexpr int64_t kPipelineMaxBytes = 4 << 10;

template <typename scalar_t, bool kSilu>
void forward_nchw(const scalar_t* x, scalar_t* y, int64_t B, int64_t C, int64_t HW, int64_t G, double eps,
                  const Params<at::opmath_type<scalar_t>>& P, at::opmath_type<scalar_t>* mean_out,
                  at::opmath_type<scalar_t>* rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t Cg = C / G;
  // Small groups are software-pipelined by one group: the next group's statistics are issued
  // before this group's SiLU pass, so their chain of dependent operations (the sums' reduction, a
  // division and a square root) runs while the SiLU pass keeps the vector units busy instead of
  // stalling them between groups. Larger groups compute their statistics first: there the SiLU
  // pass is long enough to hide that chain, and two groups' data would crowd L1.
  const bool pipelined = Cg * HW * static_cast<int64_t>(sizeof(scalar_t)) <= kPipelineMaxBytes;
  std::vector<double> shifted_mean(B * G);  // mean - (first value) in double, for shifted groups
  at::parallel_for(0, B * G, grain_for(Cg * HW), [&](int64_t begin, int64_t end) {
    // Group bg's statistics into mean_out[bg], rstd_out[bg], shifted_mean[bg].
    auto stats = [&](int64_t bg) {
      const scalar_t* xg = x + bg * Cg * HW;  // (b C + g Cg) HW
      const acc_t k = static_cast<acc_t>(xg[0]);
      double s1 = 0, s2 = 0;
      shifted_moments(xg, Cg * HW, k, s1, s2);
      refine_overflowed_moments(xg, 1, Cg * HW, 0, static_cast<double>(k), s1, s2);
      double mean, rstd;
      math::moments_to_mean_rstd<double>(s1, s2, static_cast<double>(Cg * HW), k, eps, mean, rstd);
      mean_out[bg] = static_cast<acc_t>(mean);
      rstd_out[bg] = static_cast<acc_t>(rstd);
      shifted_mean[bg] = mean - static_cast<double>(k);
    };
    if (pipelined) stats(begin);
    for (int64_t bg = begin; bg < end; ++bg) {
      if (!pipelined) stats(bg);
      else if (bg + 1 < end) stats(bg + 1);
      const int64_t b = bg / G, c0 = (bg % G) * Cg;
      const acc_t mean = mean_out[bg], rstd = rstd_out[bg];
      const bool shift = shift_group(mean, rstd);
      const double ms = shift ? shifted_mean[bg] : static_cast<double>(mean);
      const acc_t k = static_cast<acc_t>(x[bg * Cg * HW]);
      // While this group is normalised, lines at least one group ahead come into L2 (prefetch_ahead).
      const int64_t ahead = prefetch_ahead<scalar_t>(bg, end, Cg * HW);
      with_shift(shift, [&](auto S) C10_ALWAYS_INLINE_ATTRIBUTE {
        constexpr bool kShift = decltype(S)::value;
        const Vec<acc_t> kv(k);  // a local (see backward_nchw)
        for (int64_t c = c0; c < c0 + Cg; ++c) {
          const auto cf = fold<kShift>(ms, rstd, P.w[c], P.b[c], P.s[b * C + c], P.sh[b * C + c]);
          const Vec<acc_t> al(cf.alpha), be(cf.beta);
          const int64_t hw = HW;  // a local: the vector stores may alias any memory (see backward_nchw)
          const scalar_t* const xp = x + (b * C + c) * hw;
          const scalar_t* const pf = xp + ahead;
          scalar_t* const yp = y + (b * C + c) * hw;
          int64_t i = 0;
          for (; i + V <= hw; i += V) {
            prefetch_l2(pf + i);
            const auto xv = shifted<kShift>(vload<acc_t>(xp + i), kv);
            vstore<acc_t>(yp + i, activate<acc_t, kSilu>(at::vec::fmadd(xv, al, be)));
          }
          if (i < hw) {
            const auto xv = shifted<kShift>(vload<acc_t>(xp + i, hw - i), kv);
            vstore<acc_t>(yp + i, activate<acc_t, kSilu>(at::vec::fmadd(xv, al, be)), hw - i);
          }
        }
      });
    }
  });
}

// Row chunking for channels_last: rows of C values, tasks over (sample, chunk). A chunk holds an
// eighth of the sample within [16k, 64k] values (so one sample of more than 32k values still
// splits over two threads), at most 256 rows: each lane of a chunk's sums adds up one value per row
// in acc_t, and 256 is what kSumBlock allows the NCHW sums. It depends on the shape only, never on
// the thread count (the sums' order, and so the results, do not change with it); so a sample of
// 128k-512k values has about 8 tasks however many threads there are. Against chunks of ~16k
// values everywhere (warm loops of the op, 2 threads, variants alternated in one process,
// 2026-12-04, with chunks of 65536 / C rows up to 256 then): one 512 x 32 x 32 sample (dito-B's
// 32x32 level; 64k-value chunks either way) 0.95x the forward's time and 0.91x forward+backward,
// the chunks' partial sums and their serial reduction being a quarter as large (interleaved
// benchmark rows did not show the forward+backward gain: benchmarks/RESULTS.md). dito-S's 8x8 and
// 64x64 levels (batch 8) keep the chunks they had.
inline int64_t rows_per_chunk(int64_t HW, int64_t C) {
  const int64_t values = std::clamp<int64_t>(HW * C / 8, 16384, 65536);
  return std::min(HW, std::clamp<int64_t>(values / std::max<int64_t>(C, 1), 1, 256));
}

// Per-channel sums over rows [r0, r1), accumulated in acc_t and added into out1/out2 (double), or
// stored there when !add (the same values as adding them to zeros, without zeroing first):
// accumulate(r, c, n, a1, a2) adds the two terms of channels c..c+n of row r (zero beyond n) into
// the running sums a1, a2 (an FMA where a term is a product). Channels go in blocks of kU vectors
// (then of 4, then one) whose sums stay in registers across the rows (a store-free inner loop);
// fewer blocks means fewer strided passes over the rows. With AVX-512's 32 vector registers the
// forward's light accumulate takes kU = 8 (kForwardBlock: 16 sums in registers): against 4,
// dito-B's 256x256 level (128 channels, one sample) 0.83x the forward's time, other shapes
// 0.97-1.01x; the backward's (SiLU' per value) probably spills registers at 8 (dito-S's 8x8 level
// 1.10x slower forward+backward) and keeps 4 (same measurement as rows_per_chunk's). AVX2 has 16.
template <typename acc_t, int64_t kU, typename RowFn, typename Flush>
inline int64_t channel_blocks(int64_t c0, int64_t r0, int64_t r1, int64_t C, const RowFn& accumulate,
                              const Flush& flush) {
  constexpr int64_t V = Vec<acc_t>::size();
  for (; c0 + kU * V <= C; c0 += kU * V) {
    Vec<acc_t> a1[kU], a2[kU];
    for (int64_t u = 0; u < kU; ++u) a1[u] = a2[u] = Vec<acc_t>(0);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t u = 0; u < kU; ++u) accumulate(r, c0 + u * V, V, a1[u], a2[u]);
    for (int64_t u = 0; u < kU; ++u) flush(a1[u], a2[u], c0 + u * V, V);
  }
  return c0;
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kForwardBlock = 8;
#else
constexpr int64_t kForwardBlock = 4;
#endif

template <typename acc_t, int64_t kU = 4, typename RowFn>
inline void channel_sums(int64_t r0, int64_t r1, int64_t C, double* out1, double* out2, bool add,
                         const RowFn& accumulate) {
  constexpr int64_t V = Vec<acc_t>::size();
  auto flush = [&](const Vec<acc_t>& a1, const Vec<acc_t>& a2, int64_t c, int64_t n) {
    alignas(64) acc_t b1[V], b2[V];
    a1.store(b1);
    a2.store(b2);
    for (int64_t j = 0; j < n; ++j) {
      out1[c + j] = add ? out1[c + j] + b1[j] : static_cast<double>(b1[j]);
      out2[c + j] = add ? out2[c + j] + b2[j] : static_cast<double>(b2[j]);
    }
  };
  int64_t c0 = channel_blocks<acc_t, kU>(0, r0, r1, C, accumulate, flush);
  if constexpr (kU > 4) c0 = channel_blocks<acc_t, 4>(c0, r0, r1, C, accumulate, flush);
  for (int64_t c = c0; c < C; c += V) {
    const int64_t n = std::min<int64_t>(V, C - c);
    Vec<acc_t> a1(0), a2(0);
    for (int64_t r = r0; r < r1; ++r) accumulate(r, c, n, a1, a2);
    flush(a1, a2, c, n);
  }
}

// Channels-last samples up to this size run as one task each (statistics, then the second pass
// reading the sample back from this core's L2) when there are enough samples for the threads;
// larger ones, or fewer samples, split their rows over tasks in two parallel passes.
constexpr int64_t kFusedSampleBytes = 1 << 20;

// The two channels_last passes, shared by the forward and the backward. prepare(b) fills sample b's
// per-channel work arrays before its first pass; sums(b, r0, r1, s1, s2, add, ahead) adds the
// per-channel sums of rows [r0, r1) of sample b into s1, s2 (C each), or stores them there when
// !add (channel_sums); finish(b, s1, s2) turns sample b's sums into its coefficients;
// apply(b, r0, r1, ahead) is the second pass. S1, S2 (B * C, any contents: zeroed here) receive
// every sample's sums, added chunk by chunk in row order on either path. With one task per sample, prepare and the zeroing run in the sample's task, so the
// calling thread does not touch the other tasks' parts first (cpu_vec.h uninitialized).
// ahead: the offset, in values, from the rows at hand to the rows the same thread takes next (0
// when there are none or they are too large to prefetch); the compute-heavy pass prefetches there.
// apply goes through its rows in memory order: on the AMD EPYC (Zen 3) machine, taking each
// chunk's rows last first (meant to start on the rows still in cache) made dito-B's 256x256 level
// (one 32 MiB sample) 1.6x slower in the forward and 1.5x in the backward (6.2 against 3.8 ms,
// 10.2 against 6.8 ms, raw op, 2 threads): the hardware prefetchers did not follow the descending
// rows. Smaller shapes were unchanged (2026-12-02).
template <typename scalar_t, typename Prepare, typename Sums, typename Finish, typename Apply>
void nhwc_passes(int64_t B, int64_t C, int64_t HW, double* S1, double* S2, const Prepare& prepare, const Sums& sums,
                 const Finish& finish, const Apply& apply) {
  const int64_t sample_bytes = HW * C * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t R = rows_per_chunk(HW, C), nchunk = (HW + R - 1) / R;
  if (B >= at::get_num_threads() && sample_bytes <= kFusedSampleBytes) {
    at::parallel_for(0, B, grain_for(HW * C), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t ahead = prefetch_ahead<scalar_t>(b, end, HW * C);
        prepare(b);
        std::fill_n(S1 + b * C, C, 0.0);
        std::fill_n(S2 + b * C, C, 0.0);
        for (int64_t r0 = 0; r0 < HW; r0 += R) sums(b, r0, std::min(HW, r0 + R), S1 + b * C, S2 + b * C, true, ahead);
        finish(b, S1 + b * C, S2 + b * C);
        apply(b, 0, HW, ahead);
      }
    });
    return;
  }
  // Per-chunk partial sums (2 B nchunk C doubles: 512 KiB for one 128 x 256 x 256 sample), each
  // stored whole by its task (no zeroing), in a buffer the calling thread keeps up to 4 MiB:
  // allocated afresh, a block of that size is mmap'd and page-faulted in on every call.
  const size_t n_partial = static_cast<size_t>(2 * B * nchunk * C);
  thread_local std::vector<double> kept;
  std::vector<double> once;
  std::vector<double>& partial = n_partial * sizeof(double) <= (4u << 20) ? kept : once;
  if (partial.size() < n_partial) partial.resize(n_partial);
  double* const p1 = partial.data();
  double* const p2 = p1 + B * nchunk * C;
  for (int64_t b = 0; b < B; ++b) prepare(b);
  std::fill_n(S1, B * C, 0.0);
  std::fill_n(S2, B * C, 0.0);
  at::parallel_for(0, B * nchunk, grain_for(R * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunk, r0 = (task % nchunk) * R, r1 = std::min(HW, r0 + R);
      // the next task's rows follow these in memory, also across samples
      sums(b, r0, r1, p1 + task * C, p2 + task * C, false, task + 1 < end ? (r1 - r0) * C : 0);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t ch = 0; ch < nchunk; ++ch)
      for (int64_t c = 0; c < C; ++c) {
        S1[b * C + c] += p1[(b * nchunk + ch) * C + c];
        S2[b * C + c] += p2[(b * nchunk + ch) * C + c];
      }
    finish(b, S1 + b * C, S2 + b * C);
  }
  // The second pass takes each thread's tasks (the same range as in the first: at::parallel_for
  // splits a range alike every time) last first, so it starts on the rows still in this core's cache.
  const auto first_row = [&](int64_t task) { return (task / nchunk) * HW + (task % nchunk) * R; };
  at::parallel_for(0, B * nchunk, grain_for(R * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = end - 1; task >= begin; --task) {
      const int64_t b = task / nchunk, r0 = (task % nchunk) * R, r1 = std::min(HW, r0 + R);
      apply(b, r0, r1, task > begin ? (first_row(task - 1) - first_row(task)) * C : 0);
    }
  });
}

template <typename scalar_t, bool kSilu>
void forward_nhwc(const scalar_t* x, scalar_t* y, int64_t B, int64_t C, int64_t HW, int64_t G, double eps,
                  const Params<at::opmath_type<scalar_t>>& P, at::opmath_type<scalar_t>* mean_out,
                  at::opmath_type<scalar_t>* rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t Cg = C / G;
  const auto kc = uninitialized<acc_t>(B * C), alpha = uninitialized<acc_t>(B * C), beta = uninitialized<acc_t>(B * C);
  const auto S1 = uninitialized<double>(B * C), S2 = uninitialized<double>(B * C);
  // Shift per channel of sample b: the group's first value (channel c0 of row 0). Looped by group:
  // with a division per channel (c / Cg) this loop took ~10% of dito-S's 8x8 forward.
  auto shifts = [&](int64_t b) {
    for (int64_t c0 = 0; c0 < C; c0 += Cg) std::fill_n(kc.get() + b * C + c0, Cg, static_cast<acc_t>(x[b * HW * C + c0]));
  };
  // Shifted per-channel sums of rows [r0, r1) of sample b, added into s1, s2 (C each).
  auto sums = [&](int64_t b, int64_t r0, int64_t r1, double* s1, double* s2, bool add, int64_t /*ahead: streamed*/) {
    const scalar_t* xb = x + b * HW * C;
    const acc_t* kb = kc.get() + b * C;
    channel_sums<acc_t, kForwardBlock>(r0, r1, C, s1, s2, add, [xb, kb, C](int64_t r, int64_t c, int64_t n, Vec<acc_t>& a1, Vec<acc_t>& a2) {
      Vec<acc_t> d = vload<acc_t>(xb + r * C + c, n) - vload<acc_t>(kb + c, n);
      if (n < V) d = Vec<acc_t>::set(Vec<acc_t>(0), d, n);
      a1 = a1 + d;
      a2 = at::vec::fmadd(d, d, a2);
    });
  };
  // Group statistics and the folded coefficients of sample b from its per-channel sums; the
  // sample's groups are shifted (shift_group) when any of them needs it.
  std::vector<char> shift(B);
  std::vector<double> shifted_mean(B * G);  // mean - k per group, in double
  auto coefs = [&](int64_t b, const double* s1c, const double* s2c) {
    double* const ms = shifted_mean.data() + b * G;
    bool any = false;
    for (int64_t g = 0; g < G; ++g) {
      double s1 = 0, s2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        s1 += s1c[c];
        s2 += s2c[c];
      }
      double mean, rstd;
      const double k = kc[b * C + g * Cg];
      refine_overflowed_moments(x + b * HW * C + g * Cg, HW, Cg, C, k, s1, s2);
      math::moments_to_mean_rstd<double>(s1, s2, static_cast<double>(Cg * HW), k, eps, mean, rstd);
      const acc_t m = mean_out[b * G + g] = static_cast<acc_t>(mean);
      const acc_t r = rstd_out[b * G + g] = static_cast<acc_t>(rstd);
      ms[g] = mean - k;
      any = any || shift_group(m, r);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {  // unshifted (the common case)
        const auto cf = fold<false>(m, r, P.w[c], P.b[c], P.s[b * C + c], P.sh[b * C + c]);
        alpha[b * C + c] = cf.alpha;
        beta[b * C + c] = cf.beta;
      }
    }
    shift[b] = any;
    for (int64_t g = 0; any && g < G; ++g) {  // shifted: every group of the sample, folded again
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const auto cf = fold<true>(ms[g], rstd_out[b * G + g], P.w[c], P.b[c], P.s[b * C + c], P.sh[b * C + c]);
        alpha[b * C + c] = cf.alpha;
        beta[b * C + c] = cf.beta;
      }
    }
  };
  auto normalize = [&](int64_t b, int64_t r0, int64_t r1, int64_t ahead) {
    with_shift(shift[b], [&](auto S) C10_ALWAYS_INLINE_ATTRIBUTE {
      constexpr bool kShift = decltype(S)::value;
      const int64_t nc = C, hw = HW;  // locals: the vector stores may alias any memory
      const acc_t* const al = alpha.get() + b * nc;
      const acc_t* const be = beta.get() + b * nc;
      const acc_t* const kk = kc.get() + b * nc;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* const xp = x + (b * hw + r) * nc;
        const scalar_t* const pf = xp + ahead;
        scalar_t* const yp = y + (b * hw + r) * nc;
        int64_t c = 0;
        for (; c + V <= nc; c += V) {
          prefetch_l2(pf + c);
          auto xs = vload<acc_t>(xp + c);
          if constexpr (kShift) xs = xs - Vec<acc_t>::loadu(kk + c);
          vstore<acc_t>(yp + c, activate<acc_t, kSilu>(at::vec::fmadd(xs, Vec<acc_t>::loadu(al + c), Vec<acc_t>::loadu(be + c))));
        }
        if (c < nc) {
          auto xs = vload<acc_t>(xp + c, nc - c);
          if constexpr (kShift) xs = xs - Vec<acc_t>::loadu(kk + c, nc - c);
          vstore<acc_t>(yp + c, activate<acc_t, kSilu>(at::vec::fmadd(xs, Vec<acc_t>::loadu(al + c, nc - c), Vec<acc_t>::loadu(be + c, nc - c))), nc - c);
        }
      }
    });
  };
  nhwc_passes<scalar_t>(B, C, HW, S1.get(), S2.get(), shifts, sums, coefs, normalize);
}

// dx = da c1 + x c2 + c3 (math::gnms_grad_coef): each channel's c1 is its forward alpha; the
// group's c2, c3 (math::gnms_group_grad_coef) come from A = sum_c k_c S1_c and B = sum_c k_c S2_c
// over its channels, k = (1 + s) w; inv_n = 1 / (Cg HW).
template <typename acc_t>
math::GnmsGroupGradCoef<acc_t> group_grad_coef(double A, double B, double mean, double rstd, double inv_n) {
  const auto cf = math::gnms_group_grad_coef<double>(mean, rstd, A * inv_n, B * inv_n);
  return {static_cast<acc_t>(cf.c2), static_cast<acc_t>(cf.c3)};
}

// The same from the per-channel sums S1, S2 (indexed b * C + c), in two chains of additions each:
// one chain of dependent FMAs (4 cycles each) over 8 channels, and a division per sum, had made
// this per-group step ~10% of the NCHW backward at dito-S's 8x8 level (perf, 1 thread, 2026-12-02).
template <typename acc_t>
math::GnmsGroupGradCoef<acc_t> group_grad_coef(const double* S1, const double* S2, double mean, double rstd,
                                               int64_t b, int64_t g, int64_t C, int64_t Cg, double inv_n,
                                               const Params<acc_t>& P) {
  double A[2] = {0, 0}, Bv[2] = {0, 0};
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
    const double k = (1.0 + P.s[b * C + c]) * P.w[c];
    A[c & 1] += k * S1[b * C + c];
    Bv[c & 1] += k * S2[b * C + c];
  }
  return group_grad_coef<acc_t>(A[0] + A[1], Bv[0] + Bv[1], mean, rstd, inv_n);
}

// The parameter gradients (math.h) from the per-(sample, channel) sums S1, S2; undefined outputs
// (absent parameters) are skipped. Runs on the calling thread after the parallel passes; each loop
// is a plain loop over unaliased arrays that the compiler vectorises. At dito-S's 8x8 level this
// step still takes ~2% of the backward's samples (perf, 2 threads) in either form, the earlier one
// loop through a temporary or this: most of it is reading the sums the other core wrote.
template <typename acc_t>
void param_grads(const double* __restrict__ S1, const double* __restrict__ S2, int64_t B, int64_t C,
                 const Params<acc_t>& P, const at::TensorBase& grad_weight, const at::TensorBase& grad_bias,
                 const at::TensorBase& grad_scale, const at::TensorBase& grad_shift) {
  auto write = [](const at::TensorBase& t, const double* __restrict__ v) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "gnms_param_grad", [&] {
      scalar_t* __restrict__ p = t.mutable_data_ptr<scalar_t>();
      const int64_t n = t.numel();
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[i]);
    });
  };
  if (grad_weight.defined() || grad_bias.defined()) {  // dweight = sum_b (1 + s) S2, dbias = sum_b (1 + s) S1
    std::vector<double> dw(C, 0.0), db(C, 0.0);
    double* __restrict__ w_sum = dw.data();
    double* __restrict__ b_sum = db.data();
    for (int64_t b = 0; b < B; ++b) {
      const acc_t* __restrict__ s = P.s + b * C;
      const double* __restrict__ s1 = S1 + b * C;
      const double* __restrict__ s2 = S2 + b * C;
      for (int64_t c = 0; c < C; ++c) {
        const double m = 1.0 + static_cast<double>(s[c]);
        w_sum[c] += m * s2[c];
        b_sum[c] += m * s1[c];
      }
    }
    if (grad_weight.defined()) write(grad_weight, w_sum);
    if (grad_bias.defined()) write(grad_bias, b_sum);
  }
  if (grad_scale.defined()) {  // dscale = w S2 + b S1
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_scale.scalar_type(), "gnms_grad_scale", [&] {
      scalar_t* __restrict__ p = grad_scale.mutable_data_ptr<scalar_t>();
      const acc_t* __restrict__ w = P.w;
      const acc_t* __restrict__ bias = P.b;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c)
          p[b * C + c] = static_cast<scalar_t>(static_cast<double>(w[c]) * S2[b * C + c] +
                                               static_cast<double>(bias[c]) * S1[b * C + c]);
    });
  }
  if (grad_shift.defined()) write(grad_shift, S1);  // dshift = S1
}

// NCHW: one task per (sample, group) runs both passes, so the second pass finds the group's x and
// da (e.g. 2 channels x 64 x 64 fp32 = 32 KiB each) still in cache.
template <typename scalar_t, bool kSilu>
void backward_nchw(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t B, int64_t C, int64_t HW, int64_t G,
                   const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
                   const Params<at::opmath_type<scalar_t>>& P, const at::TensorBase& gw, const at::TensorBase& gb,
                   const at::TensorBase& gs, const at::TensorBase& gsh) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t Cg = C / G;
  const double inv_n = 1.0 / static_cast<double>(Cg * HW);
  std::vector<double> S1(B * C), S2(B * C);
  // Groups of at most one block of acc_t sums (kSumBlock values) also sum k da and k da xhat in
  // acc_t lanes as pass 1 goes, and take c2, c3 from those two sums; larger groups add up their
  // channels' double sums afterwards. At dito-S's 8x8 level (8 channels x 64 values), against the
  // per-channel route alone: backward 42.4-43.7 us against 44.0-44.9 us (2 threads, warm loops of
  // the raw op, builds alternated over 5 process pairs, 2026-12-02).
  const bool one_block = Cg * HW <= kSumBlock<acc_t>;
  at::parallel_for(0, B * G, grain_for(Cg * HW), [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      // Pass 1 (SiLU' per value) prefetches x and dy at least one group ahead (prefetch_ahead).
      const int64_t ahead = prefetch_ahead<scalar_t>(bg, end, Cg * HW);
      // Groups far from zero run in coordinates shifted by their first value k (shift_group)
      const acc_t r = rstd[bg];
      const bool shift = shift_group(mean[bg], r);
      const acc_t k = shift ? static_cast<acc_t>(x[bg * Cg * HW]) : acc_t(0);
      const double m = static_cast<double>(mean[bg]) - k;  // the (shifted) mean, exact
      with_shift(shift, [&](auto S) C10_ALWAYS_INLINE_ATTRIBUTE {
        constexpr bool kShift = decltype(S)::value;
        const Vec<acc_t> kv(k), mv(static_cast<acc_t>(m)), rv(r);
        // Pass 1: per-channel sums S1 = sum da, S2 = sum da xhat. Everything the loops read is a
        // local value: the vector stores may alias any memory, so values read through the
        // lambda's reference captures would be reloaded after each one. Each plane's lane sums
        // (one pair per kSumBlock values) wait in a batch whose lanes are summed together
        // (hsum_batch): a reduction per plane cost as much as an 8x8 plane's arithmetic. The sums
        // are added into S1, S2, which start at zero.
        static_assert(kHsumBatch % 2 == 0, "the sums are queued in pairs");
        Vec<acc_t> batch[kHsumBatch];
        double* target[kHsumBatch];
        int64_t queued = 0;
        auto flush = [&] {
          double sums[kHsumBatch];
          hsum_batch(batch, queued, sums);
          for (int64_t j = 0; j < queued; ++j) *target[j] += sums[j];
          queued = 0;
        };
        Vec<acc_t> ga(0), gb(0);  // the group's k-weighted sums (one_block)
        for (int64_t bc = b * C + g * Cg; bc < b * C + (g + 1) * Cg; ++bc) {
          const int64_t c = bc - b * C, hw = HW;
          const auto cf = fold<kShift>(m, r, P.w[c], P.b[c], P.s[bc], P.sh[bc]);
          const Vec<acc_t> al(cf.alpha), be(cf.beta);
          const scalar_t* const xp = x + bc * hw;
          const scalar_t* const gp = dy + bc * hw;
          scalar_t* const dp = dx + bc * hw;
          Vec<acc_t> a1(0), a2(0);
          auto step = [&](int64_t i, int64_t n) {
            prefetch_l2(xp + ahead + i);
            prefetch_l2(gp + ahead + i);
            const auto xv = shifted<kShift>(vload<acc_t>(xp + i, n), kv);
            auto da = act_grad<acc_t, kSilu>(at::vec::fmadd(xv, al, be), vload<acc_t>(gp + i, n));
            if constexpr (kKeepDa<scalar_t, kSilu>) vstore<acc_t>(dp + i, da, n);
            if (n < V) da = Vec<acc_t>::set(Vec<acc_t>(0), da, n);
            a1 = a1 + da;
            a2 = at::vec::fmadd(da, (xv - mv) * rv, a2);
          };
          for (int64_t i0 = 0; i0 < hw; i0 += kSumBlock<acc_t>) {  // acc_t sums of kSumBlock values, then double
            const int64_t i1 = std::min(hw, i0 + kSumBlock<acc_t>);
            int64_t i = i0;
            for (; i + V <= i1; i += V) step(i, V);
            if (i < i1) step(i, i1 - i);
            if (one_block) {
              const Vec<acc_t> kw((acc_t(1) + P.s[bc]) * P.w[c]);  // (1 + s) w
              ga = at::vec::fmadd(a1, kw, ga);
              gb = at::vec::fmadd(a2, kw, gb);
            }
            batch[queued] = a1;
            target[queued++] = &S1[bc];
            batch[queued] = a2;
            target[queued++] = &S2[bc];
            if (queued == kHsumBatch) flush();
            a1 = a2 = Vec<acc_t>(0);
          }
        }
        if (queued) flush();
        const auto gc = one_block ? group_grad_coef<acc_t>(hsum(ga), hsum(gb), m, r, inv_n)
                                  : group_grad_coef<acc_t>(S1.data(), S2.data(), m, r, b, g, C, Cg, inv_n, P);
        const Vec<acc_t> c2(gc.c2), c3(gc.c3);
        // Pass 2: dx = da c1 + x c2 + c3 with c1 = alpha.
        for (int64_t bc = b * C + g * Cg; bc < b * C + (g + 1) * Cg; ++bc) {
          const int64_t c = bc - b * C, hw = HW;
          const auto cf = fold<kShift>(m, r, P.w[c], P.b[c], P.s[bc], P.sh[bc]);
          const Vec<acc_t> al(cf.alpha), be(cf.beta);
          const scalar_t* const xp = x + bc * hw;
          const scalar_t* const gp = dy + bc * hw;
          scalar_t* const op = dx + bc * hw;
          auto step = [&](int64_t i, int64_t n) {
            const auto xv = shifted<kShift>(vload<acc_t>(xp + i, n), kv);
            Vec<acc_t> da;
            if constexpr (kKeepDa<scalar_t, kSilu>) da = vload<acc_t>(op + i, n);  // stored by pass 1
            else da = act_grad<acc_t, kSilu>(at::vec::fmadd(xv, al, be), vload<acc_t>(gp + i, n));
            vstore<acc_t>(op + i, at::vec::fmadd(da, al, at::vec::fmadd(xv, c2, c3)), n);
          };
          int64_t i = 0;
          for (; i + V <= hw; i += V) step(i, V);
          if (i < hw) step(i, hw - i);
        }
      });
    }
  });
  param_grads<acc_t>(S1.data(), S2.data(), B, C, P, gw, gb, gs, gsh);
}

template <typename scalar_t, bool kSilu>
void backward_nhwc(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t B, int64_t C, int64_t HW, int64_t G,
                   const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
                   const Params<at::opmath_type<scalar_t>>& P, const at::TensorBase& gw, const at::TensorBase& gb,
                   const at::TensorBase& gs, const at::TensorBase& gsh) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t Cg = C / G;
  const double inv_n = 1.0 / static_cast<double>(Cg * HW);
  const auto alpha = uninitialized<acc_t>(B * C), beta = uninitialized<acc_t>(B * C), mc = uninitialized<acc_t>(B * C),
             rc = uninitialized<acc_t>(B * C), c2 = uninitialized<acc_t>(B * C), c3 = uninitialized<acc_t>(B * C),
             kc = uninitialized<acc_t>(B * C);
  std::vector<double> shifted_mean(B * G);  // the group's mean, less k where sample b is shifted
  std::vector<char> shift(B);
  const auto S1 = uninitialized<double>(B * C), S2 = uninitialized<double>(B * C);
  // Sample b's per-channel forward fold and normalisation constants, expanded from groups; in
  // coordinates shifted by each group's first value k when any group of the sample is far from
  // zero, as the forward decides (shift_group).
  auto expand = [&](int64_t b) {
    bool any = false;
    for (int64_t g = 0; g < G; ++g) any = any || shift_group(mean[b * G + g], rstd[b * G + g]);
    shift[b] = any;
    for (int64_t g = 0; g < G; ++g) {  // by group: no division per channel (see forward_nhwc)
      const int64_t bg = b * G + g;
      const acc_t k = any ? static_cast<acc_t>(x[b * HW * C + g * Cg]) : acc_t(0);
      const double m = shifted_mean[bg] = static_cast<double>(mean[bg]) - k;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const int64_t bc = b * C + c;
        const auto cf = any ? fold<true>(m, rstd[bg], P.w[c], P.b[c], P.s[bc], P.sh[bc])
                            : fold<false>(m, rstd[bg], P.w[c], P.b[c], P.s[bc], P.sh[bc]);
        alpha[bc] = cf.alpha;
        beta[bc] = cf.beta;
        mc[bc] = static_cast<acc_t>(m);
        rc[bc] = rstd[bg];
        kc[bc] = k;
      }
    }
  };
  // Pass 1 over rows [r0, r1) of sample b: per-channel sums of da and da xhat added into s1, s2
  // (C each), da kept in dx where exact. Captures by value: the vector stores may alias any memory
  // (see backward_nchw).
  auto sums = [&](int64_t b, int64_t r0, int64_t r1, double* s1, double* s2, bool add, int64_t ahead) {
    const int64_t nc = C;
    const scalar_t* const xb = x + b * HW * nc;
    const scalar_t* const gb_ = dy + b * HW * nc;
    scalar_t* const db = dx + b * HW * nc;
    const acc_t *al = alpha.get() + b * nc, *be = beta.get() + b * nc, *mm = mc.get() + b * nc,
                *rr = rc.get() + b * nc, *kk = kc.get() + b * nc;
    with_shift(shift[b], [=](auto S) C10_ALWAYS_INLINE_ATTRIBUTE {
      constexpr bool kShift = decltype(S)::value;
      channel_sums<acc_t>(r0, r1, nc, s1, s2, add, [=](int64_t r, int64_t c, int64_t n, Vec<acc_t>& a1, Vec<acc_t>& a2) {
        prefetch_l2(xb + ahead + r * nc + c);
        prefetch_l2(gb_ + ahead + r * nc + c);
        auto xv = vload<acc_t>(xb + r * nc + c, n);
        if constexpr (kShift) xv = xv - vload<acc_t>(kk + c, n);
        auto a = at::vec::fmadd(xv, vload<acc_t>(al + c, n), vload<acc_t>(be + c, n));
        auto da = act_grad<acc_t, kSilu>(a, vload<acc_t>(gb_ + r * nc + c, n));
        if constexpr (kKeepDa<scalar_t, kSilu>) vstore<acc_t>(db + r * nc + c, da, n);
        if (n < V) da = Vec<acc_t>::set(Vec<acc_t>(0), da, n);
        a1 = a1 + da;
        a2 = at::vec::fmadd(da, (xv - vload<acc_t>(mm + c, n)) * vload<acc_t>(rr + c, n), a2);
      });
    });
  };
  auto grad_coefs = [&](int64_t b, const double*, const double*) {  // reads S1, S2 by sample
    for (int64_t g = 0; g < G; ++g) {
      const auto gc = group_grad_coef<acc_t>(S1.get(), S2.get(), shifted_mean[b * G + g], rstd[b * G + g], b, g, C,
                                             Cg, inv_n, P);
      std::fill_n(c2.get() + b * C + g * Cg, Cg, gc.c2);
      std::fill_n(c3.get() + b * C + g * Cg, Cg, gc.c3);
    }
  };
  // Pass 2 over rows [r0, r1) of sample b.
  auto apply = [&](int64_t b, int64_t r0, int64_t r1, int64_t /*ahead: prefetched by pass 1*/) {
    const int64_t nc = C, hw = HW;  // locals: the vector stores may alias any memory
    const acc_t *al = alpha.get() + b * nc, *be = beta.get() + b * nc,  // al is also c1
                *k2 = c2.get() + b * nc, *k3 = c3.get() + b * nc, *kk = kc.get() + b * nc;
    with_shift(shift[b], [=](auto S) C10_ALWAYS_INLINE_ATTRIBUTE {
      constexpr bool kShift = decltype(S)::value;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* const xp = x + (b * hw + r) * nc;
        const scalar_t* const gp = dy + (b * hw + r) * nc;
        scalar_t* const op = dx + (b * hw + r) * nc;
        for (int64_t c = 0; c < nc; c += V) {
          const int64_t n = nc - c < V ? nc - c : V;
          auto xv = vload<acc_t>(xp + c, n);
          if constexpr (kShift) xv = xv - vload<acc_t>(kk + c, n);
          Vec<acc_t> da;
          if constexpr (kKeepDa<scalar_t, kSilu>) {
            da = vload<acc_t>(op + c, n);  // stored by pass 1
          } else {
            auto a = at::vec::fmadd(xv, vload<acc_t>(al + c, n), vload<acc_t>(be + c, n));
            da = act_grad<acc_t, kSilu>(a, vload<acc_t>(gp + c, n));
          }
          vstore<acc_t>(op + c, at::vec::fmadd(da, vload<acc_t>(al + c, n), at::vec::fmadd(xv, vload<acc_t>(k2 + c, n), vload<acc_t>(k3 + c, n))), n);
        }
      }
    });
  };
  nhwc_passes<scalar_t>(B, C, HW, S1.get(), S2.get(), expand, sums, grad_coefs, apply);
  param_grads<acc_t>(S1.get(), S2.get(), B, C, P, gw, gb, gs, gsh);
}

inline bool is_channels_last(const at::TensorBase& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

void gnms_kernel(const at::TensorBase& x, int64_t groups, const at::TensorBase& weight, const at::TensorBase& bias,
                 const at::TensorBase& scale, const at::TensorBase& shift, double eps, bool silu,
                 const at::TensorBase& y, const at::TensorBase& mean, const at::TensorBase& rstd) {
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const bool nhwc = is_channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gnms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> P(weight, bias, scale, shift, B, C);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    if (nhwc) {
      silu ? forward_nhwc<scalar_t, true>(xp, yp, B, C, HW, groups, eps, P, mp, rp)
           : forward_nhwc<scalar_t, false>(xp, yp, B, C, HW, groups, eps, P, mp, rp);
    } else {
      silu ? forward_nchw<scalar_t, true>(xp, yp, B, C, HW, groups, eps, P, mp, rp)
           : forward_nchw<scalar_t, false>(xp, yp, B, C, HW, groups, eps, P, mp, rp);
    }
  });
}

void gnms_backward_kernel(const at::TensorBase& grad_y, const at::TensorBase& x, const at::TensorBase& mean,
                          const at::TensorBase& rstd, int64_t groups, const at::TensorBase& weight,
                          const at::TensorBase& bias, const at::TensorBase& scale, const at::TensorBase& shift,
                          bool silu, const at::TensorBase& grad_x, const at::TensorBase& grad_weight,
                          const at::TensorBase& grad_bias, const at::TensorBase& grad_scale,
                          const at::TensorBase& grad_shift) {
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const bool nhwc = is_channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gnms_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> P(weight, bias, scale, shift, B, C);
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = grad_x.mutable_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    if (nhwc) {
      silu ? backward_nhwc<scalar_t, true>(gp, xp, op, B, C, HW, groups, mp, rp, P, grad_weight, grad_bias, grad_scale, grad_shift)
           : backward_nhwc<scalar_t, false>(gp, xp, op, B, C, HW, groups, mp, rp, P, grad_weight, grad_bias, grad_scale, grad_shift);
    } else {
      silu ? backward_nchw<scalar_t, true>(gp, xp, op, B, C, HW, groups, mp, rp, P, grad_weight, grad_bias, grad_scale, grad_shift)
           : backward_nchw<scalar_t, false>(gp, xp, op, B, C, HW, groups, mp, rp, P, grad_weight, grad_bias, grad_scale, grad_shift);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dito_fast
