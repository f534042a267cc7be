"""Flow-matching elementwise ops: noising with its velocity target, and the per-sample loss.

x_t = (1 - t) x + (s + t (1 - s)) e,  v = dx_t/dt = (1 - s) e - x   (s = sigma_min; DESIGN.md §1)
"""

from __future__ import annotations

import numbers

import torch

from . import _cpp, _triton
from ._dispatch import Backend, always_supported, check_dtype, dispatch


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _check_sigma_min(sigma_min):
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, numbers.Real):
        raise TypeError(f"fm_noise: sigma_min must be a real number, got {type(sigma_min).__name__}")
    if not 0.0 <= sigma_min < 1.0:  # NaN fails too
        raise ValueError(f"fm_noise: sigma_min must be in [0, 1), got {sigma_min}")


def _check_noise(x, noise, t):
    for name, a in (("x", x), ("noise", noise), ("t", t)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"fm_noise: {name} must be a tensor, got {type(a).__name__}")
        check_dtype("fm_noise", name, a)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"fm_noise: x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if x.shape != noise.shape:
        raise ValueError(f"fm_noise: x {tuple(x.shape)} and noise {tuple(noise.shape)} differ in shape")
    if x.dtype != noise.dtype:
        raise TypeError(f"fm_noise: x ({x.dtype}) and noise ({noise.dtype}) differ in dtype")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"fm_noise: t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    if not (x.device == noise.device == t.device):
        raise ValueError(f"fm_noise: x, noise and t must be on one device, got {x.device}, {noise.device}, {t.device}")


def _check_loss(pred, target):
    for name, a in (("pred", pred), ("target", target)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"fm_loss: {name} must be a tensor, got {type(a).__name__}")
        check_dtype("fm_loss", name, a)
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"fm_loss: pred must have a non-empty batch dimension, got shape {tuple(pred.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"fm_loss: each sample must have at least one value (a mean of none is undefined), "
                         f"got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"fm_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dtype != target.dtype:
        raise TypeError(f"fm_loss: pred ({pred.dtype}) and target ({target.dtype}) differ in dtype")
    if pred.device != target.device:
        raise ValueError(f"fm_loss: pred is on {pred.device} but target is on {target.device}")


def fm_noise_ref(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float = 1e-5):
    """Reference. x, noise: (B, ...) same shape and dtype; t: (B,) in [0, 1]. Returns (x_t, v) like x."""
    _check_noise(x, noise, t)
    _check_sigma_min(sigma_min)
    tb = _per_sample(t, x)
    x_t = (1 - tb) * x + (sigma_min + tb * (1 - sigma_min)) * noise
    v = (1 - sigma_min) * noise - x
    return x_t, v


def fm_loss_ref(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reference per-sample mean squared error. pred, target: (B, ...), same dtype.

    Returns (B,) float32 (float64 for float64 inputs): half-precision inputs are accumulated in float32.
    """
    _check_loss(pred, target)
    acc = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(acc) - target.to(acc)).square().reshape(pred.shape[0], -1).mean(dim=1)


if _cpp.AVAILABLE:  # the op handles, looked up once (autograd: csrc/autograd.cpp)
    _cpp_noise = torch.ops.dito_fast.fm_noise.default
    _cpp_loss = torch.ops.dito_fast.fm_loss.default
else:
    _cpp_noise = _cpp_loss = None  # never chosen: the backend reports why it cannot run


_NOISE_BACKENDS = [
    Backend("cpp", _cpp_noise, lambda x, noise, t, s: _cpp.unsupported_reasons(x, noise), _cpp.direct("fm_noise")),
    _triton.backend("fm", "fm_noise", "fm_noise_unsupported_reasons"),
    Backend("ref", fm_noise_ref, always_supported),
]
_LOSS_BACKENDS = [
    Backend("cpp", _cpp_loss, lambda pred, target: _cpp.unsupported_reasons(pred, target), _cpp.direct("fm_loss")),
    _triton.backend("fm", "fm_loss", "fm_loss_unsupported_reasons"),
    Backend("ref", fm_loss_ref, always_supported),
]


def fm_noise(x, noise, t, sigma_min: float = 1e-5, backend: str | None = None):
    """Noised sample and velocity target in one pass; see :func:`fm_noise_ref`.

    Differentiable w.r.t. x, noise and t (t's gradient, the per-sample sum of grad_x_t * v, is
    formed only when t requires grad). Outputs keep x's layout (contiguous or channels_last;
    other layouts come out contiguous).
    """
    _check_noise(x, noise, t)
    _check_sigma_min(sigma_min)
    return dispatch("fm_noise", _NOISE_BACKENDS, backend, x, noise, t, float(sigma_min))


def fm_loss(pred, target, backend: str | None = None) -> torch.Tensor:
    """Per-sample MSE (B,) with float32 (float64 for float64 inputs) accumulation; see :func:`fm_loss_ref`."""
    _check_loss(pred, target)
    return dispatch("fm_loss", _LOSS_BACKENDS, backend, pred, target)
