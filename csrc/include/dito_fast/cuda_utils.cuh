// Small helpers shared by the CUDA kernels of dito_fast's fused ops (csrc/ops/*/*_cuda.cu):
// 16-byte vector packs, deterministic warp/block reductions, grid sizing from the SM count,
// alignment and device checks. Header-only (nvcc only): __device__ __forceinline__ device code and
// inline host functions in dito_fast::cuda. Per-element math lives in dito_fast/math.h.
//
// Every reduction here uses a fixed shuffle tree, fixed shared-memory trees and fixed orders (no
// atomics), so results repeat exactly for a given launch shape; the grid sizing depends only on
// the problem shape and the SM count, so a given GPU model always gets the same launch shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <dito_fast/check.h>

namespace dito_fast {
namespace cuda {

constexpr int kWarp = 32;
constexpr int64_t kMaxGridY = 65535;

// ---- 16-byte vector packs ------------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Elements per 16-byte pack: 4 float, 8 half/bfloat16, 2 double.
template <typename scalar_t>
constexpr int pack_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether rows of n elements can be processed in packs: n is a multiple of the pack width and
// every pointer is 16-byte aligned (checked left to right).
template <typename scalar_t, typename... Ptrs>
inline bool packable(int64_t n, Ptrs... ptrs) {
  return n % pack_width<scalar_t>() == 0 && (aligned16(ptrs) && ...);
}

// Calls launch(std::integral_constant<int, V>{}) with V = the pack width of scalar_t when packed,
// else with V = 1 (one element at a time).
template <typename scalar_t, typename F>
inline void with_pack_width(bool packed, F&& launch) {
  if (packed) launch(std::integral_constant<int, pack_width<scalar_t>()>{});
  else launch(std::integral_constant<int, 1>{});
}

// ---- thread indexing -------------------------------------------------------------------------------
// Grid-stride loops along x: for (i = grid_stride_first(); i < n; i += grid_stride_step()).
__device__ __forceinline__ int64_t grid_stride_first() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride_step() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ---- reductions --------------------------------------------------------------------------------------
// Sum over the warp; the total is valid in lane 0 (fixed shuffle tree: deterministic).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sums each of v[0..K) over the block (blockDim.x * blockDim.y a multiple of 32, threads numbered
// x fastest) and returns the totals to every thread. Fixed shuffle/shared-memory tree:
// deterministic. sh: K * 32 values.
template <int K, typename T>
__device__ __forceinline__ void block_sum_n(T (&v)[K], T* sh) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x * blockDim.y / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sh[k * kWarp + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = lane < nwarps ? sh[k * kWarp + lane] : T(0);
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) sh[k * kWarp] = v[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = sh[k * kWarp];
}

// Sum of v over the block, returned to every thread. sh: 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
  T r[1] = {v};
  block_sum_n(r, sh);
  return r[0];
}

// Sums a and b over the block and returns them to every thread. sh: 2 * 32 values.
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b, T* sh) {
  T r[2] = {a, b};
  block_sum_n(r, sh);
  a = r[0];
  b = r[1];
}

// Sums (s1, s2) over the block in double (block_sum2) and has thread (0, 0) write them to
// out[0], out[1]. sh: 2 * 32 doubles.
template <typename acc_t>
__device__ __forceinline__ void block_sum2_store(acc_t s1, acc_t s2, double* sh, double* out) {
  double d1 = s1, d2 = s2;
  block_sum2(d1, d2, sh);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    out[0] = d1;
    out[1] = d2;
  }
}

// Adds the pairs (p[2j], p[2j + 1]) for j = threadIdx.x, threadIdx.x + blockDim.x, ... < n to
// (a, b), in index order.
__device__ __forceinline__ void add_pairs_strided(const double* p, int64_t n, double& a, double& b) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    a += p[j * 2];
    b += p[j * 2 + 1];
  }
}

// Shifted sums of a run of packs: s1 += x - k and s2 += (x - k)^2 over the values of packs
// first, first + step, ... < npack of x, accumulated in acc_t in that order.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void shifted_sums(const scalar_t* x, int64_t npack, int64_t first, int64_t step, acc_t k,
                                             acc_t& s1, acc_t& s2) {
  for (int64_t i = first; i < npack; i += step) {
    const auto xv = load_pack<V>(x + i * V);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const acc_t d = static_cast<acc_t>(xv.v[q]) - k;
      s1 += d;
      s2 += d * d;
    }
  }
}

// The stats pass of a chunked per-segment reduction. Launch: grid (chunks, min(S, 65535)), 1-d
// block of T threads. Block (j, s) (s grid-strided along y) accumulates shifted sums (x - k) and
// (x - k)^2, k = the segment's first value, over the packs j*T + tid, stepping by chunks*T, of
// segment s (the L values at x + s*L), and writes the block sums as
// partial[(s * chunks + j) * 2 + {0, 1}] (double). sh: 2 * 32 doubles.
template <typename acc_t, int V, typename scalar_t>
__device__ __forceinline__ void chunked_shifted_sums(const scalar_t* x, int64_t S, int64_t L, double* partial,
                                                     double* sh) {
  const int64_t npack = L / V;
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const scalar_t* xs = x + s * L;
    const acc_t k = static_cast<acc_t>(xs[0]);
    acc_t s1 = 0, s2 = 0;
    shifted_sums<V>(xs, npack, grid_stride_first(), grid_stride_step(), k, s1, s2);
    block_sum2_store(s1, s2, sh, partial + (s * gridDim.x + blockIdx.x) * 2);
  }
}

