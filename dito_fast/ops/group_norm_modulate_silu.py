"""GroupNorm -> per-sample scale/shift modulation -> SiLU: the UNet's norm block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _cpp, _triton
from ._dispatch import Backend, always_supported, autograd_mode_reasons, check_dtype, dispatch


def _check_x(x, num_groups, weight, bias, scale, shift, eps=1e-5):
    """The checks every backend needs before one is chosen: x, the group count, eps, and that each
    parameter is None or a tensor of a supported dtype on x's device (a meta parameter with a CPU x
    would otherwise reach the fake kernel). The parameters' shapes: ``_check_params``."""
    op = "group_norm_modulate_silu"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    check_dtype(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op} expects (B, C, H, W), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: x is empty, shape {tuple(x.shape)}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"{op}: num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"{op}: {C} channels are not divisible by {num_groups} groups")
    if not 0 <= eps < math.inf:  # also refuses NaN
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
    x_cpu = x.is_cpu
    for name, p in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a floating tensor or None, got {type(p).__name__}")
        check_dtype(op, name, p)
        if not (x_cpu and p.is_cpu) and p.device != x.device:  # is_cpu: no device objects on the common path
            raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")


def _check_params(x, weight, bias, scale, shift):
    """The parameters' shapes. The C++ op makes the same checks with the same errors
    (csrc/include/dito_fast/check.h), so the cpp backend leaves them to it: in Python they cost
    about 3.5 us per call (warm loop, all four parameters)."""
    op = "group_norm_modulate_silu"
    B, C = x.shape[:2]
    for name, p, shape in (("weight", weight, (C,)), ("bias", bias, (C,)), ("scale", scale, (B, C)),
                           ("shift", shift, (B, C))):
        if p is None:
            continue
        if p.shape != shape:  # torch.Size compares equal to a tuple
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(p.shape)}")


def _check(x, num_groups, weight, bias, scale, shift, eps):
    _check_x(x, num_groups, weight, bias, scale, shift, eps)
    _check_params(x, weight, bias, scale, shift)


def group_norm_modulate_silu_ref(x, num_groups: int, weight=None, bias=None, scale=None, shift=None,
                                 eps: float = 1e-5, silu: bool = True, upcast: bool = True):
    """Reference. x: (B, C, H, W); weight/bias: (C,) or None; scale/shift: (B, C) or None.

    y = GroupNorm(x; weight, bias); y = y * (1 + scale) + shift if given; SiLU(y) if ``silu``.
    Returns the shape and dtype of x.
    """
    _check(x, num_groups, weight, bias, scale, shift, eps)
    half = upcast and x.dtype in (torch.float16, torch.bfloat16)
    xc = x.float() if half else x
    # parameters of any supported dtype, computed in x's (upcast) dtype, as the C++ kernels do
    weight, bias = (p if p is None else p.to(xc.dtype) for p in (weight, bias))
    # torch.group_norm, not F.group_norm, which refuses groups of one value. torch 2.13's CPU
    # group_norm backward crashes (a channels_last x that needs no gradient, with a weight or bias
    # that does) or raises (a bias that needs a gradient without a weight): there the affine is
    # applied after an affine-free group_norm, which computes the same. Elsewhere torch's fused
    # affine stays (the decomposed form took 1.2-1.7x as long forward+backward at channels_last
    # (1, 512, 32, 32) and (8, 256, 8, 8) in a scratch loop, 2 threads, 2026-12-03). Not
    # avoided: the same crash when x needs a gradient but autograd prunes it (autograd.grad for the
    # parameters alone of a channels_last x), which only shows at backward time.
    # torch 2.13's group_norm has no forward-mode (jvp) path for channels_last input ("view size is
    # not compatible"): under torch.func transforms and forward-mode AD it gets a contiguous copy,
    # and the result x's layout back.
    channels_last = xc.dim() == 4 and not xc.is_contiguous() and xc.is_contiguous(memory_format=torch.channels_last)
    relayout = channels_last and bool(autograd_mode_reasons())
    if relayout:
        xc = xc.contiguous()
    params_need_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (weight, bias))
    if params_need_grad and (not xc.requires_grad or weight is None):
        y = torch.group_norm(xc, num_groups, None, None, eps)
        if weight is not None:
            y = y * weight[:, None, None]
        if bias is not None:
            y = y + bias[:, None, None]
    else:
        y = torch.group_norm(xc, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (1 + scale[:, :, None, None].to(y.dtype))
    if shift is not None:
        y = y + shift[:, :, None, None].to(y.dtype)
    if silu:
        y = F.silu(y)
    if relayout:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.to(x.dtype)


_OP = torch.ops.dito_fast.group_norm_modulate_silu.default if _cpp.AVAILABLE else None  # autograd: csrc/autograd.cpp


def _cpp_gnms(x, num_groups, weight, bias, scale, shift, eps, silu):
    return _OP(x, num_groups, weight, bias, scale, shift, eps, silu)[0]


_TRITON = _triton.backend("group_norm_modulate_silu", "group_norm_modulate_silu")


def _triton_reasons(x, num_groups, weight, bias, scale, shift, eps, silu):
    _check_params(x, weight, bias, scale, shift)  # bad shapes raise ValueError, as on the other backends
    return _TRITON.unsupported_reasons(x, num_groups, weight, bias, scale, shift, eps, silu)


# The parameter shape checks: in the C++ op for cpp, before triton's reasons for triton, in the
# reference for ref.
_BACKENDS = [
    Backend("cpp", _cpp_gnms, lambda x, g, w, b, s, sh, eps, silu: _cpp.unsupported_reasons(x, w, b, s, sh),
            _cpp.direct("group_norm_modulate_silu")),
    Backend("triton", _TRITON.fn, _triton_reasons),
    Backend("ref", group_norm_modulate_silu_ref, always_supported),
]


def group_norm_modulate_silu(x, num_groups: int, weight=None, bias=None, scale=None, shift=None,
                             eps: float = 1e-5, silu: bool = True, backend: str | None = None):
    """Fused norm block; see :func:`group_norm_modulate_silu_ref` for the definition.

    x: (B, C, H, W) float, contiguous or channels_last (the output keeps x's layout);
    weight/bias: (C,); scale/shift: (B, C). Differentiable w.r.t. x and every parameter given.
    A non-finite x value makes its own group (of its sample) non-finite, on every backend. Finite
    groups whose squares overflow the dtype (|x| beyond ~1.8e19 in float32) are normalised as in
    float64 by the cpp, Triton and CUDA backends (their float sums are redone in double where they
    overflowed; the CUDA kernels' cases passed on an H200, 2026-12-04); ``ref`` (PyTorch's group
    norm) then gives NaN.
    """
    _check_x(x, num_groups, weight, bias, scale, shift, eps)
    return dispatch("group_norm_modulate_silu", _BACKENDS, backend, x, num_groups, weight, bias,
                    scale, shift, float(eps), bool(silu))
