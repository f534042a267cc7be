// CPU entry points of the Winograd F(MxM, 3x3) convolution (M = 2 or 4): checks, chunking and the
// GEMMs. The tile size comes with the transformed filter u: (K, C_out, C_in) with K = (M + 2)^2
// positions, 16 for M = 2 and 36 for M = 4.
//
// The tiles of the output are processed in chunks sized so that a chunk's Winograd-domain buffers
// (K x tiles x channels, input and output side) stay around 8 MiB: each chunk is transformed
// (conv3x3_cpu_kernel.cpp), multiplied position by position by the transformed filter with one
// batched GEMM (batched_gemm: K GEMMs of tiles x C_in by C_in x C_out) and transformed back; or,
// for float32 with few channels (fused_block_tiles), in small blocks each taken through all three
// steps by one thread (winograd_fused_conv_kernel). Per output, the GEMMs do K / M^2
// multiply-adds where a direct 3x3 convolution does 9: 4 for M = 2 (2.25x fewer), 2.25 for M = 4
// (4x fewer). The filter transform and its adjoint are here too (winograd_filter*).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <dito_fast/check.h>
#include <dito_fast/cpu_kernels.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

// oneDNN's matmul as torch builds it (ATen/native/mkldnn/Matmul.cpp; its header is not installed):
// result = alpha mat1 mat2 (+ beta result). Weak, so that the extension loads whatever torch
// exports; a torch built without oneDNN defines it to raise.
namespace at::native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                   float alpha) __attribute__((weak));
}  // namespace at::native

namespace dito_fast {
namespace {

// Whether oneDNN's matmul takes float32 here: torch's refuses it on x86 CPUs without AVX-512
// (BW, VL, DQ) or AVX-NE-CONVERT (its float32 route shares the bfloat16 one's device check), and
// raises in a torch built without oneDNN, so one tiny call decides, once per process. Like torch's
// own matmuls, it is also left alone while torch.backends.mkldnn.enabled is False.
bool onednn_matmul_takes_float() {
  static const bool takes = [] {
    if (at::native::mkldnn_matmul == nullptr) return false;
    try {
      const auto a = at::ones({1, 1, 1}, at::kFloat);
      auto c = at::zeros({1, 1, 1}, at::kFloat);
      at::native::mkldnn_matmul(a, a, c, 0.0f, 1.0f);
      return c.item<float>() == 1.0f;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return takes && at::globalContext().userEnabledMkldnn();
}

// out = a b (accumulate: out += a b) for the K GEMMs of a chunk: a (K, m, k), b (K, k, n) dense,
// out (K, m, n) dense. oneDNN's matmul (AVX-512 kernels where the CPU has them) for float32; MKL's
// batched GEMM (at::bmm_out, baddbmm_) otherwise, and where b is strided (a transposed view), for
// which oneDNN was no faster. On the Zen 4 VM (2 threads, 2026-12-04), dito-S's chunks ran at
// 218-227 GFLOP/s through oneDNN against 177-195 through at::bmm_out (the forward's and the input
// gradient's GEMMs), and at 183-212 against 173-199 for the weight gradient's (a = dM^T strided).
void batched_gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == at::kFloat && b.is_contiguous() && onednn_matmul_takes_float()) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    out.baddbmm_(a, b);
  } else {
    at::bmm_out(out, a, b);
  }
}

// Tiles per chunk: as many as ~8 MiB of buffers hold (at least 64), evened out over the chunks
// that takes, so that no chunk is a short remainder: a GEMM of a few tiles' rows runs far below
// the rate of the others (dito-S's train step had 128-tile layers run as 113 + 15 tiles, the 15-row
// GEMMs at ~100 GFLOP/s against ~240 for the 113-row ones; torch.profiler, 2026-12-02).
int64_t chunk_tiles(int64_t total, int64_t K, int64_t c_in, int64_t c_out, int64_t elem_size) {
  constexpr int64_t kBufferBytes = 8 << 20;
  const int64_t cap = std::max<int64_t>(kBufferBytes / (K * (c_in + c_out) * elem_size), 64);
  const int64_t chunks = (total + cap - 1) / cap;
  return (total + chunks - 1) / chunks;
}

// Tiles per block of the fused path (winograd_fused_conv_kernel, float32 with the GEMMs' filter
// dense), or 0 for the chunked one. Fused where C_in + C_out <= 256, in blocks of 23 tiles (the two
// buffers 424 KiB at 64 channels; an odd count keeps the 36 planes off one cache set: blocks of 32
// tiles made the transforms alone 1.6-2x slower than 31 or 33). Measured on the Zen 4 VM (2
// threads, 2026-12-04; forward, minima of 3 alternated rounds): 64 -> 64 channels at 64x64, batch
// 8: 4.13 ms fused against 5.27 chunked; 128 -> 64: 8.42 against 9.25; 128 -> 128 at 32x32: even;
// 256 -> 256 at 16x16: 3.37 against 3.23, and 512 -> 512 at 32x32 (batch 1) 13.6 against 8.3 (the
// filter, 9-38 MB, read again per block). dito-S at 64x64, batch 8, four alternated rounds: train
// step 1304-1368 ms against 1353-1402, decoder step 337-344 against 357-370.
// DITO_FAST_WINOGRAD_BLOCK=n forces blocks of n tiles (0: the chunked path), for measurements.
int64_t fused_block_tiles(const at::Tensor& x, const at::Tensor& g, int64_t c_out) {
  int64_t forced = -1;
  if (const char* env = std::getenv("DITO_FAST_WINOGRAD_BLOCK"); env != nullptr && *env) {
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    TORCH_CHECK(*end == '\0' && n >= 0 && n <= 4096,
                "DITO_FAST_WINOGRAD_BLOCK must be a number of tiles from 0 (the chunked path) to 4096, got '", env,
                "'");
    forced = n;
  }
  if (x.scalar_type() != at::kFloat || !g.is_contiguous() || c_out == 0) return 0;
  return forced >= 0 ? forced : x.size(1) + c_out <= 256 ? 23 : 0;
}

void check_activation(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, op, ": ", name, " is empty, shape ", x.sizes());
}

