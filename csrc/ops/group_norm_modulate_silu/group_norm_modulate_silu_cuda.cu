// CUDA kernels of group_norm_modulate_silu (GroupNorm -> (1 + scale), shift -> SiLU) and its
// backward, for NCHW-contiguous and channels_last x (processed natively, outputs in x's format).
//
// Every group runs in coordinates shifted by its first value k = x[b, g Cg, 0, 0] (group_shift):
// its statistics are sums of x - k, and the folded pre-activation is a = (x - k) alpha + beta with
// alpha, beta from the shifted mean mean - k (math::gnms_coef, in double). Folded around zero
// instead (a = x alpha + beta), a group far from zero (|mean| rstd large: mean 300, std 0.01; or a
// constant group, rstd = 1/sqrt(eps)) cancels two terms of size |mean| rstd in float. The CPU
// kernels shift only such groups (to keep their common path's arithmetic); here the subtraction is
// free next to the memory traffic, so every group is shifted.
//
// Forward (math.h: moments_to_mean_rstd, gnms_coef, silu):
//   1. stats: shifted sums per (sample, group);
//      NCHW: a group is one contiguous run of Cg*HW values; channels_last: (sample, row-chunk)
//      tiles with threads across channels, giving per-(sample, chunk, channel) partials.
//   2. finalize: one block per group adds its partials in a fixed order (double), writes mean and
//      rstd, and folds the per-(sample, channel) coefficients alpha, beta and the shift k.
//   3. apply: y = silu((x - k) alpha + beta) (or without SiLU).
//   NCHW with enough groups to fill the GPU runs 1-3 as one fused kernel (one block per group,
//   the second read of the group mostly from L2).
// Backward (math.h: gnms_coef, silu_grad, gnms_grad_coef), nothing saved but mean/rstd:
//   1. sums: per (sample, channel) partials of S1 = sum da and S2' = sum da (x - mean), where
//      da = dy silu'(a) (or dy), a recomputed from x, both in the group's shifted coordinates;
//      NCHW: per plane, channels_last: tiles.
//   2. channel finalize: S1, S2 = rstd S2' per (sample, channel) in double; dshift, dscale.
//   3. group finalize: A, B per group -> (alpha, beta, c1, c2, c3, k) per (sample, channel).
//   4. dweight, dbias: per channel, sums over the batch in order (only when weight/bias exist).
//   5. apply: dx = da c1 + (x - k) c2 + c3 (c3 from the shifted mean: the two last terms no
//      longer cancel for groups far from zero).
// All cross-thread and cross-block sums use fixed trees and fixed orders (no atomics): results
// are deterministic for a given GPU model.
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
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include <dito_fast/check.h>
#include <dito_fast/cuda_utils.cuh>
#include <dito_fast/math.h>

