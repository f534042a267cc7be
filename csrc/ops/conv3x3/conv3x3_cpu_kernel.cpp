// Winograd F(MxM, 3x3) transforms of the 3x3 convolution (stride 1, padding 1), for output tiles of
// M = 2 or M = 4, compiled once per CPU capability. All activations are NHWC with contiguous
// channels (channels_last, or a channel slice of a channels_last tensor, read in place: struct
// Strides); every transform is vectorised over the channel dimension, so a tile's values of one
// channel never leave registers (or L1). Notation (Lavin & Gray 2016): with an
// N x N input patch d (N = M + 2), a 3x3 filter g and an M x M output y,
// y = A^T [(G g G^T) . (B^T d B)] A. The 1-D matrices are in struct Tr<M> below; G is applied to
// the filter in Python (dito_fast/ops/conv3x3.py, with its adjoint for the weight gradient).
//
// Tiles: the output is covered by th x tw tiles of M x M (th = ceil(H / M)); tile index
// t = (b * th + ty) * tw + tx. A chunk is the tiles [t0, t0 + n); Winograd-domain buffers are
// (N*N, n, C) with C contiguous: position k = N i + j of the N x N tile, then tile, then channel.
//
// The filter transform U = G g G^T of every 3x3 filter g and its adjoint dg = G^T dU G (the weight
// gradient from the Winograd-domain one) are here too, vectorised over C_in.
//
// flip (the input gradient): the transforms read and write the image rotated by 180 degrees.
// The input gradient of a correlation with g is the correlation with g flipped, which equals the
// flipped correlation of the flipped image with g itself, so one transformed filter serves both.
#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>

#include <ATen/native/CPUBlas.h>
#include <dito_fast/cpu_kernels.h>
#include <dito_fast/cpu_vec.h>

#include <vector>

namespace dito_fast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// The 1-D transforms: bt (u = B^T d, N -> N), at (y = A^T m, N -> M) and a (q = A e, M -> N, the
// adjoint of at, for the gradient of the output).
template <int M>
struct Tr;

template <>
struct Tr<2> {
  // B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1],
  // G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1].
  template <typename T>
  static void bt(const T* d, T* u) {
    u[0] = d[0] - d[2];
    u[1] = d[1] + d[2];
    u[2] = d[2] - d[1];
    u[3] = d[1] - d[3];
  }
  template <typename T>
  static void at(const T* m, T* y) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
  template <typename T>
  static void a(const T* e, T* q) {
    q[0] = e[0];
    q[1] = e[0] + e[1];
    q[2] = e[0] - e[1];
    q[3] = T(0) - e[1];
  }
  // the filter transform's G (3 -> N) and its adjoint G^T (N -> 3)
  template <typename T>
  static void g(const T* f, T* o) {
    const T half(0.5), p = half * (f[0] + f[2]), q = half * f[1];
    o[0] = f[0];
    o[1] = p + q;
    o[2] = p - q;
    o[3] = f[2];
  }
  template <typename T>
  static void gt(const T* e, T* o) {
    const T half(0.5), p = half * (e[1] + e[2]);
    o[0] = e[0] + p;
    o[1] = half * (e[1] - e[2]);
    o[2] = p + e[3];
  }
};

