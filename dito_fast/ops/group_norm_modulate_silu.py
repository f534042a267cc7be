"""GroupNorm -> per-sample scale/shift modulation -> SiLU: the UNet's norm block."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import Backend, always_supported, dispatch


def group_norm_modulate_silu_ref(x, num_groups: int, weight=None, bias=None, scale=None, shift=None,
                                 eps: float = 1e-5, silu: bool = True, upcast: bool = True):
    """Reference. x: (B, C, H, W); weight/bias: (C,) or None; scale/shift: (B, C) or None.

    y = GroupNorm(x; weight, bias); y = y * (1 + scale) + shift if given; SiLU(y) if ``silu``.
    Returns the shape and dtype of x.
    """
    if x.dim() != 4:
        raise ValueError(f"group_norm_modulate_silu expects (B, C, H, W), got {tuple(x.shape)}")
    B, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"group_norm_modulate_silu: {C} channels are not divisible by {num_groups} groups")
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and tuple(p.shape) != (B, C):
            raise ValueError(f"group_norm_modulate_silu: {name} must have shape ({B}, {C}), got {tuple(p.shape)}")
    half = upcast and x.dtype in (torch.float16, torch.bfloat16)
    xc = x.float() if half else x
    y = F.group_norm(xc, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (1 + scale[:, :, None, None].to(y.dtype))
    if shift is not None:
        y = y + shift[:, :, None, None].to(y.dtype)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


_BACKENDS = [Backend("ref", group_norm_modulate_silu_ref, always_supported)]


def group_norm_modulate_silu(x, num_groups: int, weight=None, bias=None, scale=None, shift=None,
                             eps: float = 1e-5, silu: bool = True, backend: str | None = None):
    """Fused norm block; see :func:`group_norm_modulate_silu_ref` for the definition."""
    return dispatch("group_norm_modulate_silu", _BACKENDS, backend, x, num_groups, weight, bias,
                    scale, shift, eps, silu)