namespace dito_fast {
namespace {

using namespace cuda;

// ---- launch plans ------------------------------------------------------------------------------------
// Contiguous segments (NCHW groups or planes) use plan_reduce (cuda_utils.cuh): up to 512 threads,
// and chunks per segment such that all segments together make at most one full wave of blocks.
//
// Elementwise passes over (B, npack) with 256-thread blocks: blocks along x per sample, >= 2 packs
// per thread, all samples together at most one full wave (grid-stride loops do the rest).
constexpr int kApplyThreads = 256;

inline int64_t apply_blocks(int64_t npack, int64_t B) { return blocks_per_sample(npack, B, kApplyThreads, 2, 1); }

// channels_last tiles: a block is (lanes x rows) threads, lanes = channel packs (<= 256), rows =
// 256 / lanes rows of the HW axis; ctiles blocks cover C; chunks blocks split HW so that each
// thread gets >= 4 rows and the grid is at most 4 blocks per SM: the kernels keep 4 rows of loads
// in flight per thread, so half occupancy saturates memory while keeping the partial tables
// (B x chunks x C) small.
constexpr int kTileThreads = 256;

struct TilePlan {
  int lanes, rows;
  int64_t ctiles, chunks, rows_per_chunk;
};

inline TilePlan plan_tiles(int64_t cpacks, int64_t HW, int64_t B) {
  TilePlan p;
  p.lanes = static_cast<int>(std::min<int64_t>(cpacks, kTileThreads));
  p.rows = kTileThreads / p.lanes;
  p.ctiles = ceil_div(cpacks, p.lanes);
  TORCH_CHECK(p.ctiles <= kMaxGridY, "group_norm_modulate_silu: ", cpacks,
              " channel packs are more than one launch covers on CUDA (", kMaxGridY * kTileThreads, ")");
  const int64_t by_work = ceil_div(HW, static_cast<int64_t>(p.rows) * 4);
  const int64_t resident = static_cast<int64_t>(sm_count()) * 4;
  const int64_t by_occupancy = resident / (std::min(B, kMaxGridY) * p.ctiles);
  const int64_t chunks = std::max<int64_t>(1, std::min({by_work, by_occupancy, HW, kMaxGridY * 16}));
  p.rows_per_chunk = ceil_div(HW, chunks);
  p.chunks = ceil_div(HW, p.rows_per_chunk);
  return p;
}

// ---- per-channel parameters -----------------------------------------------------------------------------
// Optional inputs converted to acc_t on the host; null pointers when absent (w = 1, b = s = sh = 0).
template <typename acc_t>
struct Params {
  const acc_t* w;
  const acc_t* bias;
  const acc_t* scale;
  const acc_t* shift;
};

template <typename acc_t>
__device__ __forceinline__ acc_t param_w(const Params<acc_t>& p, int64_t c) { return p.w ? p.w[c] : acc_t(1); }
template <typename acc_t>
__device__ __forceinline__ acc_t param_b(const Params<acc_t>& p, int64_t c) { return p.bias ? p.bias[c] : acc_t(0); }
template <typename acc_t>
__device__ __forceinline__ acc_t param_s(const Params<acc_t>& p, int64_t bc) { return p.scale ? p.scale[bc] : acc_t(0); }
template <typename acc_t>
__device__ __forceinline__ acc_t param_sh(const Params<acc_t>& p, int64_t bc) { return p.shift ? p.shift[bc] : acc_t(0); }

// alpha, beta of channel c of sample b for shifted coordinates: a = (x - k) alpha + beta, from the
// shifted mean ms = mean - k; in double, as the CPU kernels fold their shifted groups (per channel:
// nothing next to a pass over x).
template <typename acc_t>
__device__ __forceinline__ math::GnmsCoef<acc_t> channel_coef(const Params<acc_t>& p, double ms, double rstd,
                                                             int64_t b, int64_t c, int64_t C) {
  const auto cf = math::gnms_coef<double>(ms, rstd, param_w(p, c), param_b(p, c), param_s(p, b * C + c),
                                          param_sh(p, b * C + c));
  return {static_cast<acc_t>(cf.alpha), static_cast<acc_t>(cf.beta)};
}

// The shift k of group g of sample b: its first value x[b, g Cg, 0, 0], NCHW or channels_last.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t group_shift(const scalar_t* x, int64_t b, int64_t g, int64_t C, int64_t Cg,
                                             int64_t HW, bool cl) {
  return static_cast<acc_t>(x[cl ? b * HW * C + g * Cg : (b * C + g * Cg) * HW]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t a, bool silu) {
  return silu ? math::silu(a) : a;
}

template <typename acc_t>
__device__ __forceinline__ acc_t act_grad(acc_t a, acc_t dy, bool silu) {
  return silu ? dy * math::silu_grad(a) : dy;
}

// =====================================================================================================
// Forward
// =====================================================================================================

// NCHW fused. Launch: grid (min(B*G, 2^31-1)), block T, dynamic smem 2 * Cg * sizeof(acc_t).
// One block per group (b, g), the contiguous run of L = Cg*HW values at (b*G + g)*L: shifted sums
// (block tree in double) -> mean/rstd -> alpha/beta of the Cg channels in shared memory -> apply.
template <typename scalar_t, typename acc_t, int V>
__global__ void gn_fused_nchw_kernel(const scalar_t* __restrict__ x, int64_t BG, int64_t G, int64_t Cg, int64_t HW,
                                     double eps, Params<acc_t> p, bool silu, scalar_t* __restrict__ y,
                                     acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out) {
  __shared__ double sh[2 * kWarp];
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* s_alpha = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_beta = s_alpha + Cg;
  const int64_t L = Cg * HW, npack = L / V, C = G * Cg;
  for (int64_t bg = blockIdx.x; bg < BG; bg += gridDim.x) {
    const scalar_t* xg = x + bg * L;
    scalar_t* yg = y + bg * L;
    const acc_t k = static_cast<acc_t>(xg[0]);
    acc_t s1 = 0, s2 = 0;
    shifted_sums<V>(xg, npack, threadIdx.x, blockDim.x, k, s1, s2);
    double d1 = s1, d2 = s2;
    block_sum2(d1, d2, sh);
    refine_overflowed_sums(xg, 1, L, 0, static_cast<double>(k), d1, d2, sh);
    double mean_d, rstd_d;
    math::moments_to_mean_rstd<double>(d1, d2, static_cast<double>(L), static_cast<double>(k), eps, mean_d, rstd_d);
    if (threadIdx.x == 0) {
      mean_out[bg] = static_cast<acc_t>(mean_d);
      rstd_out[bg] = static_cast<acc_t>(rstd_d);
    }
    const int64_t b = bg / G, c0 = (bg % G) * Cg;
    for (int64_t c = threadIdx.x; c < Cg; c += blockDim.x) {
      const auto cf = channel_coef(p, mean_d - static_cast<double>(k), rstd_d, b, c0 + c, C);
      s_alpha[c] = cf.alpha;
      s_beta[c] = cf.beta;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < npack; i += blockDim.x) {
      // HW % V == 0: a pack stays in one plane; L < 2^31 (checked on the host): 32-bit division.
      const int64_t c = static_cast<uint32_t>(i * V) / static_cast<uint32_t>(HW);
      const acc_t al = s_alpha[c], be = s_beta[c];
      const auto xv = load_pack<V>(xg + i * V);
      Pack<scalar_t, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) out.v[q] = static_cast<scalar_t>(activate((static_cast<acc_t>(xv.v[q]) - k) * al + be, silu));
      store_pack<V>(yg + i * V, out);
    }
    __syncthreads();  // s_alpha/s_beta are rewritten for the next group
  }
}

// NCHW stats. Launch: grid (chunks, min(B*G, 65535)), block T. Block (j, s) accumulates shifted
// sums of group s (k = its first value) over packs j*T + tid, stepping by chunks*T, and writes
// partial[(s * chunks + j) * 2 + {0, 1}] (double).
template <typename scalar_t, typename acc_t, int V>
__global__ void gn_stats_nchw_kernel(const scalar_t* __restrict__ x, int64_t S, int64_t L,
                                     double* __restrict__ partial) {
  __shared__ double sh[2 * kWarp];
  chunked_shifted_sums<acc_t, V>(x, S, L, partial, sh);
}

// channels_last stats. Launch: grid (chunks, min(B, 65535), ctiles), block (lanes, rows), dynamic
// smem 2 * rows * lanes * V * sizeof(acc_t). Block (j, b, t) covers rows hw in
// [j*rpc, min(HW, (j+1)*rpc)) of sample b and channel packs t*lanes + lane. Thread (lane, row)
// accumulates shifted sums of its V channels (shift of channel c: x[b, 0, (c / Cg) Cg]) over
// hw = start + row, stepping by rows (4 rows in flight); a fixed tree over rows in shared memory
// gives per-channel sums, written as partial[((b * chunks + j) * C + c) * 2 + {0, 1}] (double).
template <typename scalar_t, typename acc_t, int V>
__global__ void gn_stats_cl_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t C, int64_t HW, int64_t Cg,
                                   int64_t rpc, double* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x, row = threadIdx.y, lanes = blockDim.x, rows = blockDim.y;
  acc_t* t1 = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* t2 = t1 + rows * lanes * V;
  const int64_t cv = static_cast<int64_t>(blockIdx.z) * lanes + lane;
  const bool active = cv < C / V;
  const int64_t hw0 = blockIdx.x * rpc, hw1 = std::min(HW, hw0 + rpc);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const scalar_t* xb = x + b * HW * C + cv * V;
    acc_t k[V], s1[V], s2[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
      k[q] = active ? static_cast<acc_t>(x[b * HW * C + ((cv * V + q) / Cg) * Cg]) : acc_t(0);
      s1[q] = 0;
      s2[q] = 0;
    }
    if (active) {
      int64_t hw = hw0 + row;
      for (; hw + 3 * rows < hw1; hw += 4 * rows) {
        Pack<scalar_t, V> xv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) xv[u] = load_pack<V>(xb + (hw + u * rows) * C);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int q = 0; q < V; ++q) {
            const acc_t d = static_cast<acc_t>(xv[u].v[q]) - k[q];
            s1[q] += d;
            s2[q] += d * d;
          }
        }
      }
      for (; hw < hw1; hw += rows) {
        const auto xv = load_pack<V>(xb + hw * C);
#pragma unroll
        for (int q = 0; q < V; ++q) {
          const acc_t d = static_cast<acc_t>(xv.v[q]) - k[q];
          s1[q] += d;
          s2[q] += d * d;
        }
      }
    }
    row_tree_sum2<V>(s1, s2, t1, t2, partial + ((b * gridDim.x + blockIdx.x) * C + cv * V) * 2, active);
  }
}

