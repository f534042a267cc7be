// The Python module dito_fast._C: importing it runs the op registrations (registration.cpp, the
// kernels' TORCH_LIBRARY_IMPL blocks, autograd.cpp), and it offers, besides two build facts, a
// direct entry point for each fused op's forward, which the dispatcher (dito_fast/ops/_dispatch.py)
// tries first whenever the cpp backend would be its choice.
//
// Why. torch.ops.dito_fast.<op>(...) is a boxed call: a Python frame (OpOverload.__call__), every
// argument parsed against the schema into an IValue stack, the boxed-to-unboxed kernel wrapper,
// and every output (the saved statistics too) wrapped as a Python tensor; the Python dispatcher
// adds some ten frames of backend selection. For the small ops that costs as much as the kernel:
// in bench_ops.py's alternated rounds (cold caches) the dito-S 8x8 group_norm_modulate_silu
// forward took 80-89 us through torch.ops and 60-68 us through an unboxed call (scratch, 2026-12-02).
//
// What. Each entry point takes the op's arguments positionally (METH_FASTCALL) and either returns
// NotImplemented, when the cpp backend would not take this call (cpp_backend_takes below: the
// same conditions as the Python backend's unsupported_reasons and autograd_mode_reasons in
// dito_fast/ops/_cpp.py and _dispatch.py, which a test compares), or makes the typed, unboxed call
// through the c10 dispatcher (dito_fast/ops.h) with the GIL released (so every dispatch key
// applies as for torch.ops: the autograd kernels, CPU or CUDA, fake tensors, Python dispatch
// modes) and returns the op's primary outputs. torch.compile cannot trace these functions; the
// dispatcher does not call them while it compiles. The argument values were checked by the Python wrappers, and the kernels
// check them again; here only their types.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <dito_fast/cpu_kernels.h>
#include <dito_fast/ops.h>

#include <optional>
#include <string>
#include <tuple>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Whether the cpp backend would take a call with these arguments (tensors or None) in the current
// modes; mirrors dito_fast/ops/_cpp.py's unsupported_reasons with _dispatch.autograd_mode_reasons
// and direct-call conditions:
// - no torch.func transform is active (their dynamic-layer dispatch key is in the TLS include set),
//   no forward-mode AD level is open, no TorchFunctionMode is active;
// - every tensor is a plain torch.Tensor or nn.Parameter (a subclass may override __torch_function__,
//   which only torch.ops honours), of a supported dtype, on the CPU, CUDA (when the CUDA kernels
//   were built) or the meta device.
bool tensor_taken(PyObject* obj) {
  if (obj == Py_None) return true;
  if (!THPVariable_CheckExact(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  const auto dtype = t.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf && dtype != at::kBFloat16) return false;
#if defined(DITO_FAST_WITH_CUDA)
  return t.is_cpu() || t.is_cuda() || t.is_meta();
#else
  return t.is_cpu() || t.is_meta();
#endif
}

template <typename... Objs>
bool cpp_backend_takes(Objs... objs) {
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerBackMode)) {
    return false;
  }
  if (torch::autograd::ForwardADLevel::try_get_by_idx(0) != nullptr) return false;
  if (at::impl::torch_function_mode_enabled()) return false;
  return (tensor_taken(objs) && ...);
}

// Argument conversion; each raises TypeError naming the function and argument.
// Tensors are taken by value (a reference each, as the boxed call's stack holds): the call does
// not depend on the Python objects staying alive and unchanged.
Tensor tensor_arg(const char* fn, const char* name, PyObject* obj) {
  if (!THPVariable_Check(obj)) {
    throw torch::TypeError(std::string(fn) + ": " + name + " must be a tensor, got " + Py_TYPE(obj)->tp_name);
  }
  return THPVariable_Unpack(obj);
}

OptTensor optional_tensor_arg(const char* fn, const char* name, PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  return tensor_arg(fn, name, obj);
}

double float_arg(const char* fn, const char* name, PyObject* obj) {
  if (!PyFloat_Check(obj) && !PyLong_Check(obj)) {
    throw torch::TypeError(std::string(fn) + ": " + name + " must be a float, got " + Py_TYPE(obj)->tp_name);
  }
  const double v = PyFloat_AsDouble(obj);
  if (v == -1.0 && PyErr_Occurred()) throw python_error();
  return v;
}

