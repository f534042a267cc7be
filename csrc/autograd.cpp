// Autograd formulas of dito_fast's custom ops, registered in C++ for the Autograd dispatch key
// (every device: CPU, CUDA, meta/fake tensors under torch.compile).
//
// Each op's Autograd kernel either redispatches straight below autograd (grad mode off, or no
// input requires grad: no graph node is built) or runs the forward below autograd and attaches a
// backward node to its differentiable output, as ATen's generated VariableType kernels do. The
// nodes (torch::autograd::Node subclasses below) keep their saved tensors as SavedVariables, so
// saved-tensor hooks (activation checkpointing, offloading) and "backward through the graph a
// second time" errors behave as for ATen ops, and call the registered backward ops
// (fm_noise_backward, fm_loss_backward, latent_layernorm_backward,
// group_norm_modulate_silu_backward), also below autograd: they have no autograd formulas of their
// own. Called directly with inputs that require grad, their Autograd kernel (not_differentiable)
// gives outputs that raise when differentiated.
//
// Why not torch::autograd::Function (used here before): its generic machinery (a context with a
// string-keyed map of saved values, per-input and per-output bookkeeping, a demangled type name
// built on every backward call) is a large part of a small op's time. Built both ways and
// alternated in bench_ops.py's interleaved rounds (2026-12-02, scratch), the switch took
// latent_layernorm's forward+backward from 2.4-2.8x to 2.6-3.3x the eager reference's speed at the
// latents, and the flow-matching step's from 2.2-3.1x to 2.5-3.0x; in a one-op stand-in (x * 2 in
// a C++ Function, in a node, and ATen's own) the Function cost 75-91 us per forward+backward with
// cold caches where the node and ATen's op cost 55-75 us.
//
// Backward formulas are once differentiable: the backward ops have no autograd formulas of their
// own, so asking for a double backward (create_graph=True with grads or saved tensors that require
// grad) returns gradients whose grad_fn raises "<op>: double backward is not supported" when
// differentiated, like Python's @once_differentiable. Dual tensors (forward-mode AD) are refused
// with an error rather than their tangents dropped, and so is a node recorded under torch.func.
#include <ATen/FuncTorchTLS.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace dito_fast {
namespace {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
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
inline bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
inline bool has_tangent(const OptTensor& t) { return t.has_value() && has_tangent(*t); }

// Refuses forward-mode AD, which the nodes cannot serve (its tangents would be dropped), grad mode
// or not. The Python dispatchers fall back to the reference there; this catches direct torch.ops calls.
template <typename... Ts>
void check_no_tangents(const char* op, const Ts&... ts) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(has_tangent(ts) || ...), op,
                              ": forward-mode AD (dual tensors) is not supported; use backend='ref'");
}

// Whether a call must record a graph node: grad mode is on and some tensor input requires grad.
// Recording one under torch.func transforms is refused, as torch::autograd::Function refuses it
// (the Python dispatchers fall back to the reference there; this catches direct torch.ops calls).
template <typename... Ts>
bool needs_graph(const Ts&... ts) {
  if (!(c10::GradMode::is_enabled() && (requires_grad(ts) || ...))) return false;
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) {
    functorch_tls->checkSupportsCppAutogradFunction();
  }
  return true;
}

// torch::autograd::Node's owning pointer: c10::intrusive_ptr since torch 2.13, std::shared_ptr
// before (2.11, which setup.py also accepts); new_node makes whichever this torch's Edge holds.
using NodePtr = decltype(torch::autograd::Edge::function);
template <typename N, typename... As>
auto new_node(As&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>(std::forward<As>(args)...);
  } else {
    return c10::make_intrusive<N>(std::forward<As>(args)...);
  }
}

