"""Image-quality metrics on tensors in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_unit_range(name: str, arg: str, t: torch.Tensor) -> None:
    """Raise unless ``t`` is a floating tensor with values within 2 of zero (images in [-1, 1], a
    network's slight overshoot allowed): a uint8 image (0..255, e.g. fast_decode's default output)
    or its float copy, or a [0, 1] one, gave plausible but wrong figures. ``name``: the function,
    ``arg``: the argument, for the message. NaN passes (and gives NaN)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name}: {arg} must be a floating tensor in [-1, 1], got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__} (uint8 images: "
                        "x.float() / 127.5 - 1)")
    big = float(t.detach().abs().nan_to_num(0.0, posinf=float("inf")).amax()) if t.numel() else 0.0
    if big == float("inf"):
        raise ValueError(f"{name}: {arg} contains inf values")
    if big > 2.0:
        raise ValueError(f"{name}: {arg} must be in [-1, 1], got values up to {big:.3g} in magnitude (images in "
                         "0..255: x / 127.5 - 1)")


def _unit_range_pair(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y in float64 clamped to [-1, 1], after checking that they are floating, non-empty
    (B, C, H, W) batches of one shape in [-1, 1] (:func:`check_unit_range`; a slight overshoot
    is clamped): a single (C, H, W) image had been read as C images."""
    for arg, t in (("x", x), ("y", y)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: {arg} must be a floating tensor in [-1, 1], got {t.dtype} (uint8 images: "
                            "x.float() / 127.5 - 1)")
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"{name}: expected x and y of one shape (B, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)} (one image: x[None])")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty batch or no channels, shape {tuple(x.shape)}")
    check_unit_range(name, "x", x)
    check_unit_range(name, "y", y)
    return x.double().clamp(-1, 1), y.double().clamp(-1, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,) between x, y (B, C, H, W) in [-1, 1] (peak-to-peak range 2),
    computed in float64 after clamping to [-1, 1]. Identical images give +inf."""
    x, y = _unit_range_pair("psnr", x, y)
    mse = (x - y).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


SSIM_WINDOW = 11  # Gaussian window of Wang et al. (2004): 11 taps, sigma 1.5
SSIM_SIGMA = 1.5


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) between x, y (B, C, H, W) in [-1, 1], as Wang et al. (2004) define it:
    local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5, population
    moments), K1 = 0.01 and K2 = 0.03 of the data range 2, the SSIM map averaged over the
    positions where the window fits inside the image and over the channels. Computed in float64
    after clamping to [-1, 1]; 1 for identical images, at most 1. H and W must be at least 11.
    (skimage.metrics.structural_similarity with gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=2 gives the same values: tests/eval.)"""
    x, y = _unit_range_pair("ssim", x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: expected (B, C, H, W) with H, W >= {SSIM_WINDOW}, got {tuple(x.shape)}")
    B, C = x.shape[:2]
    r = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=x.device) - SSIM_WINDOW // 2
    g = torch.exp(-r.square() / (2 * SSIM_SIGMA**2))
    g = g / g.sum()

    def blur(a):  # separable Gaussian, each channel alone, valid positions only
        a = a.reshape(B * C, 1, *a.shape[-2:])
        a = F.conv2d(a, g.view(1, 1, -1, 1))
        return F.conv2d(a, g.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx.square(), blur(y * y) - my.square(), blur(x * y) - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx.square() + my.square() + c1) * (vx + vy + c2))
    return s.reshape(B, -1).mean(1)


def bicubic_baseline(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The "downsample by ``factor``, bicubic upsample" reconstruction of x (B, C, H, W), the
    baseline a tokenizer with the same spatial reduction must beat. Downsampling uses
    antialiased bicubic (area-like), upsampling plain bicubic; output clamped to [-1, 1].
    ValueError for input that is not a (B, C, H, W) batch in [-1, 1] or is smaller than ``factor``."""
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"bicubic_baseline: factor must be an int >= 1, got {factor!r}")
    check_unit_range("bicubic_baseline", "x", x)
    if x.dim() != 4 or min(x.shape[-2:]) < factor:
        raise ValueError(f"bicubic_baseline: expected images (B, C, H, W) of at least {factor}x{factor} pixels, "
                         f"got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    small = F.interpolate(x.float(), size=(H // factor, W // factor), mode="bicubic", antialias=True,
                          align_corners=False)
    return F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False).clamp(-1, 1).to(x.dtype)
