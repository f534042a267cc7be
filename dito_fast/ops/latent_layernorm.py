"""Affine-free LayerNorm of the latent over (C, H, W), per sample (DiTo's latent normalisation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _cpp, _triton
from ._cpp import memory_format_of
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


def latent_layernorm_ref(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Reference: ATen's layer norm over (C, H, W) without affine, (z - mean) / sqrt(var + eps)
    with the mean and biased variance of each sample (``F.layer_norm(z, z.shape[1:])``, the one
    call an eager user would write; half precision accumulates in float32).

    z: (B, C, H, W) floating. Returns the same shape, dtype and memory format.
    """
    _check(z, eps)
    y = F.layer_norm(z, z.shape[1:], eps=eps)
    return y.contiguous(memory_format=torch.channels_last) if memory_format_of(z) == torch.channels_last else y


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

    Float dtypes; contiguous or channels_last (kept). Differentiable. Finite values whose squares
    overflow the dtype (|z| beyond ~1.8e19 in float32) are normalised as in float64 by the cpp,
    Triton and CUDA backends (their float sums are redone in double where they overflowed; the CUDA
    kernel's case passed on an H200, 2026-12-04); ``ref`` (PyTorch's layer norm) then gives NaN.
    """
    _check(z, eps)
    return dispatch("latent_layernorm", _BACKENDS, backend, z, float(eps))