// The CUDA twin of the CPU kernels' refine_overflowed_moments (cpu_vec.h): finite values with
// |x - k| above ~1.8e19 overflow float partial sums of squares, and rstd would come out 0 (the
// output silently 0, or silu of the bias). Where the block's totals d1, d2 (block_sum2'd, so the
// same in every thread) are not finite, the block sums the group's values again in double (rows
// of row_len values, row_stride apart, shifted by k), and those sums replace d1, d2 when finite;
// a group holding inf or NaN keeps its non-finite totals. Only that rare path pays the extra
// pass. Every thread of the block must call it. sh: 2 * 32 doubles.
template <typename scalar_t>
__device__ void refine_overflowed_sums(const scalar_t* x, int64_t rows, int64_t row_len, int64_t row_stride,
                                       double k, double& d1, double& d2, double* sh) {
  if (isfinite(d1) && isfinite(d2)) return;
  const int64_t tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  double e1 = 0, e2 = 0;
  for (int64_t i = tid; i < rows * row_len; i += nt) {
    const double d = static_cast<double>(x[(i / row_len) * row_stride + i % row_len]) - k;
    e1 += d;
    e2 += d * d;
  }
  block_sum2(e1, e2, sh);
  if (isfinite(e1) && isfinite(e2)) {
    d1 = e1;
    d2 = e2;
  }
}

// Sum and dot product of two runs of packs: s1 += a and s2 += a b over the values of packs
// first, first + step, ... < npack, accumulated in acc_t in that order.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void sum_and_dot(const scalar_t* a, const scalar_t* b, int64_t npack, int64_t first,
                                            int64_t step, acc_t& s1, acc_t& s2) {
  for (int64_t i = first; i < npack; i += step) {
    const auto av = load_pack<V>(a + i * V);
    const auto bv = load_pack<V>(b + i * V);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const acc_t aa = static_cast<acc_t>(av.v[q]);
      s1 += aa;
      s2 += aa * static_cast<acc_t>(bv.v[q]);
    }
  }
}

// Column sums over the rows of a (lanes x rows) block, V values per thread: thread (lane, row)
// stores s1[q], s2[q] at t1/t2[(row * lanes + lane) * V + q], a fixed tree over rows (halving,
// odd counts rounded up) leaves the totals in row 0, and thread (lane, 0) writes them as doubles
// to out[2q], out[2q + 1] when `write` (out is not dereferenced otherwise). Every thread of the
// block must call it; it ends with a barrier, so t1/t2 may be rewritten right after. t1, t2:
// rows * lanes * V values each.
template <int V, typename T>
__device__ __forceinline__ void row_tree_sum2(const T (&s1)[V], const T (&s2)[V], T* t1, T* t2, double* out,
                                              bool write) {
  const int lane = threadIdx.x, row = threadIdx.y, lanes = blockDim.x, rows = blockDim.y;
  const int o = (row * lanes + lane) * V;
#pragma unroll
  for (int q = 0; q < V; ++q) {
    t1[o + q] = s1[q];
    t2[o + q] = s2[q];
  }
  for (int live = rows; live > 1;) {
    const int half = (live + 1) / 2;
    __syncthreads();
    if (row + half < live) {
      const int o2 = ((row + half) * lanes + lane) * V;
#pragma unroll
      for (int q = 0; q < V; ++q) {
        t1[o + q] += t1[o2 + q];
        t2[o + q] += t2[o2 + q];
      }
    }
    live = half;
  }
  __syncthreads();
  if (row == 0 && write) {
#pragma unroll
    for (int q = 0; q < V; ++q) {
      out[2 * q] = t1[lane * V + q];
      out[2 * q + 1] = t2[lane * V + q];
    }
  }
  __syncthreads();  // t1/t2 may be rewritten after the call
}

// ---- grid sizing (host) ------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

// Blocks along x per sample: enough for every thread to get min_per_thread of the `work` items,
// capped so that all samples together (at most 65535 along y) make at most `waves` full waves of
// `threads`-thread blocks (2048 resident threads per SM), and at most `cap`; at least 1.
inline int64_t blocks_per_sample(int64_t work, int64_t samples, int threads, int64_t min_per_thread, int waves,
                                 int64_t cap = int64_t{1} << 20) {
  const int64_t by_work = ceil_div(work, threads * min_per_thread);
  const int64_t resident = static_cast<int64_t>(sm_count()) * (2048 / threads) * waves;
  const int64_t by_occupancy = resident / std::min(samples, kMaxGridY);
  return std::max<int64_t>(1, std::min({by_work, by_occupancy, cap}));
}

// Block shape for per-segment reductions over `npack` packs (a sample, an NCHW group or plane):
// up to 512 threads, fewer for short segments (a multiple of 32). Chunks per segment: each thread
// gets >= 4 packs, and all segments together make at most one full wave of blocks (so no tail
// wave), at most 4096.
struct ReducePlan {
  int threads;
  int64_t chunks;
};

inline ReducePlan plan_reduce(int64_t npack, int64_t segments) {
  const int64_t t = std::min<int64_t>(512, std::max<int64_t>(kWarp, ceil_div(npack, kWarp) * kWarp));
  const int threads = static_cast<int>(t);
  return {threads, blocks_per_sample(npack, segments, threads, 4, 1, 4096)};
}

// ---- host checks and dtypes ----------------------------------------------------------------------------
// The accumulation dtype of a tensor dtype (at::opmath_type): double for double, else float.
inline at::ScalarType opmath_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_is_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

// t is a CUDA tensor on ref's device.
inline void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  check_is_cuda(t, op, name);
  check_same_device(t, ref, op, name, ref_name);
}

}  // namespace cuda
}  // namespace dito_fast
