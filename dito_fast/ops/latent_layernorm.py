"""Affine-free LayerNorm of the latent over (C, H, W), per sample (DiTo's latent normalisation)."""

from __future__ import annotations

import torch

from ._dispatch import Backend, always_supported, dispatch


def latent_layernorm_ref(z: torch.Tensor, eps: float = 1e-5, upcast: bool = True) -> torch.Tensor:
    """Reference: (z - mean) / sqrt(var + eps) with mean/var over dims (1, 2, 3) of each sample.

    z: (B, C, H, W) floating. Returns the same shape and dtype. ``upcast`` computes in float32
    for half-precision inputs.
    """
    if z.dim() != 4:
        raise ValueError(f"latent_layernorm expects (B, C, H, W), got shape {tuple(z.shape)}")
    zc = z.float() if upcast and z.dtype in (torch.float16, torch.bfloat16) else z
    mean = zc.mean(dim=(1, 2, 3), keepdim=True)
    var = zc.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return ((zc - mean) * torch.rsqrt(var + eps)).to(z.dtype)


_BACKENDS = [Backend("ref", latent_layernorm_ref, always_supported)]


def latent_layernorm(z: torch.Tensor, eps: float = 1e-5, backend: str | None = None) -> torch.Tensor:
    """Normalise each sample of ``z`` (B, C, H, W) to zero mean and unit variance over (C, H, W)."""
    return dispatch("latent_layernorm", _BACKENDS, backend, z, eps)
