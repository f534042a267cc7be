"""3x3 convolution with stride 1 and padding 1 (every 3x3 convolution of the UNet and the encoder).

Backends:
- ``cpp``: Winograd F(2x2, 3x3) on the CPU (csrc/ops/conv3x3): 16 multiply-adds per 2x2 output
  tile and channel pair instead of 36, so the GEMMs do 2.25x fewer flops than a direct
  convolution. The filter is transformed here (``winograd_filter``), the activations per tile in
  C++; forward, input gradient (the same convolution with the flipped, transposed filter) and
  filter gradient (in the Winograd domain, then the adjoint filter transform) all use it. float32
  and float64; activations are processed channels_last (an NCHW input is converted, and the
  output keeps the input's layout). Not chosen automatically for convolutions with fewer than
  ``MIN_WINOGRAD_CHANNELS`` input or output channels, where the GEMMs are too thin to pay for the
  transforms (an explicit ``backend="cpp"`` or ``DITO_FAST_BACKEND`` still runs it).
- ``ref``: ``F.conv2d`` (oneDNN on CPU, cuDNN on CUDA), the specification. On CUDA this is the
  backend used: cuDNN already picks Winograd/implicit-GEMM algorithms there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _cpp
from ._dispatch import Backend, always_supported, dispatch, env_backend

MIN_WINOGRAD_CHANNELS = 32

# G of F(2x2, 3x3): U = G g G^T for a 3x3 filter g; as one matrix on flattened filters,
# vec(U) = kron(G, G) vec(g).
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
_KRON = torch.kron(_G, _G)  # (16, 9)
# G (flipped g) = Q G with Q swapping rows 0 and 3, so the flipped filter's transform is U
# with its positions permuted by Q on both axes.
_FLIP = [3, 1, 2, 0]
_kron_cache: dict = {}


def _kron(dtype, device):
    key = (dtype, device)
    if key not in _kron_cache:
        _kron_cache[key] = _KRON.to(dtype=dtype, device=device)
    return _kron_cache[key]


def winograd_filter(weight: torch.Tensor) -> torch.Tensor:
    """Transformed filter (16, C_in, C_out) of ``weight`` (C_out, C_in, 3, 3): U_k = (G g G^T)_k
    for each of the 16 positions k = 4i + j of a 4x4 Winograd tile. Differentiable."""
    co, ci = weight.shape[:2]
    u = _kron(weight.dtype, weight.device) @ weight.reshape(co * ci, 9).t()  # (16, co * ci)
    return u.view(16, co, ci).transpose(1, 2).contiguous()


def winograd_filter_grad(grad_u: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`winograd_filter`: the filter gradient (C_out, C_in, 3, 3) from the
    gradient (16, C_in, C_out) of the transformed filter."""
    _, ci, co = grad_u.shape
    g = _kron(grad_u.dtype, grad_u.device).t() @ grad_u.transpose(1, 2).reshape(16, co * ci)  # (9, co * ci)
    return g.t().reshape(co, ci, 3, 3)


def _flipped(u: torch.Tensor) -> torch.Tensor:
    """Transform of the flipped, in/out-transposed filter (16, C_out, C_in): the filter of the
    input gradient, obtained from U by permuting positions."""
    _, ci, co = u.shape
    idx = torch.tensor(_FLIP, device=u.device)
    return u.view(4, 4, ci, co)[idx][:, idx].transpose(2, 3).reshape(16, co, ci)


def _check(x, weight, bias):
    op = "conv3x3"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"{op} expects a non-empty (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{op}: weight must be (C_out, {x.shape[1]}, 3, 3), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != x.device):
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},) {weight.dtype} on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")


def conv3x3_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: F.conv2d(x, weight, bias, padding=1). x (B, C_in, H, W), weight (C_out, C_in, 3, 3),
    bias (C_out,) or None; returns (B, C_out, H, W) in x's dtype."""
    _check(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


if _cpp.AVAILABLE:
    _OP = torch.ops.dito_fast.winograd_conv3x3.default
    _WGRAD = torch.ops.dito_fast.winograd_conv3x3_weight_grad.default

    @torch.library.register_fake("dito_fast::winograd_conv3x3")
    def _(x, u, bias):
        fmt = _cpp._format(x)
        return x.new_empty((x.shape[0], u.shape[2], x.shape[2], x.shape[3])).contiguous(memory_format=fmt)

    @torch.library.register_fake("dito_fast::winograd_conv3x3_weight_grad")
    def _(x, grad_y):
        return x.new_empty((16, x.shape[1], grad_y.shape[1]))

    def _setup_context(ctx, inputs, output):
        x, u, bias = inputs
        ctx.save_for_backward(x, u)
        ctx.has_bias = bias is not None

    def _backward(ctx, grad):
        x, u = ctx.saved_tensors
        need_x, need_u, need_b = ctx.needs_input_grad
        gx = _OP(grad, _flipped(u), None) if need_x else None
        gu = _WGRAD(x, grad) if need_u else None
        gb = grad.sum(dim=(0, 2, 3)) if need_b and ctx.has_bias else None
        return gx, gu, gb

    torch.library.register_autograd("dito_fast::winograd_conv3x3", _backward, setup_context=_setup_context)
else:
    _OP = _WGRAD = None


# Inference: the transformed filter is kept on the weight tensor (attribute _dito_winograd) until
# the weight changes (its version counter moves on every in-place update, e.g. an optimizer step),
# so a decoder step does not re-transform every filter (for dito-S that would write 1.8x the
# decoder's weights per step).
def _inference_filter(weight: torch.Tensor) -> torch.Tensor:
    key = (weight._version, weight.data_ptr(), weight.dtype)
    hit = getattr(weight, "_dito_winograd", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        u = winograd_filter(weight)
    weight._dito_winograd = (key, u)
    return u


def _cpp_conv3x3(x, weight, bias):
    if (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling() or weight.is_inference():
        return _OP(x, winograd_filter(weight), bias)
    return _OP(x, _inference_filter(weight), bias)


def _cpp_reasons(x, weight, bias) -> list[str]:
    reasons = []
    if not _cpp.AVAILABLE:
        return [f"dito_fast._C is not built ({_cpp.LOAD_ERROR})"]
    if not x.is_cpu:  # meta tensors too: FLOP counters must see the convolution itself
        return [f"Winograd kernels are CPU only (x is on {x.device})"]
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        reasons.append(f"dtypes x {x.dtype}, weight {weight.dtype}: float32 or float64, both alike")
    if torch.is_autocast_enabled("cpu"):
        reasons.append("autocast is enabled (F.conv2d applies its casting policy)")
    return reasons


_BACKENDS = [
    Backend("cpp", _cpp_conv3x3, _cpp_reasons),
    Backend("ref", conv3x3_ref, always_supported),
]


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            backend: str | None = None) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1: x (B, C_in, H, W) float, weight
    (C_out, C_in, 3, 3), bias (C_out,) or None -> (B, C_out, H, W), in x's layout (contiguous or
    channels_last). Differentiable with respect to all three."""
    _check(x, weight, bias)
    if backend is None and min(weight.shape[0], weight.shape[1]) < MIN_WINOGRAD_CHANNELS and env_backend("conv3x3") is None:
        backend = "ref"  # too few channels for the Winograd GEMMs to pay for the transforms
    return dispatch("conv3x3", _BACKENDS, backend, x, weight, bias)


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_ch, out_ch, 3, padding=1)`` (same parameters and state dict) whose forward
    goes through :func:`conv3x3`, so the fastest backend for the device and shape is used."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.weight, self.bias)
