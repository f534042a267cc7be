"""Flow matching for DiTo (paper §3; DESIGN.md §1): noising, targets, objectives, noise sync.

Forward process, with s = sigma_min and t ~ U(0, 1):
    x_t = (1 - t) x + (s + t (1 - s)) e,          e ~ N(0, I)
The decoder predicts the velocity v = dx_t/dt = (1 - s) e - x and the loss is the per-sample
mean squared error. Decoding integrates dx/dt = v from t = 1 (noise) to t = 0 (image).

Non-default objectives (the paper's ablation): ``"epsilon"`` (predict e) and ``"x0"`` (predict
x). Their outputs are converted to a velocity for sampling by :func:`to_velocity`.

Noise synchronisation: with probability p per sample, the latent z is replaced by its own
noised version z_tz = (1 - tz) z + (s + tz (1 - s)) e_z with tz ~ U(0, tmax), and that sample's
decoder time is drawn from U(tz, 1) (``time_rule="above"``), so the decoder never sees an image
less noisy than its latent.

Random draws: :func:`flow_matching_loss` draws from one generator for the whole batch, or takes
``draws`` made by :func:`draw_per_sample`, where sample i's draws come from its own generator
seeded by ``seeds[i]``. The trainer seeds sample i of step k by (seed, k, global index of i), so
a sample gets the same noise whatever the world size, the rank that reads it, or the micro-batch
it lands in: that is what makes a 2-process run follow a 1-process run with the same global batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import FlowConfig
from ..ops import fm_loss, fm_noise


def sigma(t: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """Noise scale of x_t: s + t (1 - s)."""
    return sigma_min + t * (1 - sigma_min)


def _bc(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def sample_times(batch: int, generator: torch.Generator | None = None, device=None,
                 low: torch.Tensor | None = None, cfg: FlowConfig | None = None) -> torch.Tensor:
    """Training times t in (low, 1) per sample (low defaults to 0). Returns (B,) float32.

    ``cfg.time_sampling == "uniform"`` (default): t ~ U(low, 1). ``"logit_normal"``:
    u = sigmoid(mean + std * n), n ~ N(0, 1), then t = low + (1 - low) u.
    """
    return times_from_draw(_draw_time(batch, generator, device, cfg), low, cfg)


def _draw_time(batch: int, generator, device, cfg: FlowConfig | None) -> torch.Tensor:
    """The raw time draw: u ~ U(0, 1) (uniform) or n ~ N(0, 1) (logit_normal), (B,) float32."""
    if cfg is None or cfg.time_sampling == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if cfg.time_sampling == "logit_normal":
        return torch.randn(batch, generator=generator, device=device)
    raise ValueError(f"unknown flow.time_sampling {cfg.time_sampling!r} (uniform|logit_normal)")


def times_from_draw(raw: torch.Tensor, low: torch.Tensor | None = None, cfg: FlowConfig | None = None) -> torch.Tensor:
    """Times t (B,) from a raw draw of :func:`_draw_time` (see :func:`sample_times`)."""
    if cfg is None or cfg.time_sampling == "uniform":
        u = raw
    elif cfg.time_sampling == "logit_normal":
        u = torch.sigmoid(cfg.time_logit_mean + cfg.time_logit_std * raw)
    else:
        raise ValueError(f"unknown flow.time_sampling {cfg.time_sampling!r} (uniform|logit_normal)")
    return u if low is None else low + (1 - low) * u


def noise_sync(z: torch.Tensor, cfg: FlowConfig, generator: torch.Generator | None = None):
    """Apply noise synchronisation to latents z (B, c, h, w).

    Returns (z', t_low, mask): z' with the selected samples noised, the lower bound (B,) for the
    decoder time of each sample (tz for noised samples under the "above" rule, else 0), and the
    boolean mask (B,) of noised samples. With ``noise_sync_prob == 0`` z is returned unchanged.
    """
    B = z.shape[0]
    if cfg.noise_sync_prob <= 0:
        return _apply_noise_sync(z, cfg, None, None, None)
    u = torch.rand(B, generator=generator, device=z.device)
    tz_u = torch.rand(B, generator=generator, device=z.device)
    ez = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return _apply_noise_sync(z, cfg, u, tz_u, ez)


def _apply_noise_sync(z: torch.Tensor, cfg: FlowConfig, u, tz_u, ez):
    """:func:`noise_sync` given its draws: u, tz_u ~ U(0, 1) (B,) and ez ~ N(0, I) like z."""
    B = z.shape[0]
    zeros = torch.zeros(B, device=z.device)
    if cfg.noise_sync_prob <= 0:
        return z, zeros, torch.zeros(B, dtype=torch.bool, device=z.device)
    mask = u < cfg.noise_sync_prob
    tz = tz_u * cfg.noise_sync_tmax
    z_noised, _ = fm_noise(z, ez.to(z.dtype), tz, cfg.sigma_min)
    z_out = torch.where(mask.reshape(-1, *([1] * (z.dim() - 1))), z_noised, z)  # keep mask boolean
    if cfg.noise_sync_time_rule == "above":
        t_low = torch.where(mask, tz, zeros)
    elif cfg.noise_sync_time_rule == "independent":
        t_low = zeros
    else:
        raise ValueError(f"unknown flow.noise_sync_time_rule {cfg.noise_sync_time_rule!r} (above|independent)")
    return z_out, t_low, mask


def draw_per_sample(seeds: Sequence[int], image_shape: Sequence[int], latent_shape: Sequence[int],
                    cfg: FlowConfig, device=None, dtype: torch.dtype = torch.float32,
                    latent_dtype: torch.dtype = torch.float32) -> dict:
    """Every random draw of :func:`flow_matching_loss` for a batch, sample i's from a generator
    on ``device`` seeded by ``seeds[i]`` (in the order noise-sync u, noise-sync tz, noise-sync
    noise, time, image noise), so a sample's draws do not depend on the batch around it.

    ``image_shape`` / ``latent_shape``: one sample's (3, H, W) / (c, h, w). Returns a dict for
    ``flow_matching_loss(..., draws=)``: ``"sync_u"``, ``"sync_tz"`` (B,) or None, ``"sync_noise"``
    (B, c, h, w) or None, ``"time"`` (B,) raw time draws, ``"noise"`` (B, 3, H, W) of ``dtype``.
    """
    if len(seeds) == 0:
        raise ValueError("draw_per_sample: empty batch")
    device = torch.device("cpu") if device is None else torch.device(device)
    sync = cfg.noise_sync_prob > 0
    parts: dict[str, list] = {"sync_u": [], "sync_tz": [], "sync_noise": [], "time": [], "noise": []}
    for seed in seeds:
        g = torch.Generator(device=device).manual_seed(int(seed))
        if sync:
            parts["sync_u"].append(torch.rand(1, generator=g, device=device))
            parts["sync_tz"].append(torch.rand(1, generator=g, device=device))
            parts["sync_noise"].append(torch.randn((1, *latent_shape), generator=g, device=device, dtype=latent_dtype))
        parts["time"].append(_draw_time(1, g, device, cfg))
        parts["noise"].append(torch.randn((1, *image_shape), generator=g, device=device, dtype=dtype))
    return {k: (torch.cat(v) if v else None) for k, v in parts.items()}


def training_target(x: torch.Tensor, noise: torch.Tensor, v: torch.Tensor, objective: str) -> torch.Tensor:
    """What the network is trained to output under ``objective``."""
    if objective == "velocity":
        return v
    if objective == "epsilon":
        return noise
    if objective == "x0":
        return x
    raise ValueError(f"unknown flow objective {objective!r} (velocity|epsilon|x0)")


def to_velocity(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    """Convert a network output under ``cfg.objective`` into the velocity dx_t/dt.

    epsilon: x0 = (x_t - sigma(t) e) / (1 - t), clamped to [-1, 1] (the data range) because the
    division is ill-conditioned as t -> 1, and 0 at t = 1 itself, where e says nothing of x0 (a
    floor of 1e-3 under 1 - t had scaled x0 by (1 - t) / 1e-3 for every t in (0.999, 1), which
    grids of over 1000 steps evaluate); x0: e = (x_t - (1 - t) x0) / sigma(t). In both cases
    v = (1 - s) e - x0.
    """
    s = cfg.sigma_min
    if cfg.objective == "velocity":
        return out
    tb = _bc(t, x_t)
    if cfg.objective == "epsilon":
        den = 1 - tb
        x0 = torch.where(den > 0, (x_t - sigma(tb, s) * out) / torch.where(den > 0, den, 1), 0).clamp(-1, 1)
        return (1 - s) * out - x0
    if cfg.objective == "x0":
        eps = (x_t - (1 - tb) * out) / sigma(tb, s)
        return (1 - s) * eps - out
    raise ValueError(f"unknown flow objective {cfg.objective!r} (velocity|epsilon|x0)")


def flow_matching_loss(decoder, x: torch.Tensor, z: torch.Tensor, cfg: FlowConfig,
                       generator: torch.Generator | None = None,
                       draws: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Per-sample flow-matching loss (B,) for images x (B, 3, H, W) and latents z.

    ``decoder(x_t, t, z)`` returns the network output. Noise sync (if enabled) is applied to z
    here. The random draws come from ``generator`` (one stream for the batch) or, when given,
    from ``draws`` (:func:`draw_per_sample`). The returned dict holds the sampled ``t`` and the
    noise-sync ``mask`` for logging/tests.
    """
    if draws is None:
        z, t_low, mask = noise_sync(z, cfg, generator)
        t = sample_times(x.shape[0], generator, x.device, low=t_low, cfg=cfg)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        if draws["noise"].shape != x.shape:
            raise ValueError(f"draws are for images {tuple(draws['noise'].shape)}, got {tuple(x.shape)}")
        z, t_low, mask = _apply_noise_sync(z, cfg, draws["sync_u"], draws["sync_tz"], draws["sync_noise"])
        t = times_from_draw(draws["time"], t_low, cfg)
        noise = draws["noise"].to(x.dtype)
    x_t, v = fm_noise(x, noise, t, cfg.sigma_min)
    out = decoder(x_t, t, z)
    target = training_target(x, noise, v, cfg.objective)
    # Under autocast the output is bf16/fp16 and the target float32: the loss is taken in the
    # wider type (fm_loss accumulates in float32 either way).
    wide = torch.promote_types(out.dtype, target.dtype)
    loss = fm_loss(out.to(wide), target.to(wide))
    return loss, {"t": t, "noise_sync_mask": mask}
