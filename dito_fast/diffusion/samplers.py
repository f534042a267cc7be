"""ODE samplers for decoding: pure functions of a velocity field and the initial noise.

Every sampler integrates dx/dt = v(x, t) from t = 1 (x = noise) down to t = 0 along a decreasing
time grid ``timesteps`` (steps + 1 values from 1.0 to 0.0, see :func:`make_timesteps`).
``velocity_fn(x, t)`` takes x (B, ...) and a (B,) time tensor on x's device (float32; float64
for a float64 state) and returns
v like x, as a new tensor (samplers may use it as scratch space). Samplers never modify
``noise``: they copy it once and update that copy in place (one state buffer per decode, no
allocation per step besides the velocity itself).

One-step solvers: ``euler`` (the paper's), ``heun``. Multistep solvers (one velocity evaluation
per step, re-using earlier evaluations for higher order): ``ab2``/``ab3`` (variable-step
Adams-Bashforth on v in t) and ``dpmpp_2m`` (DPM-Solver++(2M), Lu et al. 2022, on the data
prediction x0 = x - t v in lambda = log((1 - t) / t)). See benchmarks/results/sampler_study.md for
how they compare on a trained decoder.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCHEDULES = ("uniform", "shifted", "edm")


def parse_schedule(schedule: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:value"`` -> (name, keyword arguments of :func:`make_timesteps`).

    The value sets the schedule's main parameter: ``shifted:<shift>``, ``edm:<rho>``; e.g.
    ``"shifted:0.5"`` puts more steps near the image, ``"shifted:3"`` near the noise.
    """
    if not isinstance(schedule, str):
        raise ValueError(f"schedule must be a string such as 'uniform' or 'shifted:0.5', got {schedule!r}")
    name, sep, value = schedule.partition(":")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES} (optionally 'shifted:<shift>', "
                         "'edm:<rho>')")
    if not sep:
        return name, {}
    key = {"shifted": "shift", "edm": "rho"}.get(name)
    try:
        number = float(value)
    except ValueError:
        number = None
    if key is None or number is None or not math.isfinite(number):
        raise ValueError(f"bad schedule {schedule!r}: expected 'shifted:<shift>' or 'edm:<rho>' with a number")
    return name, {key: number}


def make_timesteps(steps: int, schedule: str = "uniform", *, shift: float = 3.0, rho: float = 7.0,
                   sigma_max: float = 80.0, sigma_min: float = 0.002) -> torch.Tensor:
    """Decreasing float64 time grid of ``steps + 1`` points, t[0] = 1, t[-1] = 0.

    - ``uniform``: t_i = 1 - i / steps (the paper's Euler grid).
    - ``shifted``: uniform u warped as t = shift u / (1 + (shift - 1) u); shift > 1 spends more
      steps at high noise (SD3-style), shift < 1 more steps near the image.
    - ``edm``: Karras et al.'s rho-spaced sigmas (``sigma_max`` 80 to ``sigma_min`` 0.002) mapped
      to flow time by t = sigma / (1 + sigma) (the flow x_t / (1 - t) = x + t / (1 - t) e is the
      EDM process with sigma = t / (1 - t)), preceded by t = 1; it spends more steps at low
      noise. Its first (1 -> 80/81) and last (0.002/1.002 -> 0) steps do not shrink with
      ``steps``, so its error stops falling at ~1e-5 of the image (~98 dB) however many steps are
      taken; ``steps=2`` is one real step. Small rho is fine: the points are formed so that the
      ends are exact (rho 0.1 had cancelled to two zeros).

    ``schedule`` may carry the parameter: ``"shifted:0.5"``, ``"edm:5"`` (see :func:`parse_schedule`).
    """
    steps_arg = steps
    try:
        steps = operator.index(steps) if not isinstance(steps, bool) else None  # numpy integers too
    except TypeError:
        steps = None
    if steps is None or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps_arg!r}")
    name, params = parse_schedule(schedule)
    shift, rho = params.get("shift", shift), params.get("rho", rho)
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if name == "uniform":
        return u
    if name == "shifted":
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        # shift u / (1 + (shift - 1) u), in the form that gives exactly 1 at u = 1 and 0 at u = 0
        # (the other rounded t_0 to 1 + 2^-52 for shift 0.1, which the grid check then refused)
        return u / (u + (1 - u) / shift)
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if steps < 2:
        return u
    i = torch.arange(steps - 1, dtype=torch.float64) / max(steps - 2, 1)
    # (1 - i) a + i b, not a + i (b - a): for small rho a = 80^(1/rho) dwarfs b and a + (b - a)
    # cancels to 0 instead of b
    sig = ((1 - i) * sigma_max ** (1 / rho) + i * sigma_min ** (1 / rho)) ** rho
    return torch.cat([torch.ones(1, dtype=torch.float64), sig / (1 + sig), torch.zeros(1, dtype=torch.float64)])