// Finalize. Launch: grid (min(B*G, 2^31-1)), block 128. Block-stride over the groups: block
// (b, g) adds the group's partials in a fixed order (NCHW: its `chunks` entries; channels_last:
// chunks x Cg entries, channel fastest), then mean/rstd (double) and alpha, beta and the shift k
// of the group's channels.
template <typename scalar_t, typename acc_t>
__global__ void gn_finalize_kernel(const scalar_t* __restrict__ x, const double* __restrict__ partial, int64_t BG,
                                   int64_t G, int64_t Cg, int64_t HW, int64_t chunks, bool cl, double eps,
                                   Params<acc_t> p, acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out,
                                   acc_t* __restrict__ alpha, acc_t* __restrict__ beta, acc_t* __restrict__ kshift) {
  __shared__ double sh[2 * kWarp];
  for (int64_t bg = blockIdx.x; bg < BG; bg += gridDim.x) {
    const int64_t b = bg / G, g = bg % G, C = G * Cg;
    double d1 = 0, d2 = 0;
    if (cl) {
      const int64_t items = chunks * Cg;
      for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
        const int64_t j = i / Cg, c = g * Cg + i % Cg;
        const double* e = partial + ((b * chunks + j) * C + c) * 2;
        d1 += e[0];
        d2 += e[1];
      }
    } else {
      add_pairs_strided(partial + bg * chunks * 2, chunks, d1, d2);
    }
    block_sum2(d1, d2, sh);
    // The shift the stats kernels used.
    const acc_t k = group_shift<scalar_t, acc_t>(x, b, g, C, Cg, HW, cl);
    if (cl) {
      refine_overflowed_sums(x + b * HW * C + g * Cg, HW, Cg, C, static_cast<double>(k), d1, d2, sh);
    } else {
      refine_overflowed_sums(x + bg * Cg * HW, 1, Cg * HW, 0, static_cast<double>(k), d1, d2, sh);
    }
    double mean_d, rstd_d;
    math::moments_to_mean_rstd<double>(d1, d2, static_cast<double>(Cg * HW), static_cast<double>(k), eps, mean_d,
                                       rstd_d);
    if (threadIdx.x == 0) {
      mean_out[bg] = static_cast<acc_t>(mean_d);
      rstd_out[bg] = static_cast<acc_t>(rstd_d);
    }
    for (int64_t c = g * Cg + threadIdx.x; c < (g + 1) * Cg; c += blockDim.x) {
      const auto cf = channel_coef(p, mean_d - static_cast<double>(k), rstd_d, b, c, C);
      alpha[b * C + c] = cf.alpha;
      beta[b * C + c] = cf.beta;
      kshift[b * C + c] = k;
    }
  }
}

// NCHW apply. Launch: grid (bx, min(B, 65535)), block 256; grid-stride over the packs of sample b,
// channel c = (pack offset) / HW: y = act((x - k[b, c]) alpha[b, c] + beta[b, c]).
template <typename scalar_t, typename acc_t, int V>
__global__ void gn_apply_nchw_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ alpha,
                                     const acc_t* __restrict__ beta, const acc_t* __restrict__ kshift, int64_t B,
                                     int64_t C, int64_t HW, bool silu, scalar_t* __restrict__ y) {
  const int64_t N = C * HW, npack = N / V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const scalar_t* xb = x + b * N;
    scalar_t* yb = y + b * N;
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      // N < 2^31 (checked on the host): 32-bit division.
      const int64_t c = static_cast<uint32_t>(i * V) / static_cast<uint32_t>(HW);
      const acc_t al = alpha[b * C + c], be = beta[b * C + c], k = kshift[b * C + c];
      const auto xv = load_pack<V>(xb + i * V);
      Pack<scalar_t, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) out.v[q] = static_cast<scalar_t>(activate((static_cast<acc_t>(xv.v[q]) - k) * al + be, silu));
      store_pack<V>(yb + i * V, out);
    }
  }
}

