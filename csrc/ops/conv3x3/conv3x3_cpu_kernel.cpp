// Winograd F(2x2, 3x3) transforms of the 3x3 convolution (stride 1, padding 1), compiled once per
// CPU capability. All activations are NHWC (channels_last); every transform is vectorised over the
// channel dimension, which is contiguous, so a tile's 16 values of one channel never leave a
// register. Notation (Lavin & Gray 2016): with a 4x4 input patch d, a 3x3 filter g and a 2x2
// output y, y = A^T [(G g G^T) . (B^T d B)] A, where
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1],
//   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1].
// The filter transform (and its adjoint for the weight gradient) is a tiny matrix product done in
// Python (dito_fast/ops/conv3x3.py); here are the per-tile transforms of the activations.
//
// Tiles: the output is covered by th x tw tiles of 2x2 (th = ceil(H/2)); tile index
// t = (b * th + ty) * tw + tx. A chunk is the tiles [t0, t0 + n); Winograd-domain buffers are
// (16, n, C) with C contiguous: position k = 4 i + j of the 4x4 tile, then tile, then channel.
#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>

#include <dito_fast/cpu_kernels.h>
#include <dito_fast/cpu_vec.h>

#include <vector>

namespace dito_fast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

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

struct Tiles {
  int64_t H, W, th, tw;
  void locate(int64_t t, int64_t& b, int64_t& y0, int64_t& x0) const {
    const int64_t tx = t % tw, rest = t / tw;
    b = rest / th;
    y0 = 2 * (rest % th);
    x0 = 2 * tx;
  }
};

}  // namespace

namespace {
// Plane of position k = 4 i + j: k itself, or with "flip" (the input gradient, which convolves with
// the flipped filter) the position (s(i), s(j)), s = (3 1 2 0): G applied to a flipped filter is
// G with rows 0 and 3 swapped, so that filter's transform is the original's with positions so
// permuted, and the GEMM can use the original transform's planes.
inline int64_t plane_of(int k, bool flip) {
  if (!flip) return k;
  constexpr int s[4] = {3, 1, 2, 0};
  return 4 * s[k / 4] + s[k % 4];
}
}  // namespace

void winograd_input_transform_kernel(const at::TensorBase& x, int64_t t0, int64_t n, bool flip,
                                     const at::TensorBase& v) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  const Tiles tiles{H, W, (H + 1) / 2, (W + 1) / 2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_input_transform", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    int64_t off[16];  // offset of position k's plane in v
    for (int k = 0; k < 16; ++k) off[k] = plane_of(k, flip) * n * C;
    const std::vector<scalar_t> zeros(C, scalar_t(0));
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t b, y0, x0;
        tiles.locate(t0 + i, b, y0, x0);
        const scalar_t* src[4][4];
        for (int r = 0; r < 4; ++r) {
          const int64_t yy = y0 - 1 + r;
          for (int s = 0; s < 4; ++s) {
            const int64_t xx = x0 - 1 + s;
            src[r][s] = (yy >= 0 && yy < H && xx >= 0 && xx < W) ? xp + ((b * H + yy) * W + xx) * C : zeros.data();
          }
        }
        scalar_t* dst = vp + i * C;
        over_channels<scalar_t>(C, [&](int64_t c, int64_t cnt) {
          Vec<scalar_t> d[4][4], u[4][4];
          for (int r = 0; r < 4; ++r)
            for (int s = 0; s < 4; ++s) d[r][s] = ld(src[r][s] + c, cnt);
          for (int s = 0; s < 4; ++s) {  // B^T d
            u[0][s] = d[0][s] - d[2][s];
            u[1][s] = d[1][s] + d[2][s];
            u[2][s] = d[2][s] - d[1][s];
            u[3][s] = d[1][s] - d[3][s];
          }
          for (int r = 0; r < 4; ++r) {  // (B^T d) B
            st(dst + off[4 * r + 0] + c, u[r][0] - u[r][2], cnt);
            st(dst + off[4 * r + 1] + c, u[r][1] + u[r][2], cnt);
            st(dst + off[4 * r + 2] + c, u[r][2] - u[r][1], cnt);
            st(dst + off[4 * r + 3] + c, u[r][1] - u[r][3], cnt);
          }
        });
      }
    });
  });
}