def _grid(timesteps) -> list[float]:
    """The time grid as floats, checked: 1-D, at least 2 points, finite, in [0, 1], strictly
    decreasing (t = 1 is noise, t = 0 the image; an increasing grid would integrate away from
    the image without any error)."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64)
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
    if not (torch.isfinite(ts).all() and ts.min() >= 0 and ts.max() <= 1):
        raise ValueError(f"timesteps must be finite and in [0, 1], got {ts.tolist()}")
    if not (ts[1:] < ts[:-1]).all():
        raise ValueError(f"timesteps must decrease strictly, from noise (t = 1) to the image (t = 0), got {ts.tolist()}")
    return ts.tolist()


def _t(value, x: torch.Tensor) -> torch.Tensor:
    # torch.full with a Python float: no host-to-device copy, so the loop can be captured in a
    # CUDA graph. The float64 grid rounded to float32, or kept for a float64 state.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=dtype)


def euler(velocity_fn: VelocityFn, noise: torch.Tensor, *, timesteps: torch.Tensor) -> torch.Tensor:
    """First-order Euler: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i). NFE = steps."""
    ts = _grid(timesteps)
    x = noise.clone()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x.add_(velocity_fn(x, _t(t_cur, x)), alpha=t_next - t_cur)  # dt < 0: towards the image
    return x


def heun(velocity_fn: VelocityFn, noise: torch.Tensor, *, timesteps: torch.Tensor) -> torch.Tensor:
    """Second-order Heun (trapezoidal predictor-corrector); the step that lands on t = 0 is an
    Euler step (EDM convention) since no evaluation is needed there. NFE = 2 * steps - 1."""
    ts = _grid(timesteps)
    x = noise.clone()
    x_pred = torch.empty_like(x)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t_cur
        v = velocity_fn(x, _t(t_cur, x))
        if t_next == 0.0:
            x.add_(v, alpha=dt)
            continue
        torch.add(x, v, alpha=dt, out=x_pred)  # Euler predictor
        v.add_(velocity_fn(x_pred, _t(t_next, x)))  # v_cur + v_pred
        x.add_(v, alpha=0.5 * dt)  # trapezoidal corrector
    return x


def _lagrange_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    """Weights w_j = integral over [a, b] of the Lagrange basis polynomial of node j, so that
    sum_j w_j f(nodes[j]) integrates the interpolant of f exactly. Computed in float64 with
    coordinates relative to ``a`` (small numbers, little cancellation)."""
    nodes = [n - a for n in nodes]
    b = b - a
    weights = []
    for j, tj in enumerate(nodes):
        poly = [1.0]  # coefficients, lowest degree first
        for m, tm in enumerate(nodes):
            if m == j:
                continue
            # multiply by (tau - tm) / (tj - tm)
            new = [0.0] * (len(poly) + 1)
            for k, c in enumerate(poly):
                new[k + 1] += c / (tj - tm)
                new[k] -= c * tm / (tj - tm)
            poly = new
        weights.append(sum(c * b ** (k + 1) / (k + 1) for k, c in enumerate(poly)))
    return weights


def adams_bashforth(velocity_fn: VelocityFn, noise: torch.Tensor, *, timesteps: torch.Tensor,
                    order: int = 2) -> torch.Tensor:
    """Variable-step Adams-Bashforth of ``order`` (1-4) on the velocity in t. NFE = steps.

    Step i integrates the polynomial through the last min(order, i + 1) velocities over
    [t_i, t_{i+1}]: the first steps warm up with lower orders (the first is an Euler step).
    With a constant step h, order 2 is x + h (3/2 v_i - 1/2 v_{i-1}). The Euler start's local
    error O(h^2) carries to the end, so order 3 and 4 converge at order 2 globally (measured on
    a closed-form flow: 1.96 for order 3 on uniform grids), with a smaller constant than order 2.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1-4, got {order}")
    ts = _grid(timesteps)
    x = noise.clone()
    history: list[tuple[float, torch.Tensor]] = []  # (t, v), newest last
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        history.append((t_cur, velocity_fn(x, _t(t_cur, x))))
        history = history[-order:]
        weights = _lagrange_integrals([t for t, _ in history], t_cur, t_next)
        for w, (_, v) in zip(weights, history):
            x.add_(v, alpha=w)
    return x