// channels_last apply. Launch: like gn_stats_cl_kernel (no smem). Thread (lane, row) loads
// alpha, beta and k of its V channels once and walks rows hw = start + row, stepping by rows.
template <typename scalar_t, typename acc_t, int V>
__global__ void gn_apply_cl_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ alpha,
                                   const acc_t* __restrict__ beta, const acc_t* __restrict__ kshift, int64_t B,
                                   int64_t C, int64_t HW, int64_t rpc, bool silu, scalar_t* __restrict__ y) {
  const int lane = threadIdx.x, row = threadIdx.y, lanes = blockDim.x, rows = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.z) * lanes + lane;
  if (cv >= C / V) return;
  const int64_t hw0 = blockIdx.x * rpc, hw1 = std::min(HW, hw0 + rpc);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc_t al[V], be[V], ks[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
      al[q] = alpha[b * C + cv * V + q];
      be[q] = beta[b * C + cv * V + q];
      ks[q] = kshift[b * C + cv * V + q];
    }
    const int64_t base = b * HW * C + cv * V;
    int64_t hw = hw0 + row;
    for (; hw + 3 * rows < hw1; hw += 4 * rows) {
      Pack<scalar_t, V> xv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) xv[u] = load_pack<V>(x + base + (hw + u * rows) * C);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        Pack<scalar_t, V> out;
#pragma unroll
        for (int q = 0; q < V; ++q) out.v[q] = static_cast<scalar_t>(activate((static_cast<acc_t>(xv[u].v[q]) - ks[q]) * al[q] + be[q], silu));
        store_pack<V>(y + base + (hw + u * rows) * C, out);
      }
    }
    for (; hw < hw1; hw += rows) {
      const auto xv = load_pack<V>(x + base + hw * C);
      Pack<scalar_t, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) out.v[q] = static_cast<scalar_t>(activate((static_cast<acc_t>(xv.v[q]) - ks[q]) * al[q] + be[q], silu));
      store_pack<V>(y + base + hw * C, out);
    }
  }
}

// =====================================================================================================
// Backward
// =====================================================================================================

// Per element, in the group's shifted coordinates (xs = x - k, ms = mean - k): a = xs alpha + beta,
// da = dy silu'(a) (or dy); accumulate S1 += da, S2' += da (xs - ms) = da (x - mean).
template <typename acc_t>
__device__ __forceinline__ void bwd_terms(acc_t xs, acc_t dya, acc_t al, acc_t be, acc_t ms, bool silu, acc_t& s1,
                                          acc_t& s2) {
  const acc_t da = act_grad(xs * al + be, dya, silu);
  s1 += da;
  s2 += da * (xs - ms);
}

// NCHW sums. Launch: grid (chunks, min(B*C, 65535)), block T. Plane s = (b, c) is the contiguous run
// of HW values at s*HW; block (j, s) recomputes the plane's alpha/beta, accumulates S1 and S2' over
// packs j*T + tid, stepping by chunks*T, and writes partial[(s * chunks + j) * 2 + {0, 1}] (double).
template <typename scalar_t, typename acc_t, int V>
__global__ void gnb_sums_nchw_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                     const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, Params<acc_t> p,
                                     int64_t B, int64_t C, int64_t G, int64_t HW, bool silu,
                                     double* __restrict__ partial) {
  __shared__ double sh[2 * kWarp];
  const int64_t S = B * C, npack = HW / V, Cg = C / G;
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const int64_t b = s / C, c = s % C, bg = b * G + c / Cg;
    const acc_t k = group_shift<scalar_t, acc_t>(x, b, c / Cg, C, Cg, HW, false);
    // the shifted mean in double, as gnb_group_kernel forms it (the same alpha, beta in both passes)
    const double md = static_cast<double>(mean[bg]) - static_cast<double>(k);
    const acc_t m = static_cast<acc_t>(md);
    const auto cf = channel_coef(p, md, rstd[bg], b, c, C);
    const scalar_t* xs = x + s * HW;
    const scalar_t* gs = dy + s * HW;
    acc_t s1 = 0, s2 = 0;
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      const auto xv = load_pack<V>(xs + i * V);
      const auto gv = load_pack<V>(gs + i * V);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        bwd_terms(static_cast<acc_t>(xv.v[q]) - k, static_cast<acc_t>(gv.v[q]), cf.alpha, cf.beta, m, silu, s1, s2);
      }
    }
    block_sum2_store(s1, s2, sh, partial + (s * gridDim.x + blockIdx.x) * 2);
  }
}

// channels_last sums. Launch: like gn_stats_cl_kernel. Thread (lane, row) recomputes alpha/beta of
// its V channels once, accumulates S1 and S2' over its rows, a fixed tree over rows follows, and
// row 0 writes partial[((b * chunks + j) * C + c) * 2 + {0, 1}] (double).
template <typename scalar_t, typename acc_t, int V>
__global__ void gnb_sums_cl_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, Params<acc_t> p,
                                   int64_t B, int64_t C, int64_t G, int64_t HW, int64_t rpc, bool silu,
                                   double* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x, row = threadIdx.y, lanes = blockDim.x, rows = blockDim.y;
  acc_t* t1 = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* t2 = t1 + rows * lanes * V;
  const int64_t cv = static_cast<int64_t>(blockIdx.z) * lanes + lane;
  const bool active = cv < C / V;
  const int64_t Cg = C / G;
  const int64_t hw0 = blockIdx.x * rpc, hw1 = std::min(HW, hw0 + rpc);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc_t al[V], be[V], mu[V], ks[V], s1[V], s2[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
      s1[q] = 0;
      s2[q] = 0;
      al[q] = 0;
      be[q] = 0;
      mu[q] = 0;
      ks[q] = 0;
      if (active) {
        const int64_t c = cv * V + q, bg = b * G + c / Cg;
        ks[q] = group_shift<scalar_t, acc_t>(x, b, c / Cg, C, Cg, HW, true);
        const double md = static_cast<double>(mean[bg]) - static_cast<double>(ks[q]);  // as gnb_group_kernel
        mu[q] = static_cast<acc_t>(md);
        const auto cf = channel_coef(p, md, rstd[bg], b, c, C);
        al[q] = cf.alpha;
        be[q] = cf.beta;
      }
    }
    if (active) {
      const int64_t base = b * HW * C + cv * V;
      int64_t hw = hw0 + row;
      for (; hw + 3 * rows < hw1; hw += 4 * rows) {
        Pack<scalar_t, V> xv[4], gv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          xv[u] = load_pack<V>(x + base + (hw + u * rows) * C);
          gv[u] = load_pack<V>(dy + base + (hw + u * rows) * C);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int q = 0; q < V; ++q) {
            bwd_terms(static_cast<acc_t>(xv[u].v[q]) - ks[q], static_cast<acc_t>(gv[u].v[q]), al[q], be[q], mu[q],
                      silu, s1[q], s2[q]);
          }
        }
      }
      for (; hw < hw1; hw += rows) {
        const auto xv = load_pack<V>(x + base + hw * C);
        const auto gv = load_pack<V>(dy + base + hw * C);
#pragma unroll
        for (int q = 0; q < V; ++q) {
          bwd_terms(static_cast<acc_t>(xv.v[q]) - ks[q], static_cast<acc_t>(gv.v[q]), al[q], be[q], mu[q], silu, s1[q],
                    s2[q]);
        }
      }
    }
    row_tree_sum2<V>(s1, s2, t1, t2, partial + ((b * gridDim.x + blockIdx.x) * C + cv * V) * 2, active);
  }
}

