"""Image-quality metrics on tensors in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,) between x, y (B, C, H, W) in [-1, 1] (peak-to-peak range 2),
    computed in float64 after clamping to [-1, 1]. Identical images give +inf."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double().clamp(-1, 1) - y.double().clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def bicubic_baseline(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The "downsample by ``factor``, bicubic upsample" reconstruction of x (B, C, H, W), the
    baseline a tokenizer with the same spatial reduction must beat. Downsampling uses
    antialiased bicubic (area-like), upsampling plain bicubic; output clamped to [-1, 1]."""
    H, W = x.shape[-2:]
    small = F.interpolate(x.float(), size=(H // factor, W // factor), mode="bicubic", antialias=True,
                          align_corners=False)
    return F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False).clamp(-1, 1).to(x.dtype)
