"""3x3 convolution with stride 1 and padding 1 (every 3x3 convolution of the UNet and the encoder).

Backends:
- ``cpp``: Winograd F(MxM, 3x3) on the CPU (csrc/ops/conv3x3), M = 4 or 2 (:func:`winograd_tile`):
  per output, the GEMMs do 2.25 (M = 4) or 4 (M = 2) multiply-adds per channel pair where a
  direct convolution does 9. The filter is transformed by ``winograd_filter`` (a C++ kernel), the
  activations per tile in C++; the GEMMs go through oneDNN for float32 (MKL's batched GEMM for
  float64, or where a filter comes in the other layout). The input gradient uses the same
  transformed filter (the convolution with the flipped filter is the flipped convolution of the
  flipped image, and the C++ transforms read and write the image flipped); the filter gradient is formed in the Winograd domain, then the
  adjoint filter transform, which autograd derives from ``winograd_filter``. float32 and float64;
  activations are processed channels_last (an NCHW input is converted, and the output keeps the
  input's layout). Not chosen automatically for convolutions with fewer than
  ``MIN_WINOGRAD_CHANNELS`` input or output channels, where the GEMMs are too thin to pay for the
  transforms (an explicit ``backend="cpp"`` or ``DITO_FAST_BACKEND`` still runs it).
- ``ref``: ``F.conv2d`` (oneDNN on CPU, cuDNN on CUDA), the specification. On CUDA this is the
  backend used: cuDNN already picks Winograd/implicit-GEMM algorithms there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import register_flop_formula
from torch.utils.weak import WeakIdKeyDictionary

from . import _cpp
from ._cpp import memory_format_of, one_device
from ._dispatch import Backend, always_supported, autograd_mode_reasons, check_dtype, dispatch, env_backend, getenv

MIN_WINOGRAD_CHANNELS = 32

# G of F(2x2, 3x3) and F(4x4, 3x3) (points 0, +-1, +-2 and infinity): U = G g G^T for a 3x3 filter
# g; as one matrix on flattened filters, vec(U) = kron(G, G) vec(g).
_G = {
    2: torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64),
    4: torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                     [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64),
}
_KRON = {m: torch.kron(g, g) for m, g in _G.items()}  # ((m + 2)^2, 9)
_kron_cache: dict = {}


# The automatic tile: F(4x4, 3x3) once a convolution has at least this many 4x4 output tiles.
# With fewer, its GEMMs are too short and its filter transform (36 positions against 16) too
# large a part of the work: measured here, B=8 at 8x8 (32 tiles) is even and B=1 at 16x16
# (16 tiles) 1.4x slower than F(2x2), while B=1 at 32x32 (64 tiles) is 1.2-1.3x faster.
MIN_TILE4_TILES = 64


def winograd_tile(x: torch.Tensor) -> int:
    """Output tile M (2 or 4) of the CPU Winograd convolution of activation ``x`` (B, C, H, W).

    ``DITO_FAST_WINOGRAD_TILE``: ``auto`` (default) takes 4 when ``x`` has at least
    ``MIN_TILE4_TILES`` 4x4 output tiles, else 2; ``4`` or ``2`` forces one. F(4x4, 3x3) does 4x
    fewer GEMM multiply-adds than a direct convolution, F(2x2, 3x3) 2.25x fewer. The costs of
    F(4x4): float32 error up to ~1.3e-5 of the output's largest value (F(2x2) and oneDNN: 2e-7 to
    1.8e-6), below bfloat16's rounding where activations are of one scale; the error is that of
    each 6x6 input tile's largest value, so an outlier spreads it to the outputs up to 3 pixels
    around it whose own 3x3 windows do not hold it (one activation of 1e3 among N(0, 1) ones: 5e-3
    on outputs of ~0.6, 0.8%; DITO_FAST_WINOGRAD_TILE=2 for activations with such outliers); a
    transformed filter 4x the weight's size (F(2x2):
    1.8x), which training keeps for the backward and inference caches; a NaN input spreads over the
    whole 4x4 output tiles around it (F(2x2): exactly the direct convolution's NaN outputs), and an
    inf input gives NaN (inf - inf in the transforms) in the tiles around it where the direct
    convolution gives inf, with either tile, and an inf filter tap makes its whole output channel
    NaN (the direct convolution: +-inf); the transforms also grow values (up to ~100x for
    F(4x4)), so float32 inputs beyond ~1e36 (F(4x4)) or ~1e38 (F(2x2)) overflow where the direct
    convolution stays finite.
    """
    raw = getenv("DITO_FAST_WINOGRAD_TILE", "auto").strip()
    if raw in ("auto", ""):
        B, _, H, W = x.shape
        return 4 if B * ((H + 3) // 4) * ((W + 3) // 4) >= MIN_TILE4_TILES else 2
    if raw in ("2", "4"):
        return int(raw)
    raise ValueError(f"DITO_FAST_WINOGRAD_TILE must be auto, 2 or 4, got {raw!r}")


def _kron(tile, dtype, device):
    key = (tile, dtype, device)
    if key not in _kron_cache:
        # a normal tensor even when first asked for under inference_mode: autograd saves it later
        with torch.inference_mode(False):
            _kron_cache[key] = _KRON[tile].to(dtype=dtype, device=device, copy=True)
    return _kron_cache[key]


class _FilterTransform(torch.autograd.Function):
    """u = G g G^T of every filter g of a contiguous CPU float32/float64 weight, by the C++ kernel
    (``dito_fast::winograd_filter``: each filter's nine taps transformed in registers); the
    backward is the adjoint kernel (``winograd_filter_adjoint``, dg = G^T du G), which writes the
    weight's gradient contiguous. As one GEMM, u = kron(G, G) w^T ((36 x 9) x (9 x C_out C_in))
    and its adjoint, with the copy to the weight's layout, spent 221 of dito-S's 2026 ms train step
    (torch.profiler, 2 threads, AMD EPYC Zen 4, 2026-12-04): a GEMM with 9 as its inner or outer
    dimension runs far below the machine's rate. Under torch.func transforms and forward-mode AD,
    and without the extension, winograd_filter uses the plain product instead (a custom jvp would
    stop torch.compile from tracing this Function)."""

    @staticmethod
    def forward(weight, tile, out_channels_last):
        return _FILTER(weight, tile, out_channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.tile = inputs[1]

    @staticmethod
    def backward(ctx, du):
        if torch.is_grad_enabled():  # create_graph: the adjoint as a product autograd can differentiate
            co, ci = du.shape[1:]
            k = _kron(ctx.tile, du.dtype, du.device)
            return (k.t() @ du.reshape(k.shape[0], co * ci)).t().reshape(co, ci, 3, 3), None, None
        return _FILTER_ADJOINT(du), None, None


def winograd_filter(weight: torch.Tensor, tile: int, out_channels_last: bool = False) -> torch.Tensor:
    """Transformed filter (K, C_out, C_in) of ``weight`` (C_out, C_in, 3, 3) for output tiles of
    ``tile`` (2 or 4), K = (tile + 2)^2: position k = N i + j of the N x N Winograd tile
    (N = tile + 2) holds (G g G^T)_ij for every filter g. Differentiable (its backward is the
    adjoint transform, in the weight's layout). ``out_channels_last``: the same values with C_out
    fastest in memory (strides (C_out C_in, 1, C_out)), the layout the forward convolution's GEMMs
    read without a copy (the default one serves the input gradient's); the C++ transform writes
    it directly, other routes give the default layout."""
    co, ci = weight.shape[:2]
    if (_FILTER is not None and weight.is_cpu and weight.dtype in (torch.float32, torch.float64)
            and weight.is_contiguous() and not autograd_mode_reasons()):
        return _FilterTransform.apply(weight, tile, out_channels_last)
    k = _kron(tile, weight.dtype, weight.device)
    K = k.shape[0]
    if weight.is_contiguous() or not weight.is_contiguous(memory_format=torch.channels_last):
        return (k @ weight.reshape(co * ci, 9).t()).view(K, co, ci)
    # channels_last weights (a channels_last model): (C_out, 3, 3, C_in) in memory; a strided
    # (K, C_out, C_in) result instead of copying the weight
    return torch.matmul(k, weight.permute(0, 2, 3, 1).reshape(co, 9, ci)).transpose(0, 1)


def _check(x, weight, bias):
    op = "conv3x3"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    check_dtype(op, "x", x)
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"{op} expects a non-empty (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{op}: weight must be (C_out, {x.shape[1]}, 3, 3), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    check_dtype(op, "weight", weight)
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{op}: x is {x.dtype} but weight is {weight.dtype} (convert one, or run under torch.autocast)")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a tensor or None, got {type(bias).__name__}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has no output channels (shape {tuple(weight.shape)})")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != x.device):
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},) on {x.device}, got {tuple(bias.shape)} on "
                         f"{bias.device}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{op}: bias is {bias.dtype} but weight is {weight.dtype}")


def conv3x3_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: F.conv2d(x, weight, bias, padding=1). x (B, C_in, H, W), weight (C_out, C_in, 3, 3),
    bias (C_out,) or None; returns (B, C_out, H, W) in x's dtype."""
    _check(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


if _cpp.AVAILABLE:
    _OP = torch.ops.dito_fast.winograd_conv3x3.default
    _WGRAD = torch.ops.dito_fast.winograd_conv3x3_weight_grad.default
    _FILTER = torch.ops.dito_fast.winograd_filter.default
    _FILTER_ADJOINT = torch.ops.dito_fast.winograd_filter_adjoint.default

    @torch.library.register_fake("dito_fast::winograd_filter")
    def _(weight, tile, out_channels_last):
        K, co, ci = (tile + 2) ** 2, weight.shape[0], weight.shape[1]
        if out_channels_last:
            return weight.new_empty((K, ci, co)).transpose(1, 2)
        return weight.new_empty((K, co, ci))

    @torch.library.register_fake("dito_fast::winograd_filter_adjoint")
    def _(grad_u):
        return grad_u.new_empty((grad_u.shape[1], grad_u.shape[2], 3, 3))

    @torch.library.register_fake("dito_fast::winograd_conv3x3")
    def _(x, u, bias, transposed):
        one_device("winograd_conv3x3", x=x, u=u, bias=bias)
        fmt = memory_format_of(x)
        c_out = u.shape[2] if transposed else u.shape[1]
        # as the kernel: computed in channels_last, then given x's layout
        y = torch.empty((x.shape[0], c_out, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)
        return y.contiguous(memory_format=fmt)

    @torch.library.register_fake("dito_fast::winograd_conv3x3_weight_grad")
    def _(x, grad_y, tile, bias):
        one_device("winograd_conv3x3_weight_grad", x=x, grad_y=grad_y)
        du = x.new_empty(((tile + 2) ** 2, grad_y.shape[1], x.shape[1]))
        return du, x.new_empty((grad_y.shape[1] if bias else 0,))

    @register_flop_formula(torch.ops.dito_fast.winograd_conv3x3)
    def _(x_shape, u_shape, bias_shape, transposed, out_shape=None, **kwargs) -> int:
        # the nominal count of the direct convolution (as FlopCounterMode counts F.conv2d), not
        # the Winograd GEMMs' smaller one; u is (K, C_out, C_in), transposed or not
        return 2 * x_shape[0] * x_shape[2] * x_shape[3] * u_shape[1] * u_shape[2] * 9

    @register_flop_formula(torch.ops.dito_fast.winograd_conv3x3_weight_grad)
    def _(x_shape, grad_shape, tile, bias, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[2] * x_shape[3] * x_shape[1] * grad_shape[1] * 9

    def _setup_context(ctx, inputs, output):
        x, u, bias, transposed = inputs
        ctx.save_for_backward(x, u)
        ctx.has_bias, ctx.transposed = bias is not None, transposed

    def _backward(ctx, grad):
        if ctx.transposed:
            raise RuntimeError("winograd_conv3x3: the transposed convolution (an input gradient) is not differentiable; "
                               "double backward through conv3x3's cpp backend is not supported")
        x, u = ctx.saved_tensors
        need_x, need_u, need_b, _ = ctx.needs_input_grad
        need_b = need_b and ctx.has_bias
        gx = _OP(grad, u, None, True) if need_x else None
        gu = gb = None
        if need_u:  # the bias gradient comes from the same pass over grad
            gu, gb = _WGRAD(x, grad, 4 if u.shape[0] == 36 else 2, need_b)  # 36 or 16 positions
            gb = gb if need_b else None
        elif need_b:
            gb = grad.sum(dim=(0, 2, 3))
        return gx, gu, gb, None

    torch.library.register_autograd("dito_fast::winograd_conv3x3", _backward, setup_context=_setup_context)
else:
    _OP = _WGRAD = _FILTER = _FILTER_ADJOINT = None


# Inference mode: the transformed filters are kept for the weight (one per tile size) until it
# changes, so a decoding step does not re-transform every filter (that would write 1.8x (F(2x2)) or
# 4x (F(4x4)) the decoder's weights per step). _FILTER_CACHE is keyed by the weight's storage, so an
# entry dies with the storage; not by the tensor itself, whose weak reference would make
# torch.utils.swap_tensors refuse it (model.to/double/load_state_dict under
# torch.__future__.set_swap_module_params_on_conversion), and not in an attribute, which
# torch.save(module) would pickle. Per storage, one entry per view (offset, shape, strides, dtype),
# valid while the weight's version counter stays the same (it moves with every in-place update
# through the weight, e.g. load_state_dict or a foreach optimizer step). The fused optimizers
# (torch.optim's fused=True Adam, AdamW, SGD) update their parameters without moving it, so every
# optimizer step also drops its parameters' entries (a global step hook, below). Writes through
# ``weight.data`` bypass the version counter; they are not seen, as with any autograd-saved tensor,
# and neither are writes through another tensor sharing the weight's memory with a counter of its
# own (a Parameter made from another's ``.data``): call :func:`clear_filter_cache` after those.
# Weights in shared memory (``share_memory_()``, Hogwild training) are never cached: another
# process's writes move no counter here. Only inference mode uses the cache (fast_decode,
# dito_fast.encode); training and no_grad
# evaluation transform on every call. The cache costs memory: F(4x4) filters are 4x the weights
# (dito-S's decoder: 362 MiB, dito-B's: 1.8 GiB in float32; 5.8x where a layer also runs F(2x2));
# DITO_FAST_WINOGRAD_CACHE=0 turns it off, for a re-transform per call (small next to a large
# image's convolutions, not next to a small one's).
_FILTER_CACHE = WeakIdKeyDictionary()  # storage -> {(offset, shape, strides, dtype): (version, {tile: u})}


def _drop_stepped_filters(optimizer, args, kwargs) -> None:
    """Optimizer step post-hook (every torch.optim optimizer): forget the stepped parameters' filters."""
    if len(_FILTER_CACHE):
        for group in optimizer.param_groups:
            for p in group["params"]:
                _FILTER_CACHE.pop(p.untyped_storage(), None)


register_optimizer_step_post_hook(_drop_stepped_filters)


def clear_filter_cache(module: nn.Module | None = None) -> None:
    """Forget the cached Winograd filters (inference mode) of ``module``'s parameters, or of every
    weight when ``module`` is None: to release their memory (4x the convolution weights with
    F(4x4)) in a service that keeps the model, or after writing a weight's memory in a way its
    version counter does not record (``.data``, another tensor over the same storage)."""
    if module is None:
        _FILTER_CACHE.clear()
        return
    for p in module.parameters():
        _FILTER_CACHE.pop(p.untyped_storage(), None)


def _inference_filter(weight: torch.Tensor, tile: int) -> torch.Tensor:
    views = _FILTER_CACHE.get(weight.untyped_storage())
    if views is None:
        views = _FILTER_CACHE[weight.untyped_storage()] = {}
    view = (weight.storage_offset(), tuple(weight.shape), weight.stride(), weight.dtype)
    entry = views.get(view)
    if entry is None or entry[0] != weight._version:
        entry = views[view] = (weight._version, {})
    u = entry[1].get(tile)
    if u is None:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable outside inference mode
            u = entry[1][tile] = winograd_filter(weight, tile, out_channels_last=True)
    return u


# Training: the convolution's backward needs the transformed filter u (for the input gradient), but
# u is 1.8x (F(2x2)) or 4x (F(4x4)) the weight, and keeping it from forward to backward would hold
# that for every layer (dito-S's decoder: 362 MiB, dito-B's: 1.8 GiB in float32). Saved-tensor hooks
# keep the weight instead and transform it again in the backward (one filter transform per layer,
# small next to the layer's GEMMs). Tensors saved under hooks escape autograd's in-place check, so
# the hooks check the versions themselves: the weight's, and x's. They are left out, and u kept,
# where other saved-tensor hooks are already active (activation checkpointing, save_on_cpu: only
# the innermost hooks act, and theirs must) and under torch.compile (its graphs save what they
# need); under torch.func transforms and forward-mode AD the cpp backend does not run at all
# (_dispatch.autograd_mode_reasons). DITO_FAST_WINOGRAD_KEEP_FILTER=1 keeps the filters always (memory
# for one transform per layer; benchmarks/bench_model.py::test_train_peak_memory compares the two).
_INPLACE_MESSAGE = ("conv3x3: {what} was modified in place between the forward and the backward (version {now}, "
                    "saved at version {saved}); one of the variables needed for gradient computation has been "
                    "modified by an inplace operation")


@dataclass(frozen=True)
class _Refilter:
    weight: torch.Tensor
    version: int
    tile: int


@dataclass(frozen=True)
class _Kept:
    tensor: torch.Tensor
    version: int


def _refilter_hooks(u: torch.Tensor, weight: torch.Tensor, tile: int):
    # u is recognised by identity through a weak reference: autograd keeps the hooks until the
    # backward, so they must not hold u itself
    u_ref, weight_version = weakref.ref(u), weight._version

    def pack(t):
        if t is u_ref():
            return _Refilter(weight, weight_version, tile)
        return _Kept(t, t._version)

    def unpack(p):
        if isinstance(p, _Kept):
            if p.tensor._version != p.version:
                raise RuntimeError(_INPLACE_MESSAGE.format(what="the input", now=p.tensor._version, saved=p.version))
            return p.tensor
        if p.weight._version != p.version:
            raise RuntimeError(_INPLACE_MESSAGE.format(what="the weight", now=p.weight._version, saved=p.version))
        with torch.no_grad():
            return winograd_filter(p.weight, p.tile)

    return pack, unpack


def _refilter_in_backward(x, weight, u, bias) -> bool:
    """Whether this training call should save the weight instead of u (see above; a weight made
    in inference mode has no version counter, so u is kept)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not weight.is_inference()
            and (x.requires_grad or u.requires_grad or (bias is not None and bias.requires_grad))
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
            and torch._C._autograd._saved_tensors_hooks_is_enabled()
            and getenv("DITO_FAST_WINOGRAD_KEEP_FILTER", "0") != "1")


def _cpp_conv3x3(x, weight, bias):
    tile = winograd_tile(x)
    if (not torch.compiler.is_compiling() and torch.is_inference_mode_enabled() and not weight.is_inference()
            and not weight.is_shared() and getenv("DITO_FAST_WINOGRAD_CACHE", "1") != "0"):
        return _OP(x, _inference_filter(weight, tile), bias, False)
    u = winograd_filter(weight, tile, out_channels_last=True)  # the forward's GEMM layout
    if not _refilter_in_backward(x, weight, u, bias):
        return _OP(x, u, bias, False)
    with torch.autograd.graph.saved_tensors_hooks(*_refilter_hooks(u, weight, tile)):
        return _OP(x, u, bias, False)


def _winograd_reasons(x: torch.Tensor, weight_dtype: torch.dtype) -> list[str]:
    """Why the Winograd kernels cannot run on x with a weight of this dtype (empty: they can)."""
    if not _cpp.AVAILABLE:
        return [f"dito_fast._C is unavailable ({_cpp.LOAD_ERROR})"]
    if mode := autograd_mode_reasons():
        return mode
    if not x.is_cpu:  # meta tensors too: FLOP counters must see the convolution itself
        return [f"Winograd kernels are CPU only (x is on {x.device})"]
    reasons = []
    if x.dtype not in (torch.float32, torch.float64) or weight_dtype != x.dtype:
        reasons.append(f"dtypes x {x.dtype}, weight {weight_dtype}: float32 or float64, both alike")
    if torch.is_autocast_enabled("cpu"):
        reasons.append("autocast is enabled (F.conv2d applies its casting policy)")
    return reasons


def _cpp_reasons(x, weight, bias) -> list[str]:
    return _winograd_reasons(x, weight.dtype)


_BACKENDS = [
    Backend("cpp", _cpp_conv3x3, _cpp_reasons),
    Backend("ref", conv3x3_ref, always_supported),
]


def _env_choice() -> str | None:
    """What DITO_FAST_BACKEND asks conv3x3 to use: None also where it names a backend conv3x3
    lacks (``triton``), which leaves conv3x3 to its priority order, as the dispatcher does."""
    choice = env_backend("conv3x3")
    return choice if any(b.name == choice for b in _BACKENDS) else None


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            backend: str | None = None) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1: x (B, C_in, H, W) float, weight
    (C_out, C_in, 3, 3), bias (C_out,) or None -> (B, C_out, H, W), in x's layout (contiguous or
    channels_last). Differentiable with respect to all three; once only with the cpp backend
    (differentiating its gradients again raises: use ``backend="ref"`` for double backward)."""
    _check(x, weight, bias)
    if (backend is None and min(weight.shape[0], weight.shape[1]) < MIN_WINOGRAD_CHANNELS
            and _env_choice() is None):
        backend = "ref"  # too few channels for the Winograd GEMMs to pay for the transforms
    return dispatch("conv3x3", _BACKENDS, backend, x, weight, bias)


def conv_activation_format(x: torch.Tensor) -> torch.memory_format:
    """The layout a network of :class:`Conv3x3` layers should run in for an input like ``x``:
    channels_last where the Winograd backend will be chosen (it works NHWC, so an NCHW activation
    would be converted on the way in and out of every convolution), else ``x``'s own layout."""
    if x.dim() == 4 and _env_choice() in (None, "cpp") and not _winograd_reasons(x, x.dtype):
        return torch.channels_last
    return memory_format_of(x)


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_ch, out_ch, 3, padding=1)`` (same parameters and state dict) whose forward
    goes through :func:`conv3x3`, so the fastest backend for the device and shape is used."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.stride, self.padding, self.dilation, self.groups, self.padding_mode, self.kernel_size) \
                != ((1, 1), (1, 1), (1, 1), 1, "zeros", (3, 3)):
            return super().forward(x)  # attributes changed after construction: nn.Conv2d's own meaning
        return conv3x3(x, self.weight, self.bias)