// Channel finalize. Launch: grid (ceil(C / 32), min(B, 65535)), block (32, 16). Thread (lane, r)
// of block (t, b) adds the partials j = r, r + 16, ... of channel c = 32 t + lane (entry
// (b, c, j) at partial[(b*sB + c*sC + j*sJ) * 2]), a fixed tree over r follows; row 0 writes
// S1, S2 = rstd S2' (double, ws_s[(b*C + c)*2 + {0,1}]) and dshift = S1, dscale = w S2 + bias S1.
constexpr int kChanRows = 16;

template <typename acc_t>
__global__ void gnb_channel_kernel(const double* __restrict__ partial, int64_t B, int64_t C, int64_t G, int64_t chunks,
                                   int64_t sB, int64_t sC, int64_t sJ, const acc_t* __restrict__ rstd, Params<acc_t> p,
                                   double* __restrict__ ws_s, acc_t* __restrict__ dscale, acc_t* __restrict__ dshift) {
  __shared__ double t1[kChanRows][kWarp], t2[kChanRows][kWarp];
  const int lane = threadIdx.x, r = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + lane, Cg = C / G;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    double d1 = 0, d2 = 0;
    if (c < C) {
#pragma unroll 4
      for (int64_t j = r; j < chunks; j += kChanRows) {
        const double* e = partial + (b * sB + c * sC + j * sJ) * 2;
        d1 += e[0];
        d2 += e[1];
      }
    }
    t1[r][lane] = d1;
    t2[r][lane] = d2;
    for (int live = kChanRows; live > 1; live /= 2) {
      __syncthreads();
      if (r < live / 2) {
        t1[r][lane] += t1[r + live / 2][lane];
        t2[r][lane] += t2[r + live / 2][lane];
      }
    }
    __syncthreads();
    if (r == 0 && c < C) {
      const int64_t bc = b * C + c;
      const double S1 = t1[0][lane];
      const double S2 = static_cast<double>(rstd[b * G + c / Cg]) * t2[0][lane];
      ws_s[bc * 2] = S1;
      ws_s[bc * 2 + 1] = S2;
      if (dshift != nullptr) dshift[bc] = static_cast<acc_t>(S1);
      if (dscale != nullptr) {
        dscale[bc] = static_cast<acc_t>(static_cast<double>(param_w(p, c)) * S2 +
                                        static_cast<double>(param_b(p, c)) * S1);
      }
    }
    __syncthreads();
  }
}

// Group finalize. Launch: grid (ceil(B*G / 8)), block 256 = 8 warps, one warp per group (b, g).
// Lanes walk the group's channels: A = sum k S1 / n, B = sum k S2 / n with k = (1 + s) w (double,
// fixed shuffle tree), then per channel alpha/beta (math::gnms_coef), c1, c2, c3
// (math::gnms_grad_coef), both from the shifted mean, and the group's shift into coef (6 arrays
// of B*C acc_t).
template <typename scalar_t, typename acc_t>
__global__ void gnb_group_kernel(const double* __restrict__ ws_s, const scalar_t* __restrict__ x,
                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, Params<acc_t> p,
                                 int64_t B, int64_t C, int64_t G, int64_t HW, bool cl, acc_t* __restrict__ coef) {
  const int lane = threadIdx.x % kWarp;
  const int64_t bg = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (bg >= B * G) return;  // whole warps leave together
  const int64_t b = bg / G, g = bg % G, Cg = C / G, BC = B * C;
  double A = 0, Bv = 0;
  for (int64_t c = g * Cg + lane; c < (g + 1) * Cg; c += kWarp) {
    const int64_t bc = b * C + c;
    const double k = (1.0 + static_cast<double>(param_s(p, bc))) * static_cast<double>(param_w(p, c));
    A += k * ws_s[bc * 2];
    Bv += k * ws_s[bc * 2 + 1];
  }
  A = __shfl_sync(0xffffffffu, warp_sum(A), 0);
  Bv = __shfl_sync(0xffffffffu, warp_sum(Bv), 0);
  const double n = static_cast<double>(Cg * HW);
  A /= n;
  Bv /= n;
  const acc_t ks = group_shift<scalar_t, acc_t>(x, b, g, C, Cg, HW, cl);
  const double m = static_cast<double>(mean[bg]) - static_cast<double>(ks), r = rstd[bg];  // shifted mean
  for (int64_t c = g * Cg + lane; c < (g + 1) * Cg; c += kWarp) {
    const int64_t bc = b * C + c;
    const auto cf = channel_coef(p, m, r, b, c, C);
    const double k = (1.0 + static_cast<double>(param_s(p, bc))) * static_cast<double>(param_w(p, c));
    const auto gc = math::gnms_grad_coef<double>(m, r, k, A, Bv);
    coef[bc] = cf.alpha;
    coef[BC + bc] = cf.beta;
    coef[2 * BC + bc] = static_cast<acc_t>(gc.c1);
    coef[3 * BC + bc] = static_cast<acc_t>(gc.c2);
    coef[4 * BC + bc] = static_cast<acc_t>(gc.c3);
    coef[5 * BC + bc] = ks;
  }
}