template <>
struct Tr<4> {
  // B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1],
  // A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1],
  // G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1].
  template <typename T>
  static void bt(const T* d, T* u) {
    const T four(4), five(5), two(2);
    const T p = d[4] - four * d[2], q = d[3] - four * d[1];
    const T r = d[4] - d[2], s = two * (d[3] - d[1]);
    u[0] = four * d[0] - five * d[2] + d[4];
    u[1] = p + q;
    u[2] = p - q;
    u[3] = r + s;
    u[4] = r - s;
    u[5] = four * d[1] - five * d[3] + d[5];
  }
  template <typename T>
  static void at(const T* m, T* y) {
    const T s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    y[0] = m[0] + s12 + s34;
    y[1] = d12 + T(2) * d34;
    y[2] = s12 + T(4) * s34;
    y[3] = d12 + T(8) * d34 + m[5];
  }
  template <typename T>
  static void a(const T* e, T* q) {
    const T p = e[0] + e[2], r = e[1] + e[3];
    const T p4 = e[0] + T(4) * e[2], r4 = T(2) * e[1] + T(8) * e[3];
    q[0] = e[0];
    q[1] = p + r;
    q[2] = p - r;
    q[3] = p4 + r4;
    q[4] = p4 - r4;
    q[5] = e[3];
  }
  template <typename T>
  static void g(const T* f, T* o) {
    const T p = T(-1.0 / 6) * (f[0] + f[2]), q = T(-1.0 / 6) * f[1];
    const T r = T(1.0 / 24) * f[0] + T(1.0 / 6) * f[2], s = T(1.0 / 12) * f[1];
    o[0] = T(0.25) * f[0];
    o[1] = p + q;
    o[2] = p - q;
    o[3] = r + s;
    o[4] = r - s;
    o[5] = f[2];
  }
  template <typename T>
  static void gt(const T* e, T* o) {
    const T s12 = e[1] + e[2], d12 = e[1] - e[2], s34 = e[3] + e[4], d34 = e[3] - e[4];
    o[0] = T(0.25) * e[0] - T(1.0 / 6) * s12 + T(1.0 / 24) * s34;
    o[1] = T(1.0 / 12) * d34 - T(1.0 / 6) * d12;
    o[2] = T(1.0 / 6) * (s34 - s12) + e[5];
  }
};

// Runs f(c, count) over [0, C) in full vectors, then one partial vector.
template <typename scalar_t, typename F>
inline void over_channels(int64_t C, F&& f) {
  constexpr int64_t V = Vec<scalar_t>::size();
  int64_t c = 0;
  for (; c + V <= C; c += V) f(c, V);
  if (c < C) f(c, C - c);
}

template <typename scalar_t>
inline Vec<scalar_t> ld(const scalar_t* p, int64_t n) {
  return n == Vec<scalar_t>::size() ? Vec<scalar_t>::loadu(p) : Vec<scalar_t>::loadu(p, n);
}

template <typename scalar_t>
inline void st(scalar_t* p, const Vec<scalar_t>& v, int64_t n) {
  if (n == Vec<scalar_t>::size()) v.store(p); else v.store(p, n);
}

// An NHWC image whose channels are contiguous: pixel (b, y, x) starts at b sb + y sy + x sx
// (dense channels_last: sx = C, sy = W C, sb = H W C; a channel slice of a wider tensor keeps that
// tensor's strides).
struct Strides {
  int64_t sb, sy, sx;
  explicit Strides(const at::TensorBase& t) : sb(t.stride(0)), sy(t.stride(2)), sx(t.stride(3)) {}
};

template <int M>
struct Tiles {
  int64_t H, W, th, tw;
  bool flip;
  Strides strides;
  Tiles(int64_t H_, int64_t W_, bool flip_, const Strides& strides_)
      : H(H_), W(W_), th((H_ + M - 1) / M), tw((W_ + M - 1) / M), flip(flip_), strides(strides_) {}
  void locate(int64_t t, int64_t& b, int64_t& y0, int64_t& x0) const {
    const int64_t tx = t % tw, rest = t / tw;
    b = rest / th;
    y0 = M * (rest % th);
    x0 = M * tx;
  }
  // ptr[r][s]: the channel values of pixel (y + r, x + s) of sample b of the (possibly flipped)
  // image at base, or outside (zeros to read, a sink to write) where that pixel is off the image.
  template <int K, typename T>
  void patch(int64_t b, int64_t y, int64_t x, T* base, T* outside, T* (&ptr)[K][K]) const {
    for (int r = 0; r < K; ++r)
      for (int s = 0; s < K; ++s) {
        const int64_t yy = y + r, xx = x + s;
        if (yy < 0 || yy >= H || xx < 0 || xx >= W) {
          ptr[r][s] = outside;
        } else {
          ptr[r][s] = base + b * strides.sb + (flip ? H - 1 - yy : yy) * strides.sy +
                      (flip ? W - 1 - xx : xx) * strides.sx;
        }
      }
  }
};

