// The fused ops as a C++ program calls them (dito_fast/ops.h through the c10 dispatcher, linked
// against libdito_fast_ops): registration, results and gradients (C++ autograd) against ATen's own
// ops, every built instruction set's kernels against each other, results independent of the thread
// count, and the error messages of bad input. No Python in the process.
#include "harness.h"

#include <dito_fast/cpu_kernels.h>
#include <dito_fast/ops.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>

#include <functional>
#include <string>
#include <vector>

namespace {

using at::Tensor;
namespace ops = dito_fast::ops;

#define OPS_TEST(name) DITO_TEST("ops", name)

void expect_close(const Tensor& got, const Tensor& want, double rtol, double atol, const std::string& what) {
  EXPECT(got.sizes() == want.sizes()) << what << ": shape " << got.sizes() << ", want " << want.sizes();
  EXPECT(got.scalar_type() == want.scalar_type()) << what << ": dtype " << got.scalar_type() << ", want " << want.scalar_type();
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = want.to(at::kDouble).abs().max().item<double>();
  EXPECT(err <= atol + rtol * scale) << what << ": max error " << err << " (largest value " << scale << ")";
}

// The message of the c10::Error that f raises (a failure if it raises none).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  EXPECT(false) << "no error raised";
  return "";
}

// Gradients of sum(out * g) with respect to inputs (those defined), by C++ autograd.
std::vector<Tensor> grads(const Tensor& out, const Tensor& g, const std::vector<Tensor>& inputs) {
  return torch::autograd::grad({(out * g).sum()}, inputs);
}

struct Tol {
  double rtol, atol;
};
Tol tol_for(at::ScalarType t) { return t == at::kDouble ? Tol{1e-10, 1e-10} : Tol{2e-5, 2e-5}; }

OPS_TEST(registered_for_cpu_and_autograd) {
  for (const char* name : {"fm_noise", "fm_noise_backward", "fm_loss", "fm_loss_backward", "latent_layernorm",
                           "latent_layernorm_backward", "group_norm_modulate_silu", "group_norm_modulate_silu_backward",
                           "winograd_conv3x3", "winograd_conv3x3_weight_grad", "winograd_filter", "winograd_filter_adjoint"}) {
    const auto op = c10::Dispatcher::singleton().findSchema({std::string("dito_fast::") + name, ""});
    EXPECT(op.has_value()) << "dito_fast::" << name << " has no schema";
    if (!op) continue;
    EXPECT(op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) << "dito_fast::" << name << " has no CPU kernel";
  }
  for (const char* name : {"fm_noise", "fm_loss", "latent_layernorm", "group_norm_modulate_silu"}) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow((std::string("dito_fast::") + name).c_str(), "");
    EXPECT(op.hasKernelForDispatchKey(c10::DispatchKey::Autograd)) << "dito_fast::" << name << " has no autograd kernel";
  }
}

OPS_TEST(latent_layernorm_matches_aten) {
  at::manual_seed(0);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    for (bool cl : {false, true}) {
      for (auto shape : {std::vector<int64_t>{3, 4, 5, 7}, std::vector<int64_t>{1, 4, 32, 32}}) {
        auto z = (at::randn(shape, at::TensorOptions().dtype(dtype)) * 3 + 2)
                     .contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)
                     .requires_grad_(true);
        const auto [y, rstd] = ops::latent_layernorm(z, 1e-5);
        const auto want = at::layer_norm(z, {shape[1], shape[2], shape[3]}, {}, {}, 1e-5);
        const std::string what = std::string("latent_layernorm ") + c10::toString(dtype) + (cl ? " channels_last" : "");
        const Tol t = tol_for(dtype);
        expect_close(y, want, t.rtol, t.atol, what);
        EXPECT(y.is_contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)) << what << ": layout not kept";
        EXPECT(rstd.sizes() == at::IntArrayRef{shape[0]}) << what << ": rstd shape " << rstd.sizes();
        const auto g = at::randn_like(want);
        expect_close(grads(y, g, {z})[0], grads(want, g, {z})[0], t.rtol, t.atol, what + ", gradient");
      }
    }
  }
}