// dweight/dbias. Launch: grid (ceil(C / 256)), block 256; thread c adds over b in order:
// dweight[c] = sum (1 + s) S2, dbias[c] = sum (1 + s) S1 (double).
template <typename acc_t>
__global__ void gnb_param_kernel(const double* __restrict__ ws_s, Params<acc_t> p, int64_t B, int64_t C,
                                 acc_t* __restrict__ dweight, acc_t* __restrict__ dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double dw = 0, db = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t bc = b * C + c;
    const double m = 1.0 + static_cast<double>(param_s(p, bc));
    dw += m * ws_s[bc * 2 + 1];
    db += m * ws_s[bc * 2];
  }
  if (dweight != nullptr) dweight[c] = static_cast<acc_t>(dw);
  if (dbias != nullptr) dbias[c] = static_cast<acc_t>(db);
}

// dx = da c1 + (x - k) c2 + c3 for one element; coefficients k = (alpha, beta, c1, c2, c3, shift).
constexpr int kCoefs = 6;

template <typename acc_t>
__device__ __forceinline__ acc_t bwd_dx(acc_t xa, acc_t dya, const acc_t* k, bool silu) {
  const acc_t xs = xa - k[5];
  const acc_t da = act_grad(xs * k[0] + k[1], dya, silu);
  return da * k[2] + (xs * k[3] + k[4]);
}

// NCHW backward apply. Launch: like gn_apply_nchw_kernel.
template <typename scalar_t, typename acc_t, int V>
__global__ void gnb_apply_nchw_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      const acc_t* __restrict__ coef, int64_t B, int64_t C, int64_t HW, bool silu,
                                      scalar_t* __restrict__ dx) {
  const int64_t N = C * HW, npack = N / V, BC = B * C;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t i = grid_stride_first(); i < npack; i += grid_stride_step()) {
      const int64_t c = static_cast<uint32_t>(i * V) / static_cast<uint32_t>(HW);
      const int64_t bc = b * C + c;
      acc_t k[kCoefs];
#pragma unroll
      for (int e = 0; e < kCoefs; ++e) k[e] = coef[e * BC + bc];
      const int64_t o = b * N + i * V;
      const auto xv = load_pack<V>(x + o);
      const auto gv = load_pack<V>(dy + o);
      Pack<scalar_t, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) {
        out.v[q] = static_cast<scalar_t>(bwd_dx(static_cast<acc_t>(xv.v[q]), static_cast<acc_t>(gv.v[q]), k, silu));
      }
      store_pack<V>(dx + o, out);
    }
  }
}

// channels_last backward apply. Launch: like gn_apply_cl_kernel; each thread loads the six
// coefficients of its V channels once.
template <typename scalar_t, typename acc_t, int V>
__global__ void gnb_apply_cl_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                    const acc_t* __restrict__ coef, int64_t B, int64_t C, int64_t HW, int64_t rpc,
                                    bool silu, scalar_t* __restrict__ dx) {
  const int lane = threadIdx.x, row = threadIdx.y, lanes = blockDim.x, rows = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.z) * lanes + lane;
  if (cv >= C / V) return;
  const int64_t hw0 = blockIdx.x * rpc, hw1 = std::min(HW, hw0 + rpc), BC = B * C;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc_t k[V][kCoefs];
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const int64_t bc = b * C + cv * V + q;
#pragma unroll
      for (int e = 0; e < kCoefs; ++e) k[q][e] = coef[e * BC + bc];
    }
    const int64_t base = b * HW * C + cv * V;
    int64_t hw = hw0 + row;
    for (; hw + 3 * rows < hw1; hw += 4 * rows) {
      Pack<scalar_t, V> xv[4], gv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        xv[u] = load_pack<V>(x + base + (hw + u * rows) * C);
        gv[u] = load_pack<V>(dy + base + (hw + u * rows) * C);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        Pack<scalar_t, V> out;
#pragma unroll
        for (int q = 0; q < V; ++q) {
          out.v[q] = static_cast<scalar_t>(bwd_dx(static_cast<acc_t>(xv[u].v[q]), static_cast<acc_t>(gv[u].v[q]), k[q], silu));
        }
        store_pack<V>(dx + base + (hw + u * rows) * C, out);
      }
    }
    for (; hw < hw1; hw += rows) {
      const auto xv = load_pack<V>(x + base + hw * C);
      const auto gv = load_pack<V>(dy + base + hw * C);
      Pack<scalar_t, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) {
        out.v[q] = static_cast<scalar_t>(bwd_dx(static_cast<acc_t>(xv.v[q]), static_cast<acc_t>(gv.v[q]), k[q], silu));
      }
      store_pack<V>(dx + base + hw * C, out);
    }
  }
}

// =====================================================================================================
// Host wrappers
// =====================================================================================================
constexpr const char* kOp = "group_norm_modulate_silu";

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_inputs(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& shift, const char* op) {
  check_floating(x, op, "x");
  check_is_cuda(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, op, ": x is empty, shape ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, op, ": ", C, " channels are not divisible by ", groups, " groups");
  TORCH_CHECK(x.numel() / B < std::numeric_limits<int32_t>::max(), op, ": a sample of x has ", x.numel() / B,
              " values; at most 2^31 - 1 are supported");
  auto check_opt = [&](const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) {
    if (!has(t)) return;
    check_floating(*t, op, name);
    check_same_device(*t, x, op, name, "x");
    check_shape(*t, shape, op, name);
  };
  check_opt(weight, "weight", {C});
  check_opt(bias, "bias", {C});
  check_opt(scale, "scale", {B, C});
  check_opt(shift, "shift", {B, C});
}

at::Tensor opt_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return has(t) ? t->to(acc).contiguous() : at::Tensor();
}

