"""Affine-free LayerNorm of the latent over (C, H, W), per sample (DiTo's latent normalisation)."""

from __future__ import annotations

import math

import torch

from . import _cpp, _triton
from ._dispatch import Backend, always_supported, check_dtype, dispatch


def _check(z, eps):
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"latent_layernorm: z must be a tensor, got {type(z).__name__}")
    check_dtype("latent_layernorm", "z", z)
    if z.dim() != 4:
        raise ValueError(f"latent_layernorm expects (B, C, H, W), got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"latent_layernorm: z is empty, shape {tuple(z.shape)}")
    if not 0 <= eps < math.inf:  # also refuses NaN
        raise ValueError(f"latent_layernorm: eps must be finite and >= 0, got {eps}")


def latent_layernorm_ref(z: torch.Tensor, eps: float = 1e-5, upcast: bool = True) -> torch.Tensor:
    """Reference: (z - mean) / sqrt(var + eps) with mean/var over dims (1, 2, 3) of each sample.

    z: (B, C, H, W) floating. Returns the same shape and dtype. ``upcast`` computes in float32
    for half-precision inputs.
    """
    _check(z, eps)
    zc = z.float() if upcast and z.dtype in (torch.float16, torch.bfloat16) else z
    mean = zc.mean(dim=(1, 2, 3), keepdim=True)
    var = zc.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return ((zc - mean) * torch.rsqrt(var + eps)).to(z.dtype)


_OP = torch.ops.dito_fast.latent_layernorm.default if _cpp.AVAILABLE else None  # autograd: csrc/autograd.cpp


def _cpp_lln(z, eps):
    return _OP(z, eps)[0]


_BACKENDS = [
    Backend("cpp", _cpp_lln, lambda z, eps: _cpp.unsupported_reasons(z), _cpp.direct("latent_layernorm")),
    _triton.backend("latent_layernorm", "latent_layernorm"),
    Backend("ref", latent_layernorm_ref, always_supported),
]


def latent_layernorm(z: torch.Tensor, eps: float = 1e-5, backend: str | None = None) -> torch.Tensor:
    """Normalise each sample of ``z`` (B, C, H, W) to zero mean and unit variance over (C, H, W).

    Float dtypes; contiguous or channels_last (kept). Differentiable.
    """
    _check(z, eps)
    return dispatch("latent_layernorm", _BACKENDS, backend, z, float(eps))
