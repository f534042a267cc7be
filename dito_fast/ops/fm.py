"""Flow-matching elementwise ops: noising with its velocity target, and the per-sample loss.

x_t = (1 - t) x + (s + t (1 - s)) e,  v = dx_t/dt = (1 - s) e - x   (s = sigma_min; DESIGN.md §1)
"""

from __future__ import annotations

import torch

from ._dispatch import Backend, always_supported, dispatch


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def fm_noise_ref(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float = 1e-5):
    """Reference. x, noise: (B, ...) same shape; t: (B,) in [0, 1]. Returns (x_t, v), both like x."""
    if x.shape != noise.shape:
        raise ValueError(f"fm_noise: x {tuple(x.shape)} and noise {tuple(noise.shape)} differ in shape")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"fm_noise: t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    tb = _per_sample(t, x)
    x_t = (1 - tb) * x + (sigma_min + tb * (1 - sigma_min)) * noise
    v = (1 - sigma_min) * noise - x
    return x_t, v


def fm_loss_ref(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reference per-sample mean squared error. pred, target: (B, ...). Returns (B,) float32."""
    if pred.shape != target.shape:
        raise ValueError(f"fm_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


_NOISE_BACKENDS = [Backend("ref", fm_noise_ref, always_supported)]
_LOSS_BACKENDS = [Backend("ref", fm_loss_ref, always_supported)]


def fm_noise(x, noise, t, sigma_min: float = 1e-5, backend: str | None = None):
    """Noised sample and velocity target in one call; see :func:`fm_noise_ref`."""
    return dispatch("fm_noise", _NOISE_BACKENDS, backend, x, noise, t, sigma_min)


def fm_loss(pred, target, backend: str | None = None) -> torch.Tensor:
    """Per-sample MSE (B,) with float32 accumulation; see :func:`fm_loss_ref`."""
    return dispatch("fm_loss", _LOSS_BACKENDS, backend, pred, target)