// GroupNorm -> (1 + scale), shift -> SiLU against ATen's group_norm and the elementwise ops, with
// every parameter, with none, without SiLU; NCHW, channels_last and a non-dense slice.
OPS_TEST(group_norm_modulate_silu_matches_aten) {
  at::manual_seed(1);
  const int64_t B = 3, C = 12, H = 5, W = 7;
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const auto o = at::TensorOptions().dtype(dtype);
    for (int layout = 0; layout < 3; ++layout) {
      for (int variant = 0; variant < 3; ++variant) {
        const bool params = variant != 1, silu = variant != 2;
        Tensor x = at::randn({B, C, H, W + (layout == 2 ? 3 : 0)}, o) * 2 + 1;
        if (layout == 1) x = x.contiguous(at::MemoryFormat::ChannelsLast);
        if (layout == 2) x = x.narrow(3, 1, W);  // not dense
        x.requires_grad_(true);
        Tensor w = at::randn({C}, o).requires_grad_(true), b = at::randn({C}, o).requires_grad_(true);
        Tensor s = (at::randn({B, C}, o) * 0.3).requires_grad_(true), sh = at::randn({B, C}, o).requires_grad_(true);
        const int64_t G = 4;
        const auto out = std::get<0>(params ? ops::group_norm_modulate_silu(x, G, w, b, s, sh, 1e-5, silu)
                                            : ops::group_norm_modulate_silu(x, G, std::nullopt, std::nullopt,
                                                                            std::nullopt, std::nullopt, 1e-5, silu));
        Tensor want = params ? at::group_norm(x, G, w, b, 1e-5) * (1 + s.view({B, C, 1, 1})) + sh.view({B, C, 1, 1})
                             : at::group_norm(x, G, {}, {}, 1e-5);
        if (silu) want = at::silu(want);
        const std::string what = std::string("group_norm_modulate_silu ") + c10::toString(dtype) + ", layout " +
                                 std::to_string(layout) + ", variant " + std::to_string(variant);
        const Tol t = tol_for(dtype);
        expect_close(out, want, t.rtol, t.atol, what);
        const auto g = at::randn_like(want);
        const std::vector<Tensor> inputs = params ? std::vector<Tensor>{x, w, b, s, sh} : std::vector<Tensor>{x};
        const auto got_g = grads(out, g, inputs), want_g = grads(want, g, inputs);
        for (size_t i = 0; i < inputs.size(); ++i) {
          expect_close(got_g[i], want_g[i], t.rtol, t.atol, what + ", gradient of input " + std::to_string(i));
        }
      }
    }
  }
}

OPS_TEST(flow_matching_matches_aten) {
  at::manual_seed(2);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const auto o = at::TensorOptions().dtype(dtype);
    const double s = 1e-5;
    auto x = at::randn({3, 3, 9, 11}, o).requires_grad_(true), e = at::randn({3, 3, 9, 11}, o).requires_grad_(true);
    const auto t = at::rand({3}, o), tb = t.view({3, 1, 1, 1});
    const auto [x_t, v] = ops::fm_noise(x, e, t, s);
    const auto want_xt = (1 - tb) * x + (s + tb * (1 - s)) * e, want_v = (1 - s) * e - x;
    const Tol tol = tol_for(dtype);
    const std::string what = std::string("fm_noise ") + c10::toString(dtype);
    expect_close(x_t, want_xt, tol.rtol, tol.atol, what + ", x_t");
    expect_close(v, want_v, tol.rtol, tol.atol, what + ", v");
    auto pred = at::randn({3, 3, 9, 11}, o).requires_grad_(true);
    const auto loss = ops::fm_loss(pred, v), want_loss = (pred - want_v).square().flatten(1).mean(1);
    expect_close(loss, want_loss.to(loss.scalar_type()), tol.rtol, tol.atol, "fm_loss " + std::string(c10::toString(dtype)));
    EXPECT(loss.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat)) << "fm_loss dtype " << loss.scalar_type();
    // through both ops: the loss's gradients with respect to pred, x and the noise
    const auto g = at::rand({3}, loss.options());
    const auto got_g = grads(loss, g, {pred, x, e}), want_g = grads(want_loss.to(loss.scalar_type()), g, {pred, x, e});
    for (int i = 0; i < 3; ++i) expect_close(got_g[i], want_g[i], tol.rtol, tol.atol, what + ", gradient " + std::to_string(i));
  }
}

