// Autograd formulas of dito_fast's custom ops, registered in C++ for the Autograd dispatch key
// (every device: CPU, CUDA, meta/fake tensors under torch.compile).
//
// Each op's Autograd kernel either redispatches straight below autograd (grad mode off, or no
// input requires grad: no graph node is built) or runs a torch::autograd::Function whose forward
// redispatches below autograd and whose backward calls the registered backward ops
// (fm_noise_backward, fm_loss_backward, latent_layernorm_backward,
// group_norm_modulate_silu_backward), also below autograd: they have no autograd formulas, and
// going through the Autograd key would only reach the boxed autograd fallback. Keeping this in C++
// rather than torch.library's Python register_autograd removes the Python autograd.Function
// machinery from every call.
//
// Backward formulas are once differentiable: the backward ops have no autograd formulas of their
// own, so asking for a double backward (create_graph=True with grads or saved tensors that require
// grad) returns gradients whose grad_fn raises "<op>: double backward is not supported" when
// differentiated, like Python's @once_differentiable.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>

namespace dito_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptTensor = std::optional<Tensor>;

// ---- helpers -------------------------------------------------------------------------------------

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Call op with autograd (and ADInplaceOrView) excluded: the device (or fake) kernel runs directly.
template <typename Sig, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

inline bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const OptTensor& t) { return t.has_value() && requires_grad(*t); }

// Whether a call must record a graph node: grad mode is on and some tensor input requires grad.
template <typename... Ts>
bool needs_graph(const Ts&... ts) {
  return c10::GradMode::is_enabled() && (requires_grad(ts) || ...);
}

inline OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Runs a backward body. Without create_graph (grad mode off in backward) it just calls it. With
// create_graph and incoming grads or saved tensors that require grad, it computes under no_grad
// and routes the results through a DelayedError node, so differentiating them again raises a
// clear error instead of silently producing no (or a wrong) second-order gradient.
template <typename F>
variable_list once_differentiable(const char* op, const variable_list& grads, const variable_list& saved, F&& body) {
  bool any = false;
  if (c10::GradMode::is_enabled()) {
    for (const auto& g : grads) any = any || requires_grad(g);
    for (const auto& v : saved) any = any || requires_grad(v);
  }
  if (!any) return body();
  variable_list out;
  {
    at::AutoGradMode no_grad(false);
    out = body();
  }
  for (auto& o : out) {
    if (o.defined()) {
      o = o.detach();
      o.set_requires_grad(true);
    }
  }
  auto err = std::make_shared<torch::autograd::DelayedError>(std::string(op) + ": double backward is not supported",
                                                             static_cast<int64_t>(out.size()));
  return err->apply(std::move(out));
}

// ---- fm_noise ------------------------------------------------------------------------------------
using FmNoiseSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double);
using FmNoiseBackwardSig = std::tuple<Tensor, Tensor>(const OptTensor&, const OptTensor&, const Tensor&, double);

const c10::TypedOperatorHandle<FmNoiseSig>& fm_noise_op() {
  static const auto op = find_op<FmNoiseSig>("dito_fast::fm_noise");
  return op;
}

struct FmNoise : public torch::autograd::Function<FmNoise> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& noise, const Tensor& t,
                               double sigma_min) {
    ctx->set_materialize_grads(false);  // the backward kernel skips an absent grad_xt or grad_v
    ctx->save_for_backward({t});
    ctx->saved_data["sigma_min"] = sigma_min;
    auto [x_t, v] = call_below_autograd(fm_noise_op(), x, noise, t, sigma_min);
    return {x_t, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<FmNoiseBackwardSig>("dito_fast::fm_noise_backward");
    if ((!grads[0].defined() && !grads[1].defined()) || !(ctx->needs_input_grad(0) || ctx->needs_input_grad(1))) {
      return {Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const auto saved = ctx->get_saved_variables();  // t
    const double sigma_min = ctx->saved_data["sigma_min"].toDouble();
    return once_differentiable("fm_noise", grads, saved, [&]() -> variable_list {
      auto [grad_x, grad_noise] = call_below_autograd(backward_op, opt(grads[0]), opt(grads[1]), saved[0], sigma_min);
      return {grad_x, grad_noise, Tensor(), Tensor()};  // t and sigma_min: not differentiable
    });
  }
};

std::tuple<Tensor, Tensor> fm_noise_autograd(const Tensor& x, const Tensor& noise, const Tensor& t, double sigma_min) {
  if (!needs_graph(x, noise, t)) return call_below_autograd(fm_noise_op(), x, noise, t, sigma_min);
  auto out = FmNoise::apply(x, noise, t, sigma_min);
  return {out[0], out[1]};
}

// ---- fm_loss -------------------------------------------------------------------------------------
using FmLossSig = Tensor(const Tensor&, const Tensor&);
using FmLossBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<FmLossSig>& fm_loss_op() {
  static const auto op = find_op<FmLossSig>("dito_fast::fm_loss");
  return op;
}

struct FmLoss : public torch::autograd::Function<FmLoss> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({pred, target});
    return call_below_autograd(fm_loss_op(), pred, target);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<FmLossBackwardSig>("dito_fast::fm_loss_backward");
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    const bool want_pred = ctx->needs_input_grad(0), want_target = ctx->needs_input_grad(1);
    return once_differentiable("fm_loss", grads, saved, [&]() -> variable_list {
      Tensor g = call_below_autograd(backward_op, grads[0], saved[0], saved[1]);
      return {want_pred ? g : Tensor(), want_target ? g.neg() : Tensor()};  // d/dtarget = -d/dpred
    });
  }
};

