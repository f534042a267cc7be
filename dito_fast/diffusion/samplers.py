"""ODE samplers for decoding: pure functions of a velocity field and the initial noise.

Every sampler integrates dx/dt = v(x, t) from t = 1 (x = noise) down to t = 0 along a decreasing
time grid ``timesteps`` (steps + 1 values from 1.0 to 0.0, see :func:`make_timesteps`).
``velocity_fn(x, t)`` takes x (B, ...) and a (B,) time tensor and returns v like x.
"""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCHEDULES = ("uniform", "shifted", "edm")


def make_timesteps(steps: int, schedule: str = "uniform", *, shift: float = 3.0, rho: float = 7.0,
                   sigma_max: float = 80.0, sigma_min: float = 0.002) -> torch.Tensor:
    """Decreasing float64 time grid of ``steps + 1`` points, t[0] = 1, t[-1] = 0.

    - ``uniform``: t_i = 1 - i / steps (the paper's Euler grid).
    - ``shifted``: uniform u warped as t = shift u / (1 + (shift - 1) u); shift > 1 spends more
      steps at high noise (SD3-style).
    - ``edm``: Karras et al.'s rho-spaced sigmas mapped to flow time by t = sigma / (1 + sigma)
      (the flow x_t / (1 - t) = x + t / (1 - t) e is the EDM process with sigma = t / (1 - t)),
      preceded by t = 1; it spends more steps at low noise.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if schedule == "uniform":
        return u
    if schedule == "shifted":
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        return shift * u / (1 + (shift - 1) * u)
    if schedule == "edm":
        if steps < 2:
            return u
        i = torch.arange(steps - 1, dtype=torch.float64) / max(steps - 2, 1)
        sig = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        return torch.cat([torch.ones(1, dtype=torch.float64), sig / (1 + sig), torch.zeros(1, dtype=torch.float64)])
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")


def _t(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return value.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


def euler(velocity_fn: VelocityFn, noise: torch.Tensor, *, timesteps: torch.Tensor) -> torch.Tensor:
    """First-order Euler: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i). NFE = steps."""
    x = noise
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        x = x + float(t_next - t_cur) * velocity_fn(x, _t(t_cur, x))  # dt < 0: towards the image
    return x


def heun(velocity_fn: VelocityFn, noise: torch.Tensor, *, timesteps: torch.Tensor) -> torch.Tensor:
    """Second-order Heun (trapezoidal predictor-corrector); the step that lands on t = 0 is an
    Euler step (EDM convention) since no evaluation is needed there. NFE = 2 * steps - 1."""
    x = noise
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        dt = float(t_next - t_cur)
        v = velocity_fn(x, _t(t_cur, x))
        x_pred = x + dt * v  # Euler predictor
        if float(t_next) == 0.0:
            x = x_pred
        else:
            x = x + dt * 0.5 * (v + velocity_fn(x_pred, _t(t_next, x)))  # trapezoidal corrector
    return x


SAMPLERS: dict[str, Callable] = {"euler": euler, "heun": heun}


def nfe(sampler: str, steps: int) -> int:
    """Number of velocity evaluations ``sampler`` makes for ``steps`` steps."""
    return {"euler": steps, "heun": 2 * steps - 1}[sampler]


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, *, steps: int, sampler: str = "euler",
           schedule: str = "uniform", **schedule_kwargs) -> torch.Tensor:
    """Convenience: build the time grid and run ``sampler``."""
    return get_sampler(sampler)(velocity_fn, noise, timesteps=make_timesteps(steps, schedule, **schedule_kwargs))


__all__ = ["make_timesteps", "euler", "heun", "sample", "nfe", "get_sampler", "SAMPLERS", "SCHEDULES"]