// x itself when its channels are contiguous (channels_last, or a channel slice of such a tensor,
// which is what torch.cat's backward hands the convolutions' gradients), else a channels_last copy.
at::Tensor channels_contiguous(const at::Tensor& x) {
  return x.stride(1) == 1 || x.size(1) == 1 ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
}

// Tile size M of a transformed filter with K positions (0 if K is neither 16 nor 36).
int64_t tile_of(int64_t K) { return K == 16 ? 2 : K == 36 ? 4 : 0; }

// Calls body(t0, len, v, m) for the chunks of M x M tiles of a (B, C_in -> C_out, H, W) problem,
// with v and m dense (K, len, C_in) and (K, len, C_out) views of two buffers reused by every chunk.
template <typename Body>
void for_each_chunk(const at::Tensor& x, int64_t tile, int64_t c_out, Body&& body) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = (tile + 2) * (tile + 2);
  const int64_t T = B * ((H + tile - 1) / tile) * ((W + tile - 1) / tile);
  const int64_t n = chunk_tiles(T, K, C, c_out, x.element_size());
  const auto vbuf = at::empty({K * n * C}, x.options()), mbuf = at::empty({K * n * c_out}, x.options());
  for (int64_t t0 = 0; t0 < T; t0 += n) {
    const int64_t len = std::min(n, T - t0);
    body(t0, len, vbuf.narrow(0, 0, K * len * C).view({K, len, C}),
         mbuf.narrow(0, 0, K * len * c_out).view({K, len, c_out}));
  }
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                                bool transposed) {
  constexpr const char* op = "winograd_conv3x3";
  check_activation(x, op, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // u is (K, C_out, C_in) of the filter; the GEMMs multiply by u_k^T, or by u_k for transposed=True
  // (the input gradient: the image flipped on the way in and out, see conv3x3_cpu_kernel.cpp).
  const int64_t u_in = transposed ? 1 : 2;
  TORCH_CHECK(u.dim() == 3 && tile_of(u.size(0)) && u.size(u_in) == C, op,
              ": u must be the transformed filter (16 or 36, ",
              transposed ? std::to_string(C) + ", C_in" : "C_out, " + std::to_string(C), "), got shape ", u.sizes());
  const int64_t tile = tile_of(u.size(0));
  TORCH_CHECK(u.scalar_type() == x.scalar_type() && u.device() == x.device(), op, ": u is ", u.scalar_type(), " on ",
              u.device(), " but x is ", x.scalar_type(), " on ", x.device());
  const int64_t Co = u.size(3 - u_in);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == Co && b.scalar_type() == x.scalar_type() && b.device() == x.device(), op,
                ": bias must be (", Co, ") ", x.scalar_type(), " on ", x.device(), ", got ", b.sizes(), " ",
                b.scalar_type(), " on ", b.device());
  }
  const auto xc = channels_contiguous(x);
  // (K, C, Co): dense for the forward's filters (winograd_filter(out_channels_last=True)) and the
  // input gradient's (the default layout), strided where a caller gives the other one
  const auto gemm_u = transposed ? u : u.transpose(1, 2);
  auto y = at::empty({B, Co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (const int64_t nb = fused_block_tiles(xc, gemm_u, Co); nb > 0) {
    DITO_CPU_CALL(winograd_fused_conv_kernel, xc, gemm_u, b, tile, transposed, nb, y);
    return y.contiguous(preferred_format(x));
  }
  for_each_chunk(xc, tile, Co, [&](int64_t t0, int64_t len, at::Tensor v, at::Tensor m) {
    DITO_CPU_CALL(winograd_input_transform_kernel, xc, tile, t0, len, transposed, v);
    batched_gemm(m, v, gemm_u, false);
    DITO_CPU_CALL(winograd_output_transform_kernel, m, b, tile, t0, len, transposed, y);
  });
  return y.contiguous(preferred_format(x));
}

std::tuple<at::Tensor, at::Tensor> winograd_conv3x3_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad_y,
                                                                    int64_t tile, bool bias) {
  constexpr const char* op = "winograd_conv3x3_weight_grad";
  check_activation(x, op, "x");
  check_activation(grad_y, op, "grad_y");
  TORCH_CHECK(grad_y.size(0) == x.size(0) && grad_y.size(2) == x.size(2) && grad_y.size(3) == x.size(3) &&
                  grad_y.scalar_type() == x.scalar_type(),
              op, ": grad_y ", grad_y.sizes(), " ", grad_y.scalar_type(), " does not match x ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 or 4, got ", tile);
  const int64_t C = x.size(1), Co = grad_y.size(1);
  const auto xc = channels_contiguous(x);
  const auto gc = channels_contiguous(grad_y);
  auto du = at::empty({(tile + 2) * (tile + 2), Co, C}, x.options());
  // The bias gradient (grad_y summed over batch and pixels) is formed by the pass that transforms
  // grad_y: per-thread double sums, added up here.
  const at::Tensor bias_sums =
      bias ? at::zeros({at::get_num_threads(), Co}, x.options().dtype(at::kDouble)) : at::Tensor();
  for_each_chunk(xc, tile, Co, [&](int64_t t0, int64_t len, at::Tensor v, at::Tensor dm) {
    DITO_CPU_CALL(winograd_input_transform_kernel, xc, tile, t0, len, false, v);
    DITO_CPU_CALL(winograd_grad_output_transform_kernel, gc, tile, t0, len, dm, bias_sums);
    batched_gemm(du, dm.transpose(1, 2), v, t0 > 0);  // dU_k = dM_k^T V_k, summed over the chunks
  });
  if (!bias) return {du, at::empty({0}, x.options())};
  auto db = at::empty({Co}, x.options());
  AT_DISPATCH_FLOATING_TYPES(db.scalar_type(), "winograd_bias_grad", [&] {
    const double* rows = bias_sums.const_data_ptr<double>();
    scalar_t* out = db.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < Co; ++c) {
      double total = 0;
      for (int64_t r = 0; r < bias_sums.size(0); ++r) total += rows[r * Co + c];
      out[c] = static_cast<scalar_t>(total);
    }
  });
  return {du, db};
}