// Tile t of the image into row `row` of the Winograd-domain buffer vp ((M+2)^2 planes of `plane`
// values, rows of C channels).
template <int M, typename scalar_t>
inline void input_tile(const Tiles<M>& tiles, const scalar_t* xp, const scalar_t* zeros, int64_t C, int64_t t,
                       scalar_t* vp, int64_t row, int64_t plane) {
  constexpr int N = M + 2;
  int64_t b, y0, x0;
  tiles.locate(t, b, y0, x0);
  const scalar_t* src[N][N];
  tiles.patch(b, y0 - 1, x0 - 1, xp, zeros, src);
  scalar_t* dst = vp + row * C;
  over_channels<scalar_t>(C, [&](int64_t c, int64_t cnt) {
    Vec<scalar_t> t[N][N];
    for (int s = 0; s < N; ++s) {  // B^T d, column by column
      Vec<scalar_t> col[N], out[N];
      for (int r = 0; r < N; ++r) col[r] = ld(src[r][s] + c, cnt);
      Tr<M>::bt(col, out);
      for (int r = 0; r < N; ++r) t[r][s] = out[r];
    }
    for (int r = 0; r < N; ++r) {  // (B^T d) B, row by row
      Vec<scalar_t> out[N];
      Tr<M>::bt(t[r], out);
      for (int j = 0; j < N; ++j) st(dst + (N * r + j) * plane + c, out[j], cnt);
    }
  });
}

// Row `row` of the Winograd-domain products mp (planes of `plane` values, rows of C channels) back
// to tile t of the image y, plus the bias bp (C,); pixels off the image go to sink (C,).
template <int M, typename scalar_t>
inline void output_tile(const Tiles<M>& tiles, const scalar_t* mp, int64_t row, int64_t plane, const scalar_t* bp,
                        int64_t C, int64_t t, scalar_t* yp, scalar_t* sink) {
  constexpr int N = M + 2;
  int64_t b, y0, x0;
  tiles.locate(t, b, y0, x0);
  scalar_t* dst[M][M];
  tiles.patch(b, y0, x0, yp, sink, dst);
  const scalar_t* src = mp + row * C;
  over_channels<scalar_t>(C, [&](int64_t c, int64_t cnt) {
    Vec<scalar_t> q[M][N];
    for (int s = 0; s < N; ++s) {  // A^T M, column by column
      Vec<scalar_t> col[N], out[M];
      for (int r = 0; r < N; ++r) col[r] = ld(src + (N * r + s) * plane + c, cnt);
      Tr<M>::at(col, out);
      for (int r = 0; r < M; ++r) q[r][s] = out[r];
    }
    const auto bv = ld(bp + c, cnt);
    for (int r = 0; r < M; ++r) {  // (A^T M) A + bias
      Vec<scalar_t> out[M];
      Tr<M>::at(q[r], out);
      for (int s = 0; s < M; ++s) st(dst[r][s] + c, out[s] + bv, cnt);
    }
  });
}

template <int M, typename scalar_t>
void input_transform(const scalar_t* xp, int64_t H, int64_t W, int64_t C, const Strides& xs, int64_t t0, int64_t n,
                     bool flip, scalar_t* vp) {
  const Tiles<M> tiles(H, W, flip, xs);
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) input_tile<M>(tiles, xp, zeros.data(), C, t0 + i, vp, i, n * C);
  });
}

template <int M, typename scalar_t>
void output_transform(const scalar_t* mp, const scalar_t* bp, int64_t H, int64_t W, int64_t C, const Strides& ys,
                      int64_t t0, int64_t n, bool flip, scalar_t* yp) {
  const Tiles<M> tiles(H, W, flip, ys);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> sink(C);  // destination of the outputs outside the image (partial tiles)
    for (int64_t i = begin; i < end; ++i) output_tile<M>(tiles, mp, i, n * C, bp, C, t0 + i, yp, sink.data());
  });
}