void winograd_output_transform_kernel(const at::TensorBase& m, const at::TensorBase& bias, int64_t t0, int64_t n,
                                      bool flip, const at::TensorBase& y) {
  const int64_t C = y.size(1), H = y.size(2), W = y.size(3);
  const Tiles tiles{H, W, (H + 1) / 2, (W + 1) / 2};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "winograd_output_transform", [&] {
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    int64_t off[16];
    for (int k = 0; k < 16; ++k) off[k] = plane_of(k, flip) * n * C;
    const std::vector<scalar_t> zeros(C, scalar_t(0));
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : zeros.data();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> sink(C);  // destination of the outputs outside the image (odd H or W)
      for (int64_t i = begin; i < end; ++i) {
        int64_t b, y0, x0;
        tiles.locate(t0 + i, b, y0, x0);
        scalar_t* dst[2][2];
        for (int r = 0; r < 2; ++r)
          for (int s = 0; s < 2; ++s)
            dst[r][s] = (y0 + r < H && x0 + s < W) ? yp + ((b * H + y0 + r) * W + x0 + s) * C : sink.data();
        const scalar_t* src = mp + i * C;
        over_channels<scalar_t>(C, [&](int64_t c, int64_t cnt) {
          Vec<scalar_t> q[2][4];
          for (int s = 0; s < 4; ++s) {  // A^T M
            const auto m0 = ld(src + off[0 + s] + c, cnt), m1 = ld(src + off[4 + s] + c, cnt);
            const auto m2 = ld(src + off[8 + s] + c, cnt), m3 = ld(src + off[12 + s] + c, cnt);
            q[0][s] = m0 + m1 + m2;
            q[1][s] = m1 - m2 - m3;
          }
          const auto bv = ld(bp + c, cnt);
          for (int r = 0; r < 2; ++r) {  // (A^T M) A + bias
            st(dst[r][0] + c, q[r][0] + q[r][1] + q[r][2] + bv, cnt);
            st(dst[r][1] + c, q[r][1] - q[r][2] - q[r][3] + bv, cnt);
          }
        });
      }
    });
  });
}

void winograd_grad_output_transform_kernel(const at::TensorBase& grad_y, int64_t t0, int64_t n,
                                           const at::TensorBase& dm) {
  const int64_t C = grad_y.size(1), H = grad_y.size(2), W = grad_y.size(3);
  const Tiles tiles{H, W, (H + 1) / 2, (W + 1) / 2};
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "winograd_grad_output_transform", [&] {
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    scalar_t* dp = dm.mutable_data_ptr<scalar_t>();
    const int64_t plane = n * C;
    const std::vector<scalar_t> zeros(C, scalar_t(0));
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t b, y0, x0;
        tiles.locate(t0 + i, b, y0, x0);
        const scalar_t* src[2][2];
        for (int r = 0; r < 2; ++r)
          for (int s = 0; s < 2; ++s)
            src[r][s] = (y0 + r < H && x0 + s < W) ? gp + ((b * H + y0 + r) * W + x0 + s) * C : zeros.data();
        scalar_t* dst = dp + i * C;
        over_channels<scalar_t>(C, [&](int64_t c, int64_t cnt) {
          // dM = A dY A^T, the adjoint of the output transform; A = [1 0; 1 1; 1 -1; 0 -1].
          Vec<scalar_t> e[2][2], q[4][2];
          for (int r = 0; r < 2; ++r)
            for (int s = 0; s < 2; ++s) e[r][s] = ld(src[r][s] + c, cnt);
          for (int s = 0; s < 2; ++s) {
            q[0][s] = e[0][s];
            q[1][s] = e[0][s] + e[1][s];
            q[2][s] = e[0][s] - e[1][s];
            q[3][s] = Vec<scalar_t>(0) - e[1][s];
          }
          for (int r = 0; r < 4; ++r) {
            st(dst + (4 * r + 0) * plane + c, q[r][0], cnt);
            st(dst + (4 * r + 1) * plane + c, q[r][0] + q[r][1], cnt);
            st(dst + (4 * r + 2) * plane + c, q[r][0] - q[r][1], cnt);
            st(dst + (4 * r + 3) * plane + c, Vec<scalar_t>(0) - q[r][1], cnt);
          }
        });
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dito_fast