Tensor fm_loss_autograd(const Tensor& pred, const Tensor& target) {
  if (!needs_graph(pred, target)) return call_below_autograd(fm_loss_op(), pred, target);
  return FmLoss::apply(pred, target);
}

// ---- latent_layernorm ----------------------------------------------------------------------------
using LlnSig = std::tuple<Tensor, Tensor>(const Tensor&, double);
using LlnBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<LlnSig>& lln_op() {
  static const auto op = find_op<LlnSig>("dito_fast::latent_layernorm");
  return op;
}

struct LatentLayerNorm : public torch::autograd::Function<LatentLayerNorm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& z, double eps) {
    ctx->set_materialize_grads(false);
    auto [y, rstd] = call_below_autograd(lln_op(), z, eps);
    ctx->save_for_backward({y, rstd});  // the backward needs only the output and 1/std
    ctx->mark_non_differentiable({rstd});
    return {y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<LlnBackwardSig>("dito_fast::latent_layernorm_backward");
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    return once_differentiable("latent_layernorm", grads, saved, [&]() -> variable_list {
      return {call_below_autograd(backward_op, grads[0], saved[0], saved[1]), Tensor()};
    });
  }
};

std::tuple<Tensor, Tensor> lln_autograd(const Tensor& z, double eps) {
  if (!needs_graph(z)) return call_below_autograd(lln_op(), z, eps);
  auto out = LatentLayerNorm::apply(z, eps);
  return {out[0], out[1]};
}

// ---- group_norm_modulate_silu --------------------------------------------------------------------
using GnmsSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, const OptTensor&, const OptTensor&,
                                                   const OptTensor&, const OptTensor&, double, bool);
using GnmsBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, bool);

const c10::TypedOperatorHandle<GnmsSig>& gnms_op() {
  static const auto op = find_op<GnmsSig>("dito_fast::group_norm_modulate_silu");
  return op;
}

struct GroupNormModulateSilu : public torch::autograd::Function<GroupNormModulateSilu> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t num_groups, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& scale, const OptTensor& shift, double eps,
                               bool silu) {
    ctx->set_materialize_grads(false);
    auto [y, mean, rstd] = call_below_autograd(gnms_op(), x, num_groups, weight, bias, scale, shift, eps, silu);
    auto or_undefined = [](const OptTensor& t) { return t.has_value() ? *t : Tensor(); };
    ctx->save_for_backward({x, mean, rstd, or_undefined(weight), or_undefined(bias), or_undefined(scale),
                            or_undefined(shift)});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<GnmsBackwardSig>("dito_fast::group_norm_modulate_silu_backward");
    if (!grads[0].defined()) return variable_list(8);
    const auto s = ctx->get_saved_variables();  // x, mean, rstd, weight, bias, scale, shift
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt();
    const bool silu = ctx->saved_data["silu"].toBool();
    return once_differentiable("group_norm_modulate_silu", grads, s, [&]() -> variable_list {
      auto [dx, dw, db, ds, dsh] =
          call_below_autograd(backward_op, grads[0], s[0], s[1], s[2], num_groups, opt(s[3]), opt(s[4]), opt(s[5]),
                              opt(s[6]), silu);
      // Absent parameters come back as empty (0,) tensors: no gradient for them.
      auto keep = [](const Tensor& grad, const Tensor& param) { return param.defined() ? grad : Tensor(); };
      return {dx, Tensor(), keep(dw, s[3]), keep(db, s[4]), keep(ds, s[5]), keep(dsh, s[6]), Tensor(), Tensor()};
    });
  }
};

std::tuple<Tensor, Tensor, Tensor> gnms_autograd(const Tensor& x, int64_t num_groups, const OptTensor& weight,
                                                 const OptTensor& bias, const OptTensor& scale, const OptTensor& shift,
                                                 double eps, bool silu) {
  if (!needs_graph(x, weight, bias, scale, shift)) {
    return call_below_autograd(gnms_op(), x, num_groups, weight, bias, scale, shift, eps, silu);
  }
  auto out = GroupNormModulateSilu::apply(x, num_groups, weight, bias, scale, shift, eps, silu);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, Autograd, m) {
  m.impl("fm_noise", &fm_noise_autograd);
  m.impl("fm_loss", &fm_loss_autograd);
  m.impl("latent_layernorm", &lln_autograd);
  m.impl("group_norm_modulate_silu", &gnms_autograd);
}

}  // namespace dito_fast