// The whole convolution in blocks of nb tiles, each block on one thread from start to end: its
// input transform, its (M+2)^2 GEMMs (oneDNN's brgemm micro-kernel through
// at::native::cpublas::brgemm, made for GEMMs of a few rows run by one thread) and its output
// transform, through two buffers of the thread's own that stay in its L2 cache. The chunked path
// instead passes ~8 MiB buffers between the three steps, each split over the threads, through L3
// or memory. g: (K, C, Co) dense, the GEMMs' right factors.
template <int M>
void fused_conv_tiles(const float* xp, const Strides& xs, int64_t B, int64_t H, int64_t W, int64_t C,
                      const float* gp, int64_t Co, bool flip, const float* bp, float* yp, const Strides& ys,
                      int64_t nb) {
  constexpr int N = M + 2, K = N * N;
  const Tiles<M> in(H, W, flip, xs), out(H, W, flip, ys);
  const int64_t T = B * in.th * in.tw, blocks = (T + nb - 1) / nb;
  const std::vector<float> zeros(C, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(K * nb * C), m(K * nb * Co), sink(Co);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * nb, len = std::min(nb, T - t0);
      for (int64_t i = 0; i < len; ++i) input_tile<M>(in, xp, zeros.data(), C, t0 + i, v.data(), i, len * C);
      for (int k = 0; k < K; ++k) {
        at::native::cpublas::brgemm(len, Co, C, C, Co, Co, false, v.data() + k * len * C, gp + k * C * Co,
                                    m.data() + k * len * Co, false);
      }
      for (int64_t i = 0; i < len; ++i) output_tile<M>(out, m.data(), i, len * Co, bp, Co, t0 + i, yp, sink.data());
    }
    at::native::cpublas::brgemm_release(false);
  });
}

// Tiles a thread adds into its float partial bias sums before they move into double.
constexpr int64_t kBiasFlushTiles = 16;

template <int M, typename scalar_t>
void grad_output_transform(const scalar_t* gp, int64_t H, int64_t W, int64_t C, const Strides& gs, int64_t t0,
                           int64_t n, scalar_t* dp, double* bias_sums) {
  constexpr int N = M + 2;
  const Tiles<M> tiles(H, W, false, gs);
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    // bias_sums: a row of C per thread (at::get_thread_num()); each tile's M x M gradient values
    // are added per channel (outside pixels read as zeros; the tiles cover every pixel once).
    double* const acc = bias_sums ? bias_sums + at::get_thread_num() * C : nullptr;
    std::vector<scalar_t> part(acc ? C : 0, scalar_t(0));
    auto flush = [&] {
      for (int64_t c = 0; c < C; ++c) {
        acc[c] += part[c];
        part[c] = scalar_t(0);
      }
    };
    for (int64_t i = begin; i < end; ++i) {
      int64_t b, y0, x0;
      tiles.locate(t0 + i, b, y0, x0);
      const scalar_t* src[M][M];
      tiles.patch(b, y0, x0, gp, zeros.data(), src);
      scalar_t* dst = dp + i * C;
      const int64_t plane = n * C;
      over_channels<scalar_t>(C, [&](int64_t c, int64_t cnt) {
        // dM = A dY A^T, the adjoint of the output transform.
        Vec<scalar_t> q[N][M], total(0);
        for (int s = 0; s < M; ++s) {
          Vec<scalar_t> col[M], out[N];
          for (int r = 0; r < M; ++r) {
            col[r] = ld(src[r][s] + c, cnt);
            if (acc) total = total + col[r];
          }
          Tr<M>::a(col, out);
          for (int r = 0; r < N; ++r) q[r][s] = out[r];
        }
        for (int r = 0; r < N; ++r) {
          Vec<scalar_t> out[N];
          Tr<M>::a(q[r], out);
          for (int j = 0; j < N; ++j) st(dst + (N * r + j) * plane + c, out[j], cnt);
        }
        if (acc) st(part.data() + c, ld(part.data() + c, cnt) + total, cnt);
      });
      if (acc && (i - begin) % kBiasFlushTiles == kBiasFlushTiles - 1) flush();
    }
    if (acc) flush();
  });
}