// Every instruction set built and runnable here computes what the DEFAULT kernels compute.
OPS_TEST(instruction_sets_agree) {
  namespace cpu = dito_fast::cpu;
  using GnmsFn = decltype(&cpu::DEFAULT::gnms_kernel);
  std::vector<std::pair<const char*, GnmsFn>> variants;
#if defined(DITO_FAST_HAVE_AVX2)
  if (dito_test::cpu_runs("AVX2")) variants.push_back({"AVX2", &cpu::AVX2::gnms_kernel});
#endif
#if defined(DITO_FAST_HAVE_AVX512)
  if (dito_test::cpu_runs("AVX512")) variants.push_back({"AVX512", &cpu::AVX512::gnms_kernel});
#endif
  if (variants.empty()) throw dito_test::Skipped("only the DEFAULT kernels are built or runnable here");
  at::manual_seed(3);
  // 220 channels: vector blocks, whole vectors and a partial one on either width; both layouts.
  for (bool cl : {false, true}) {
    const auto x = at::randn({2, 220, 9, 13}).contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    const auto w = at::randn({220}), b = at::randn({220}), s = at::randn({2, 220}) * 0.3, sh = at::randn({2, 220});
    auto run = [&](GnmsFn fn) {
      auto y = at::empty_like(x);
      auto mean = at::empty({2, 20}), rstd = at::empty({2, 20});
      fn(x, 20, w, b, s, sh, 1e-5, true, y, mean, rstd);
      return std::vector<Tensor>{y, mean, rstd};
    };
    const auto want = run(&cpu::DEFAULT::gnms_kernel);
    for (const auto& [name, fn] : variants) {
      const auto got = run(fn);
      for (int i = 0; i < 3; ++i) {
        expect_close(got[i], want[i], 1e-5, 1e-5, std::string(name) + (cl ? " channels_last" : " NCHW") + " output " + std::to_string(i));
      }
    }
  }
}

// Results do not depend on the thread count: the kernels' reductions split by shape, never by threads.
OPS_TEST(thread_count_invariant) {
  if (at::get_num_threads() < 2) at::set_num_threads(2);
  const int threads = at::get_num_threads();
  at::manual_seed(4);
  const auto x = at::randn({2, 64, 32, 32}), x_cl = at::randn({1, 220, 24, 24}).contiguous(at::MemoryFormat::ChannelsLast);
  const auto w = at::randn({64}), s = at::randn({2, 64}), w_cl = at::randn({220}), s_cl = at::randn({1, 220});
  const auto z = at::randn({2, 16, 64, 64}), p = at::randn({2, 3, 128, 128}), q = at::randn({2, 3, 128, 128});
  auto run = [&] {
    return std::vector<Tensor>{std::get<0>(ops::group_norm_modulate_silu(x, 8, w, std::nullopt, s, std::nullopt)),
                               std::get<0>(ops::group_norm_modulate_silu(x_cl, 20, w_cl, std::nullopt, s_cl, std::nullopt)),
                               std::get<0>(ops::latent_layernorm(z)), ops::fm_loss(p, q)};
  };
  at::set_num_threads(1);
  const auto one = run();
  at::set_num_threads(threads);
  const auto many = run();
  const char* names[] = {"group_norm_modulate_silu NCHW", "group_norm_modulate_silu channels_last", "latent_layernorm",
                         "fm_loss"};
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT(at::equal(one[i], many[i])) << names[i] << ": 1 and " << threads << " threads differ by "
                                       << (one[i] - many[i]).abs().max().item<double>();
  }
}

// Bad input: a c10::Error naming the op and the problem, before any kernel runs.
OPS_TEST(errors_name_the_problem) {
  const auto x = at::randn({2, 6, 4, 4});
  struct Case {
    std::function<void()> call;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {[&] { ops::latent_layernorm(at::randn({2, 3, 4})); }, {"latent_layernorm", "z must be (B, C, H, W), got shape [2, 3, 4]"}},
      {[&] { ops::latent_layernorm(at::ones({2, 3, 4, 4}, at::kInt)); }, {"latent_layernorm", "z must be a floating tensor, got Int"}},
      {[&] { ops::group_norm_modulate_silu(x, 4); },
       {"group_norm_modulate_silu", "6 channels are not divisible by 4 groups"}},
      {[&] { ops::group_norm_modulate_silu(x, 3, at::randn({5})); }, {"group_norm_modulate_silu", "weight", "(6,)", "(5,)"}},
      {[&] { ops::group_norm_modulate_silu(x, 3, std::nullopt, std::nullopt, at::randn({6})); },
       {"group_norm_modulate_silu", "scale", "(2, 6)", "(6,)"}},
      {[&] { ops::fm_noise(x, x, at::rand({3})); }, {"fm_noise", "t must have shape (2)", "[3]"}},
      {[&] { ops::fm_noise(x, at::randn({2, 6, 4, 5}), at::rand({2})); }, {"fm_noise", "and noise [2, 6, 4, 5] differ in shape"}},
      {[&] { ops::fm_loss(x, at::randn({2, 6, 4, 5})); }, {"fm_loss", "and target [2, 6, 4, 5] differ in shape"}},
      {[&] { ops::fm_loss(x, x.to(at::kDouble)); }, {"fm_loss", "target dtype Double != pred dtype Float"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string msg = error_of(cases[i].call);
    for (const auto& word : cases[i].words) {
      EXPECT(msg.find(word) != std::string::npos) << "case " << i << ": \"" << word << "\" not in: " << msg;
    }
  }
}

}  // namespace