template <typename acc_t>
Params<acc_t> params_of(const at::Tensor& w, const at::Tensor& b, const at::Tensor& s, const at::Tensor& sh) {
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
  return {ptr(w), ptr(b), ptr(s), ptr(sh)};
}

// channels_last when x's strides say so and it is not also NCHW-contiguous (C == 1 or H*W == 1
// index identically either way), as in the CPU kernels.
bool is_channels_last(const at::Tensor& xc) { return !xc.is_contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> gnms_cuda(const at::Tensor& x, int64_t groups,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& scale,
                                                         const std::optional<at::Tensor>& shift, double eps, bool silu) {
  check_inputs(x, groups, weight, bias, scale, shift, kOp);
  TORCH_CHECK(eps >= 0, kOp, ": eps must be >= 0, got ", eps);
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous(preferred_format(x));
  const bool cl = is_channels_last(xc);
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3), G = groups, Cg = C / G;
  const auto acc = opmath_dtype(x.scalar_type());
  auto y = at::empty_like(xc);
  auto mean = at::empty({B, G}, xc.options().dtype(acc));
  auto rstd = at::empty({B, G}, xc.options().dtype(acc));
  const auto w = opt_acc(weight, acc), bi = opt_acc(bias, acc), sc = opt_acc(scale, acc), sh = opt_acc(shift, acc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_modulate_silu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> p = params_of<acc_t>(w, bi, sc, sh);
    const bool packed = packable<scalar_t>(cl ? C : HW, xc.const_data_ptr(), y.const_data_ptr());
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      acc_t* mp = mean.mutable_data_ptr<acc_t>();
      acc_t* rp = rstd.mutable_data_ptr<acc_t>();
      int64_t chunks = 0;
      at::Tensor partial;
      if (!cl) {
        const ReducePlan plan = plan_reduce(Cg * HW / V, B * G);
        // Dynamic and static shared memory (the kernel's block-sum scratch, 2 * kWarp doubles) together
        // within the 48 KiB a launch gets without cudaFuncSetAttribute.
        const size_t fused_smem = 2 * Cg * sizeof(acc_t);
        if (plan.chunks == 1 && fused_smem + 2 * kWarp * sizeof(double) <= 48 * 1024) {
          const int64_t grid = std::min<int64_t>(B * G, std::numeric_limits<int32_t>::max());
          gn_fused_nchw_kernel<scalar_t, acc_t, V><<<grid, plan.threads, fused_smem, stream>>>(
              xp, B * G, G, Cg, HW, eps, p, silu, yp, mp, rp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        chunks = plan.chunks;
        partial = at::empty({B * G * chunks * 2}, xc.options().dtype(at::kDouble));
        const dim3 grid(chunks, std::min(B * G, kMaxGridY));
        gn_stats_nchw_kernel<scalar_t, acc_t, V><<<grid, plan.threads, 0, stream>>>(
            xp, B * G, Cg * HW, partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const TilePlan plan = plan_tiles(C / V, HW, B);
        chunks = plan.chunks;
        partial = at::empty({B * chunks * C * 2}, xc.options().dtype(at::kDouble));
        const dim3 grid(chunks, std::min(B, kMaxGridY), plan.ctiles), block(plan.lanes, plan.rows);
        const size_t smem = 2 * plan.rows * plan.lanes * V * sizeof(acc_t);
        gn_stats_cl_kernel<scalar_t, acc_t, V><<<grid, block, smem, stream>>>(
            xp, B, C, HW, Cg, plan.rows_per_chunk, partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      auto coef = at::empty({3, B, C}, xc.options().dtype(acc));
      acc_t* alpha = coef.mutable_data_ptr<acc_t>();
      acc_t* beta = alpha + B * C;
      acc_t* kshift = beta + B * C;
      const int64_t groups = std::min<int64_t>(B * G, std::numeric_limits<int32_t>::max());
      gn_finalize_kernel<scalar_t, acc_t><<<groups, 128, 0, stream>>>(xp, partial.const_data_ptr<double>(), B * G, G,
                                                                     Cg, HW, chunks, cl, eps, p, mp, rp, alpha, beta,
                                                                     kshift);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!cl) {
        const dim3 grid(apply_blocks(C * HW / V, B), std::min(B, kMaxGridY));
        gn_apply_nchw_kernel<scalar_t, acc_t, V><<<grid, kApplyThreads, 0, stream>>>(xp, alpha, beta, kshift, B, C, HW, silu,
                                                                                     yp);
      } else {
        const TilePlan plan = plan_tiles(C / V, HW, B);
        const dim3 grid(plan.chunks, std::min(B, kMaxGridY), plan.ctiles), block(plan.lanes, plan.rows);
        gn_apply_cl_kernel<scalar_t, acc_t, V><<<grid, block, 0, stream>>>(xp, alpha, beta, kshift, B, C, HW,
                                                                         plan.rows_per_chunk, silu, yp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_pack_width<scalar_t>(packed, launch);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gnms_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool silu) {
  constexpr const char* op = "group_norm_modulate_silu_backward";
  check_inputs(x, groups, weight, bias, scale, shift, op);
  check_floating(grad_y, op, "grad_y");
  check_same_device(grad_y, x, op, "grad_y", "x");
  check_floating(mean, op, "mean");
  check_floating(rstd, op, "rstd");
  check_same_device(mean, x, op, "mean", "x");
  check_same_device(rstd, x, op, "rstd", "x");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y ", grad_y.sizes(), " and x ", x.sizes(), " differ in shape");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = groups;
  TORCH_CHECK(mean.numel() == B * G && rstd.numel() == B * G, op, ": mean and rstd must have shape (", B, ", ", G,
              "), got ", mean.sizes(), " and ", rstd.sizes());

  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = preferred_format(x);
  const auto xc = x.contiguous(fmt);
  const auto gc = grad_y.to(x.scalar_type()).contiguous(fmt);
  const bool cl = is_channels_last(xc);
  const auto acc = opmath_dtype(x.scalar_type());
  const auto mc = mean.to(acc).contiguous(), rc = rstd.to(acc).contiguous();
  const auto w = opt_acc(weight, acc), bi = opt_acc(bias, acc), sc = opt_acc(scale, acc), sh = opt_acc(shift, acc);
  auto dx = at::empty_like(xc);
  auto acc_or_empty = [&](const std::optional<at::Tensor>& t, at::IntArrayRef shape) {
    return has(t) ? at::empty(shape, xc.options().dtype(acc)) : at::Tensor();
  };
  auto dw = acc_or_empty(weight, {C}), db = acc_or_empty(bias, {C});
  auto ds = acc_or_empty(scale, {B, C}), dsh = acc_or_empty(shift, {B, C});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_modulate_silu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> p = params_of<acc_t>(w, bi, sc, sh);
    const bool packed = packable<scalar_t>(cl ? C : HW, xc.const_data_ptr(), gc.const_data_ptr(), dx.const_data_ptr());
    auto data = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<acc_t>() : nullptr; };
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      const scalar_t* gp = gc.const_data_ptr<scalar_t>();
      const acc_t* mp = mc.const_data_ptr<acc_t>();
      const acc_t* rp = rc.const_data_ptr<acc_t>();
      // 1. per-(sample, channel) partial sums
      int64_t chunks, sB, sC, sJ;
      at::Tensor partial;
      TilePlan tiles{};
      if (!cl) {
        const ReducePlan plan = plan_reduce(HW / V, B * C);
        chunks = plan.chunks;
        sB = C * chunks, sC = chunks, sJ = 1;
        partial = at::empty({B * C * chunks * 2}, xc.options().dtype(at::kDouble));
        const dim3 grid(chunks, std::min(B * C, kMaxGridY));
        gnb_sums_nchw_kernel<scalar_t, acc_t, V><<<grid, plan.threads, 0, stream>>>(
            gp, xp, mp, rp, p, B, C, G, HW, silu, partial.mutable_data_ptr<double>());
      } else {
        tiles = plan_tiles(C / V, HW, B);
        chunks = tiles.chunks;
        sB = chunks * C, sC = 1, sJ = C;
        partial = at::empty({B * chunks * C * 2}, xc.options().dtype(at::kDouble));
        const dim3 grid(chunks, std::min(B, kMaxGridY), tiles.ctiles), block(tiles.lanes, tiles.rows);
        const size_t smem = 2 * tiles.rows * tiles.lanes * V * sizeof(acc_t);
        gnb_sums_cl_kernel<scalar_t, acc_t, V><<<grid, block, smem, stream>>>(
            gp, xp, mp, rp, p, B, C, G, HW, tiles.rows_per_chunk, silu, partial.mutable_data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // 2. per-channel S1, S2, dscale, dshift
      auto ws_s = at::empty({B * C * 2}, xc.options().dtype(at::kDouble));
      {
        const dim3 grid(ceil_div(C, kWarp), std::min(B, kMaxGridY)), block(kWarp, kChanRows);
        gnb_channel_kernel<acc_t><<<grid, block, 0, stream>>>(partial.const_data_ptr<double>(), B, C, G, chunks, sB,
                                                              sC, sJ, rp, p, ws_s.mutable_data_ptr<double>(), data(ds),
                                                              data(dsh));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // 3. per-group coefficients
      auto coef = at::empty({kCoefs, B, C}, xc.options().dtype(acc));
      {
        constexpr int kWarpsPerBlock = 8;
        gnb_group_kernel<scalar_t, acc_t><<<ceil_div(B * G, kWarpsPerBlock), kWarpsPerBlock * kWarp, 0, stream>>>(
            ws_s.const_data_ptr<double>(), xp, mp, rp, p, B, C, G, HW, cl, coef.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // 4. dweight, dbias
      if (dw.defined() || db.defined()) {
        gnb_param_kernel<acc_t><<<ceil_div(C, 256), 256, 0, stream>>>(ws_s.const_data_ptr<double>(), p, B, C, data(dw),
                                                                      data(db));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // 5. dx
      if (!cl) {
        const dim3 grid(apply_blocks(C * HW / V, B), std::min(B, kMaxGridY));
        gnb_apply_nchw_kernel<scalar_t, acc_t, V><<<grid, kApplyThreads, 0, stream>>>(
            gp, xp, coef.const_data_ptr<acc_t>(), B, C, HW, silu, dx.mutable_data_ptr<scalar_t>());
      } else {
        const dim3 grid(tiles.chunks, std::min(B, kMaxGridY), tiles.ctiles), block(tiles.lanes, tiles.rows);
        gnb_apply_cl_kernel<scalar_t, acc_t, V><<<grid, block, 0, stream>>>(
            gp, xp, coef.const_data_ptr<acc_t>(), B, C, HW, tiles.rows_per_chunk, silu, dx.mutable_data_ptr<scalar_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_pack_width<scalar_t>(packed, launch);
  });

  // Gradients in the parameters' dtypes; absent inputs get empty (0,) tensors (like the CPU op).
  auto finish = [&](const at::Tensor& g, const std::optional<at::Tensor>& t) {
    return has(t) ? g.to(t->scalar_type()) : at::empty({0}, x.options());
  };
  return {dx, finish(dw, weight), finish(db, bias), finish(ds, scale), finish(dsh, shift)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, CUDA, m) {
  m.impl("group_norm_modulate_silu", &gnms_cuda);
  m.impl("group_norm_modulate_silu_backward", &gnms_backward_cuda);
}

}  // namespace dito_fast