// U[N i + j][o][c] = (G g G^T)_ij for the filter g = w[o][c] (any strides ws, in elements, of
// (O, I, 3, 3)), U dense (N*N, O, I): o = C_out, c = C_in for U's default layout, o = C_in,
// c = C_out (w's two channel dimensions and strides swapped by the caller) for out_channels_last.
// Nine taps of V filters are gathered into a small array, then transformed in registers: 2.4 MB in
// and 9.4 MB out for dito-S's 256 x 256-channel filters at M = 4, where a (36 x 9) x (9 x 65536)
// GEMM spent about twice the time.
template <int M, typename scalar_t>
void filter_transform(const scalar_t* wp, int64_t Co, int64_t Ci, const int64_t (&ws)[4], scalar_t* up) {
  constexpr int N = M + 2;
  constexpr int64_t V = Vec<scalar_t>::size();
  const int64_t plane = Co * Ci;
  at::parallel_for(0, Co, grain_for(Ci * N * N), [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t taps[9][V] = {};
    for (int64_t o = begin; o < end; ++o) {
      over_channels<scalar_t>(Ci, [&](int64_t c, int64_t cnt) {
        for (int64_t l = 0; l < cnt; ++l) {
          const scalar_t* g = wp + o * ws[0] + (c + l) * ws[1];
          for (int r = 0; r < 3; ++r)
            for (int s = 0; s < 3; ++s) taps[3 * r + s][l] = g[r * ws[2] + s * ws[3]];
        }
        Vec<scalar_t> t[N][3];
        for (int s = 0; s < 3; ++s) {  // G g, column by column
          Vec<scalar_t> col[3], out[N];
          for (int r = 0; r < 3; ++r) col[r] = Vec<scalar_t>::loadu(taps[3 * r + s]);
          Tr<M>::g(col, out);
          for (int i = 0; i < N; ++i) t[i][s] = out[i];
        }
        scalar_t* dst = up + o * Ci + c;
        for (int i = 0; i < N; ++i) {  // (G g) G^T, row by row
          Vec<scalar_t> out[N];
          Tr<M>::g(t[i], out);
          for (int j = 0; j < N; ++j) st(dst + (N * i + j) * plane, out[j], cnt);
        }
      });
    }
  });
}

// dw[o][c] = G^T dU[.][o][c] G for dU dense (N*N, C_out, C_in) and dw dense (C_out, C_in, 3, 3).
template <int M, typename scalar_t>
void filter_adjoint(const scalar_t* dup, int64_t Co, int64_t Ci, scalar_t* dwp) {
  constexpr int N = M + 2;
  constexpr int64_t V = Vec<scalar_t>::size();
  const int64_t plane = Co * Ci;
  at::parallel_for(0, Co, grain_for(Ci * N * N), [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t taps[9][V];
    for (int64_t o = begin; o < end; ++o) {
      over_channels<scalar_t>(Ci, [&](int64_t c, int64_t cnt) {
        const scalar_t* src = dup + o * Ci + c;
        Vec<scalar_t> t[3][N];
        for (int j = 0; j < N; ++j) {  // G^T dU, column by column
          Vec<scalar_t> col[N], out[3];
          for (int i = 0; i < N; ++i) col[i] = ld(src + (N * i + j) * plane, cnt);
          Tr<M>::gt(col, out);
          for (int a = 0; a < 3; ++a) t[a][j] = out[a];
        }
        for (int a = 0; a < 3; ++a) {  // (G^T dU) G, row by row
          Vec<scalar_t> out[3];
          Tr<M>::gt(t[a], out);
          for (int b = 0; b < 3; ++b) out[b].store(taps[3 * a + b]);
        }
        scalar_t* dst = dwp + (o * Ci + c) * 9;
        for (int64_t l = 0; l < cnt; ++l)
          for (int k = 0; k < 9; ++k) dst[9 * l + k] = taps[k][l];
      });
    }
  });
}