def ab2(velocity_fn: VelocityFn, noise: torch.Tensor, *, timesteps: torch.Tensor) -> torch.Tensor:
    """Second-order Adams-Bashforth (see :func:`adams_bashforth`). NFE = steps."""
    return adams_bashforth(velocity_fn, noise, timesteps=timesteps, order=2)


def ab3(velocity_fn: VelocityFn, noise: torch.Tensor, *, timesteps: torch.Tensor) -> torch.Tensor:
    """Three-step Adams-Bashforth (see :func:`adams_bashforth`: with its Euler start, globally
    second order). NFE = steps."""
    return adams_bashforth(velocity_fn, noise, timesteps=timesteps, order=3)


def _lam(t: float) -> float:
    return math.log((1 - t) / t)  # log(alpha / sigma) of the flow


def dpmpp_2m(velocity_fn: VelocityFn, noise: torch.Tensor, *, timesteps: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) for the flow x_t = (1 - t) x + t e (alpha = 1 - t, sigma = t). NFE = steps.

    With the data prediction x0 = x - t v (an identity for any v, so this integrates exactly
    dx/dt = v), the ODE's solution is x_{i+1} = (sigma_{i+1} / sigma_i) x_i
    + sigma_{i+1} * integral of e^lambda x0 d lambda, lambda = log(alpha / sigma). Each step takes
    x0 linear in lambda through the last two estimates:
        D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_{i-1} / h_i,  h = lambda_{i+1} - lambda_i
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D.
    lambda is infinite at t = 1 and t = 0, so the first two steps and the last one are first order
    (the first order step is exactly an Euler step; the last returns D = x0).
    """
    ts = _grid(timesteps)
    x = noise.clone()
    x0_prev, h_prev = None, None
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = velocity_fn(x, _t(t_cur, x))
        x0 = v.mul_(-t_cur).add_(x)  # x0 = x - t v, in the velocity's buffer
        if t_next == 0.0:
            return x.copy_(x0)  # sigma_{i+1} = 0: the solution is the data prediction
        h = _lam(t_next) - _lam(t_cur) if t_cur < 1.0 else math.inf
        # first order: x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (alpha_{i+1} - sigma_{i+1} alpha_i / sigma_i) D
        ratio = t_next / t_cur
        coef = (1 - t_next) - ratio * (1 - t_cur)  # = -alpha_{i+1} (e^{-h} - 1)
        if x0_prev is not None and math.isfinite(h_prev) and math.isfinite(h):
            c = h / (2 * h_prev)  # 1 / (2r)
            x.mul_(ratio).add_(x0, alpha=coef * (1 + c)).add_(x0_prev, alpha=-coef * c)
        else:
            x.mul_(ratio).add_(x0, alpha=coef)
        x0_prev, h_prev = x0, h
    return x


SAMPLERS: dict[str, Callable] = {"euler": euler, "heun": heun, "ab2": ab2, "ab3": ab3, "dpmpp_2m": dpmpp_2m}


def nfe(sampler: str, steps: int) -> int:
    """Number of velocity evaluations ``sampler`` makes for ``steps`` steps."""
    get_sampler(sampler)
    return 2 * steps - 1 if sampler == "heun" else steps


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def evaluation_times(sampler: str, timesteps: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[float]:
    """The times (in call order, as the velocity sees them for a state of ``dtype``: float32
    values, or float64 ones) at which ``sampler`` evaluates the velocity on this grid, found by a
    dry run on a 1-element state (samplers choose times from the grid only, never from x). Used
    to precompute everything that depends on t alone."""
    times: list[float] = []

    def record(x, t):
        times.append(float(t[0]))
        return torch.zeros_like(x)

    get_sampler(sampler)(record, torch.zeros(1, dtype=dtype), timesteps=timesteps)
    return times


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, *, steps: int, sampler: str = "euler",
           schedule: str = "uniform", **schedule_kwargs) -> torch.Tensor:
    """Convenience: build the time grid and run ``sampler``."""
    return get_sampler(sampler)(velocity_fn, noise, timesteps=make_timesteps(steps, schedule, **schedule_kwargs))


__all__ = ["make_timesteps", "parse_schedule", "euler", "heun", "adams_bashforth", "ab2", "ab3", "dpmpp_2m",
           "sample", "nfe", "get_sampler", "evaluation_times", "SAMPLERS", "SCHEDULES"]
