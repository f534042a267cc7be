"""``fast_decode``: the production entry point from latents to uint8 images.

Today it runs the model's ODE sampler under ``torch.inference_mode`` in chunks of ``max_batch``
and converts to uint8; the fused kernels, step-invariant caching and CUDA graphs plug in here.
"""

from __future__ import annotations

import torch

from .eval.report import to_uint8
from .models.dito import DiTo, check_latents, make_noise


def fast_decode(model: DiTo, z: torch.Tensor, *, steps: int = 50, sampler: str = "euler",
                schedule: str = "uniform", seed: int | None = None, generator: torch.Generator | None = None,
                max_batch: int | None = None, device=None) -> torch.Tensor:
    """Decode latents to images.

    Args:
        model: a trained :class:`DiTo`.
        z: latents (B, c, h, w), float, finite, as returned by ``model.encode``.
        steps, sampler, schedule: ODE solver settings (default: the paper's 50 Euler steps).
        seed / generator: source of the initial noise (drawn on the CPU, so a seed gives the same
            noise on every device and the same output as ``model.decode`` with that seed).
        max_batch: decode at most this many latents at once (bounds memory); None = all.
        device: where to run (default: the model's device).
    Returns:
        uint8 tensor (B, 3, h*f, w*f) in [0, 255] on the CPU.
    """
    check_latents(z, model.latent_channels)
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    f = model.latent_factor
    B, H, W = z.shape[0], z.shape[-2] * f, z.shape[-1] * f
    # All noise up front, so chunking does not change the result.
    noise = make_noise((B, 3, H, W), seed, generator, device="cpu")
    chunk = max_batch or B
    out = torch.empty(B, 3, H, W, dtype=torch.uint8)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, B, chunk):
                zi = z[i:i + chunk].to(device=device, dtype=torch.float32)
                x = model.decode(zi, steps=steps, sampler=sampler, schedule=schedule,
                                 noise=noise[i:i + chunk].to(device))
                out[i:i + chunk] = to_uint8(x).cpu()
    finally:
        model.train(was_training)
    return out