// Calls f.template operator()<M>() for the tile size (2 or 4; checked by the caller).
template <typename F>
void with_tile(int64_t tile, F&& f) {
  if (tile == 4) f(std::integral_constant<int, 4>{}); else f(std::integral_constant<int, 2>{});
}

}  // namespace

void winograd_input_transform_kernel(const at::TensorBase& x, int64_t tile, int64_t t0, int64_t n, bool flip,
                                     const at::TensorBase& v) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_input_transform", [&] {
    with_tile(tile, [&](auto m) {
      input_transform<decltype(m)::value>(x.const_data_ptr<scalar_t>(), x.size(2), x.size(3), x.size(1), Strides(x), t0,
                                          n, flip, v.mutable_data_ptr<scalar_t>());
    });
  });
}

void winograd_output_transform_kernel(const at::TensorBase& m, const at::TensorBase& bias, int64_t tile, int64_t t0,
                                      int64_t n, bool flip, const at::TensorBase& y) {
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "winograd_output_transform", [&] {
    const std::vector<scalar_t> zeros(y.size(1), scalar_t(0));
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : zeros.data();
    with_tile(tile, [&](auto mt) {
      output_transform<decltype(mt)::value>(m.const_data_ptr<scalar_t>(), bp, y.size(2), y.size(3), y.size(1),
                                            Strides(y), t0, n, flip, y.mutable_data_ptr<scalar_t>());
    });
  });
}

void winograd_grad_output_transform_kernel(const at::TensorBase& grad_y, int64_t tile, int64_t t0, int64_t n,
                                           const at::TensorBase& dm, const at::TensorBase& bias_sums) {
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "winograd_grad_output_transform", [&] {
    with_tile(tile, [&](auto m) {
      grad_output_transform<decltype(m)::value>(grad_y.const_data_ptr<scalar_t>(), grad_y.size(2), grad_y.size(3),
                                                grad_y.size(1), Strides(grad_y), t0, n, dm.mutable_data_ptr<scalar_t>(),
                                                bias_sums.defined() ? bias_sums.mutable_data_ptr<double>() : nullptr);
    });
  });
}

void winograd_fused_conv_kernel(const at::TensorBase& x, const at::TensorBase& g, const at::TensorBase& bias,
                                int64_t tile, bool flip, int64_t block_tiles, const at::TensorBase& y) {
  const std::vector<float> zeros(y.size(1), 0.f);
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : zeros.data();
  with_tile(tile, [&](auto mt) {
    fused_conv_tiles<decltype(mt)::value>(x.const_data_ptr<float>(), Strides(x), x.size(0), x.size(2), x.size(3),
                                          x.size(1), g.const_data_ptr<float>(), y.size(1), flip, bp,
                                          y.mutable_data_ptr<float>(), Strides(y), block_tiles);
  });
}

void winograd_filter_kernel(const at::TensorBase& weight, int64_t tile, bool out_channels_last,
                            const at::TensorBase& u) {
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "winograd_filter", [&] {
    const int o = out_channels_last ? 1 : 0, c = 1 - o;  // the dimension of U's rows and of its vectors
    const int64_t ws[4] = {weight.stride(o), weight.stride(c), weight.stride(2), weight.stride(3)};
    with_tile(tile, [&](auto m) {
      filter_transform<decltype(m)::value>(weight.const_data_ptr<scalar_t>(), weight.size(o), weight.size(c), ws,
                                           u.mutable_data_ptr<scalar_t>());
    });
  });
}

void winograd_filter_adjoint_kernel(const at::TensorBase& grad_u, int64_t tile, const at::TensorBase& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES(grad_u.scalar_type(), "winograd_filter_adjoint", [&] {
    with_tile(tile, [&](auto m) {
      filter_adjoint<decltype(m)::value>(grad_u.const_data_ptr<scalar_t>(), grad_u.size(1), grad_u.size(2),
                                         grad_weight.mutable_data_ptr<scalar_t>());
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dito_fast