at::Tensor winograd_filter_cpu(const at::Tensor& weight, int64_t tile, bool out_channels_last) {
  constexpr const char* op = "winograd_filter";
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
              ": weight must be float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, op,
              ": weight must be (C_out, C_in, 3, 3), got shape ", weight.sizes());
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 or 4, got ", tile);
  const int64_t K = (tile + 2) * (tile + 2), Co = weight.size(0), Ci = weight.size(1);
  auto u = out_channels_last ? at::empty({K, Ci, Co}, weight.options()).transpose(1, 2)
                             : at::empty({K, Co, Ci}, weight.options());
  if (u.numel() > 0) DITO_CPU_CALL(winograd_filter_kernel, weight, tile, out_channels_last, u);
  return u;
}

at::Tensor winograd_filter_adjoint_cpu(const at::Tensor& grad_u) {
  constexpr const char* op = "winograd_filter_adjoint";
  TORCH_CHECK(grad_u.device().is_cpu(), op, ": grad_u must be a CPU tensor, got ", grad_u.device());
  TORCH_CHECK(grad_u.scalar_type() == at::kFloat || grad_u.scalar_type() == at::kDouble, op,
              ": grad_u must be float32 or float64, got ", grad_u.scalar_type());
  TORCH_CHECK(grad_u.dim() == 3 && tile_of(grad_u.size(0)), op,
              ": grad_u must be (16 or 36, C_out, C_in), got shape ", grad_u.sizes());
  const auto du = grad_u.contiguous();
  auto dw = at::empty({du.size(1), du.size(2), 3, 3}, du.options());
  if (dw.numel() > 0) DITO_CPU_CALL(winograd_filter_adjoint_kernel, du, tile_of(du.size(0)), dw);
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, CPU, m) {
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
  m.impl("winograd_conv3x3_weight_grad", &winograd_conv3x3_weight_grad_cpu);
  m.impl("winograd_filter", &winograd_filter_cpu);
  m.impl("winograd_filter_adjoint", &winograd_filter_adjoint_cpu);
}

}  // namespace dito_fast