// A backward node of type N whose gradient edges lead to the given inputs, in order (an absent or
// undefined input gets an empty edge; its gradient slot in N::apply's result is then ignored).
template <typename N, typename... Ts>
auto make_node(const Ts&... inputs) {
  auto node = new_node<N>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

inline Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
inline OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Outputs that differentiating raises `message` for: fresh tensors (sharing storage and version
// counter with `out`'s) whose grad_fn is an Error node with edges to `sources`, the tensors the
// values were computed from (undefined outputs stay undefined). The edges matter: through them
// `torch.autograd.grad` of anything computed from the outputs, with respect to any tensor they
// depend on, reaches the Error node and raises, instead of skipping it and silently leaving that
// path's contribution out (as an Error node hung on detached leaves would, Python's
// @once_differentiable included).
variable_list refuse_differentiation(const std::string& message, variable_list out, const variable_list& sources) {
  auto err = new_node<torch::autograd::Error>(message, torch::autograd::collect_next_edges(sources));
  for (auto& o : out) {
    if (o.defined()) o = o.tensor_data();
    torch::autograd::set_history(o, err);  // an undefined output keeps its slot
  }
  return out;
}

// Runs a backward body. Without create_graph (grad mode off in backward) it just calls it. With
// create_graph and incoming grads or saved tensors that require grad, it computes under no_grad
// and routes the results through an Error node with edges to those tensors, so differentiating
// them again raises a clear error instead of silently producing no (or a wrong) second-order gradient.
template <typename F>
variable_list once_differentiable(const char* op, const variable_list& grads, const variable_list& saved, F&& body) {
  variable_list sources;
  if (c10::GradMode::is_enabled()) {
    for (const auto& v : {&grads, &saved}) {
      for (const auto& t : *v) {
        if (requires_grad(t)) sources.push_back(t);
      }
    }
  }
  if (sources.empty()) return body();
  variable_list out;
  {
    at::AutoGradMode no_grad(false);
    out = body();
  }
  return refuse_differentiation(std::string(op) + ": double backward is not supported by the cpp backend "
                                "(use backend='ref')", std::move(out), sources);
}

// The Autograd kernel of the ops that have no derivative of their own (the backward ops, and
// winograd_conv3x3_weight_grad), for direct torch.ops calls: the nodes above call them below
// autograd. It runs the op below autograd and, when grad mode is on and a tensor input requires
// grad, makes differentiating its outputs raise a clear error. Without it the call would reach the
// boxed autograd fallback, which warns and then gives no gradient.
void not_differentiable(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t n_in = op.schema().arguments().size(), n_out = op.schema().returns().size();
  variable_list sources;
  if (c10::GradMode::is_enabled()) {
    for (size_t i = stack->size() - n_in; i < stack->size(); ++i) {
      const c10::IValue& v = (*stack)[i];
      if (v.isTensor() && requires_grad(v.toTensor())) sources.push_back(v.toTensor());
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.callBoxed(stack);
  }
  if (sources.empty()) return;
  variable_list out;
  for (size_t i = stack->size() - n_out; i < stack->size(); ++i) out.push_back((*stack)[i].toTensor());
  out = refuse_differentiation(op.schema().name() + " has no derivative of its own (a backward formula): "
                                                    "its outputs cannot be differentiated (double backward "
                                                    "through the cpp backend is not supported; use backend='ref')",
                               std::move(out), sources);
  for (size_t j = 0; j < n_out; ++j) (*stack)[stack->size() - n_out + j] = std::move(out[j]);
}

// ---- fm_noise ------------------------------------------------------------------------------------
using FmNoiseSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double);
using FmNoiseBackwardSig = std::tuple<Tensor, Tensor>(const OptTensor&, const OptTensor&, const Tensor&, double);

const c10::TypedOperatorHandle<FmNoiseSig>& fm_noise_op() {
  static const auto op = find_op<FmNoiseSig>("dito_fast::fm_noise");
  return op;
}

// Inputs (x, noise, t), outputs (x_t, v). Either output's gradient may be absent. t's gradient,
// sum over each sample of grad_x_t * dx_t/dt = grad_x_t * v (v does not depend on t), is rarely
// wanted (t is sampled); it is computed with ATen ops, in the accumulation type, from x and noise,
// which the node saves only when t requires grad.
struct FmNoiseBackward final : public Node {
  SavedVariable t_, x_, noise_;
  double sigma_min_ = 0;

  std::string name() const override { return "dito_fast::FmNoiseBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    t_.reset_data();
    x_.reset_data();
    noise_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static const auto backward_op = find_op<FmNoiseBackwardSig>("dito_fast::fm_noise_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    // v has no history when neither x nor noise requires grad (t alone: v does not depend on it)
    const Tensor grad_v = grads.size() > 1 ? grads[1] : Tensor();
    const bool want_t = task_should_compute_output(2) && grads[0].defined();
    if ((!grads[0].defined() && !grad_v.defined()) ||
        !(task_should_compute_output(0) || task_should_compute_output(1) || want_t)) {
      return variable_list(3);
    }
    const Tensor t = t_.unpack();
    const Tensor x = want_t ? x_.unpack() : Tensor(), noise = want_t ? noise_.unpack() : Tensor();
    return once_differentiable("fm_noise", grads, {t, x, noise}, [&]() -> variable_list {
      auto [grad_x, grad_noise] = call_below_autograd(backward_op, opt(grads[0]), opt(grad_v), t, sigma_min_);
      Tensor grad_t;
      if (want_t) {
        const auto acc = at::toOpMathType(x.scalar_type());
        const Tensor v = noise.to(acc).mul(1.0 - sigma_min_).sub(x.to(acc));
        // per-sample sums; the batch size stays symbolic under torch.compile's dynamic shapes
        grad_t = grads[0].to(acc).mul(v).reshape_symint({x.sym_size(0), -1}).sum(at::IntArrayRef{1});
        grad_t = grad_t.to(t.scalar_type());
      }
      return {grad_x, grad_noise, grad_t};
    });
  }
};

std::tuple<Tensor, Tensor> fm_noise_autograd(const Tensor& x, const Tensor& noise, const Tensor& t, double sigma_min) {
  check_no_tangents("fm_noise", x, noise, t);
  if (!needs_graph(x, noise, t)) return call_below_autograd(fm_noise_op(), x, noise, t, sigma_min);
  auto node = make_node<FmNoiseBackward>(x, noise, t);
  auto [x_t, v] = call_below_autograd(fm_noise_op(), x, noise, t, sigma_min);
  node->t_ = SavedVariable(t, /*is_output=*/false);
  if (t.requires_grad()) {
    node->x_ = SavedVariable(x, /*is_output=*/false);
    node->noise_ = SavedVariable(noise, /*is_output=*/false);
  }
  node->sigma_min_ = sigma_min;
  torch::autograd::set_history(x_t, node);
  if (needs_graph(x, noise)) torch::autograd::set_history(v, node);
  return {x_t, v};
}

// ---- fm_loss -------------------------------------------------------------------------------------
using FmLossSig = Tensor(const Tensor&, const Tensor&);
using FmLossBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<FmLossSig>& fm_loss_op() {
  static const auto op = find_op<FmLossSig>("dito_fast::fm_loss");
  return op;
}

// Inputs (pred, target), output the per-sample loss (B,).
struct FmLossBackward final : public Node {
  SavedVariable pred_, target_;

  std::string name() const override { return "dito_fast::FmLossBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    pred_.reset_data();
    target_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static const auto backward_op = find_op<FmLossBackwardSig>("dito_fast::fm_loss_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    const bool want_pred = task_should_compute_output(0), want_target = task_should_compute_output(1);
    if (!grads[0].defined() || !(want_pred || want_target)) return variable_list(2);
    const Tensor pred = pred_.unpack(), target = target_.unpack();
    return once_differentiable("fm_loss", grads, {pred, target}, [&]() -> variable_list {
      Tensor g = call_below_autograd(backward_op, grads[0], pred, target);
      return {want_pred ? g : Tensor(), want_target ? g.neg() : Tensor()};  // d/dtarget = -d/dpred
    });
  }
};

Tensor fm_loss_autograd(const Tensor& pred, const Tensor& target) {
  check_no_tangents("fm_loss", pred, target);
  if (!needs_graph(pred, target)) return call_below_autograd(fm_loss_op(), pred, target);
  auto node = make_node<FmLossBackward>(pred, target);
  Tensor loss = call_below_autograd(fm_loss_op(), pred, target);
  node->pred_ = SavedVariable(pred, false);
  node->target_ = SavedVariable(target, false);
  torch::autograd::set_history(loss, node);
  return loss;
}

// ---- latent_layernorm ----------------------------------------------------------------------------
using LlnSig = std::tuple<Tensor, Tensor>(const Tensor&, double);
using LlnBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<LlnSig>& lln_op() {
  static const auto op = find_op<LlnSig>("dito_fast::latent_layernorm");
  return op;
}

// Input z, outputs (y, rstd); rstd is not differentiable. The backward needs only y and rstd.
struct LatentLayerNormBackward final : public Node {
  SavedVariable y_, rstd_;  // y is this node's own output

  std::string name() const override { return "dito_fast::LatentLayerNormBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    y_.reset_data();
    rstd_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static const auto backward_op = find_op<LlnBackwardSig>("dito_fast::latent_layernorm_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined() || !task_should_compute_output(0)) return variable_list(1);
    const Tensor y = y_.unpack(getptr()), rstd = rstd_.unpack();
    return once_differentiable("latent_layernorm", grads, {y, rstd}, [&]() -> variable_list {
      return {call_below_autograd(backward_op, grads[0], y, rstd)};
    });
  }
};

std::tuple<Tensor, Tensor> lln_autograd(const Tensor& z, double eps) {
  check_no_tangents("latent_layernorm", z);
  if (!needs_graph(z)) return call_below_autograd(lln_op(), z, eps);
  auto node = make_node<LatentLayerNormBackward>(z);
  auto [y, rstd] = call_below_autograd(lln_op(), z, eps);
  torch::autograd::set_history(y, node);  // before saving y: a saved output refers to its node
  node->y_ = SavedVariable(y, /*is_output=*/true);
  node->rstd_ = SavedVariable(rstd, false);
  return {y, rstd};
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

// Inputs (x, weight, bias, scale, shift), the last four optional; outputs (y, mean, rstd), the
// statistics not differentiable.
struct GroupNormModulateSiluBackward final : public Node {
  SavedVariable x_, mean_, rstd_, weight_, bias_, scale_, shift_;  // absent parameters: undefined
  int64_t num_groups_ = 1;
  bool silu_ = true;

  std::string name() const override { return "dito_fast::GroupNormModulateSiluBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* s : {&x_, &mean_, &rstd_, &weight_, &bias_, &scale_, &shift_}) s->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static const auto backward_op = find_op<GnmsBackwardSig>("dito_fast::group_norm_modulate_silu_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return variable_list(5);
    const variable_list s = {x_.unpack(),      mean_.unpack(),  rstd_.unpack(), weight_.unpack(),
                             bias_.unpack(),   scale_.unpack(), shift_.unpack()};
    return once_differentiable("group_norm_modulate_silu", grads, s, [&]() -> variable_list {
      auto [dx, dw, db, ds, dsh] = call_below_autograd(backward_op, grads[0], s[0], s[1], s[2], num_groups_, opt(s[3]),
                                                       opt(s[4]), opt(s[5]), opt(s[6]), silu_);
      // Absent parameters come back as empty (0,) tensors: no gradient for them.
      auto keep = [](const Tensor& grad, const Tensor& param) { return param.defined() ? grad : Tensor(); };
      return {dx, keep(dw, s[3]), keep(db, s[4]), keep(ds, s[5]), keep(dsh, s[6])};
    });
  }
};

std::tuple<Tensor, Tensor, Tensor> gnms_autograd(const Tensor& x, int64_t num_groups, const OptTensor& weight,
                                                 const OptTensor& bias, const OptTensor& scale, const OptTensor& shift,
                                                 double eps, bool silu) {
  check_no_tangents("group_norm_modulate_silu", x, weight, bias, scale, shift);
  if (!needs_graph(x, weight, bias, scale, shift)) {
    return call_below_autograd(gnms_op(), x, num_groups, weight, bias, scale, shift, eps, silu);
  }
  auto node = make_node<GroupNormModulateSiluBackward>(x, weight, bias, scale, shift);
  auto [y, mean, rstd] = call_below_autograd(gnms_op(), x, num_groups, weight, bias, scale, shift, eps, silu);
  node->x_ = SavedVariable(x, false);
  node->mean_ = SavedVariable(mean, false);
  node->rstd_ = SavedVariable(rstd, false);
  node->weight_ = SavedVariable(or_undefined(weight), false);
  node->bias_ = SavedVariable(or_undefined(bias), false);
  node->scale_ = SavedVariable(or_undefined(scale), false);
  node->shift_ = SavedVariable(or_undefined(shift), false);
  node->num_groups_ = num_groups;
  node->silu_ = silu;
  torch::autograd::set_history(y, node);
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(dito_fast, Autograd, m) {
  m.impl("fm_noise", &fm_noise_autograd);
  m.impl("fm_loss", &fm_loss_autograd);
  m.impl("latent_layernorm", &lln_autograd);
  m.impl("group_norm_modulate_silu", &gnms_autograd);
  for (const char* name : {"fm_noise_backward", "fm_loss_backward", "latent_layernorm_backward",
                           "group_norm_modulate_silu_backward", "winograd_conv3x3_weight_grad",
                           "winograd_filter", "winograd_filter_adjoint"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  }
}

}  // namespace dito_fast