int64_t int_arg(const char* fn, const char* name, PyObject* obj) {
  if (!PyLong_Check(obj) || PyBool_Check(obj)) {
    throw torch::TypeError(std::string(fn) + ": " + name + " must be an int, got " + Py_TYPE(obj)->tp_name);
  }
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

bool bool_arg(const char* fn, const char* name, PyObject* obj) {
  if (!PyBool_Check(obj)) {
    throw torch::TypeError(std::string(fn) + ": " + name + " must be a bool, got " + Py_TYPE(obj)->tp_name);
  }
  return obj == Py_True;
}

void check_nargs(const char* fn, Py_ssize_t nargs, Py_ssize_t want) {
  if (nargs != want) {
    throw torch::TypeError(std::string(fn) + " takes " + std::to_string(want) + " positional arguments, got " +
                           std::to_string(nargs));
  }
}

// Runs the dispatcher call with the GIL released (a Python kernel on the way, e.g. a fake kernel
// under torch.compile or a dispatch mode, takes it back itself).
template <typename F>
auto without_gil(F&& call) {
  struct Release {
    PyThreadState* state = PyEval_SaveThread();
    ~Release() { PyEval_RestoreThread(state); }
  } release;
  return call();
}

// ---- the entry points ----------------------------------------------------------------------------

PyObject* fm_noise(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "fm_noise";
  check_nargs(fn, nargs, 4);
  const Tensor x = tensor_arg(fn, "x", args[0]);
  const Tensor noise = tensor_arg(fn, "noise", args[1]);
  const Tensor t = tensor_arg(fn, "t", args[2]);
  const double sigma_min = float_arg(fn, "sigma_min", args[3]);
  if (!cpp_backend_takes(args[0], args[1], args[2])) Py_RETURN_NOTIMPLEMENTED;
  auto [x_t, v] = without_gil([&] { return dito_fast::ops::fm_noise(x, noise, t, sigma_min); });
  THPObjectPtr first(THPVariable_Wrap(std::move(x_t)));
  if (!first) throw python_error();
  THPObjectPtr second(THPVariable_Wrap(std::move(v)));
  if (!second) throw python_error();
  PyObject* out = PyTuple_Pack(2, first.get(), second.get());
  if (out == nullptr) throw python_error();
  return out;
  END_HANDLE_TH_ERRORS
}

PyObject* fm_loss(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "fm_loss";
  check_nargs(fn, nargs, 2);
  const Tensor pred = tensor_arg(fn, "pred", args[0]);
  const Tensor target = tensor_arg(fn, "target", args[1]);
  if (!cpp_backend_takes(args[0], args[1])) Py_RETURN_NOTIMPLEMENTED;
  return THPVariable_Wrap(without_gil([&] { return dito_fast::ops::fm_loss(pred, target); }));
  END_HANDLE_TH_ERRORS
}

PyObject* latent_layernorm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "latent_layernorm";
  check_nargs(fn, nargs, 2);
  const Tensor z = tensor_arg(fn, "z", args[0]);
  const double eps = float_arg(fn, "eps", args[1]);
  if (!cpp_backend_takes(args[0])) Py_RETURN_NOTIMPLEMENTED;
  return THPVariable_Wrap(std::get<0>(without_gil([&] { return dito_fast::ops::latent_layernorm(z, eps); })));
  END_HANDLE_TH_ERRORS
}

PyObject* group_norm_modulate_silu(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "group_norm_modulate_silu";
  check_nargs(fn, nargs, 8);
  const Tensor x = tensor_arg(fn, "x", args[0]);
  const int64_t num_groups = int_arg(fn, "num_groups", args[1]);
  const OptTensor weight = optional_tensor_arg(fn, "weight", args[2]);
  const OptTensor bias = optional_tensor_arg(fn, "bias", args[3]);
  const OptTensor scale = optional_tensor_arg(fn, "scale", args[4]);
  const OptTensor shift = optional_tensor_arg(fn, "shift", args[5]);
  const double eps = float_arg(fn, "eps", args[6]);
  const bool silu = bool_arg(fn, "silu", args[7]);
  if (!cpp_backend_takes(args[0], args[2], args[3], args[4], args[5])) Py_RETURN_NOTIMPLEMENTED;
  return THPVariable_Wrap(std::get<0>(without_gil(
      [&] { return dito_fast::ops::group_norm_modulate_silu(x, num_groups, weight, bias, scale, shift, eps, silu); })));
  END_HANDLE_TH_ERRORS
}

// ---- build facts ---------------------------------------------------------------------------------

PyObject* cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(dito_fast::cpu::capability_name()); }

PyObject* has_cuda(PyObject*, PyObject*) {
#if defined(DITO_FAST_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

#define FASTCALL(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f)), METH_FASTCALL

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "Instruction set of the CPU kernels in use."},
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels were built."},
    {"fm_noise", FASTCALL(fm_noise),
     "fm_noise(x, noise, t, sigma_min) -> (x_t, v), or NotImplemented: torch.ops.dito_fast.fm_noise, unboxed."},
    {"fm_loss", FASTCALL(fm_loss),
     "fm_loss(pred, target) -> loss (B,), or NotImplemented: torch.ops.dito_fast.fm_loss, unboxed."},
    {"latent_layernorm", FASTCALL(latent_layernorm),
     "latent_layernorm(z, eps) -> y, or NotImplemented: torch.ops.dito_fast.latent_layernorm's first output, "
     "unboxed."},
    {"group_norm_modulate_silu", FASTCALL(group_norm_modulate_silu),
     "group_norm_modulate_silu(x, num_groups, weight, bias, scale, shift, eps, silu) -> y, or NotImplemented: "
     "torch.ops.dito_fast.group_norm_modulate_silu's first output, unboxed."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dito_fast's C++/CUDA kernels (registered as torch.ops.dito_fast).",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
