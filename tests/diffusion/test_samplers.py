"""Tests for dito_fast/diffusion/samplers.py: time grids and the order of accuracy of the ODE
solvers on an equation with a closed-form solution."""

from __future__ import annotations

import math

import pytest
import torch

from dito_fast.diffusion import samplers

# dx/dt = x + t has the solution x(t) = C e^t - t - 1. Starting from x(1) = x1 (C = (x1 + 2) / e),
# integrating from t = 1 down to t = 0 gives x(0) = (x1 + 2) / e - 1. The velocity depends on t,
# so a sampler passing the wrong time to the velocity would converge to a wrong answer.


def _velocity(calls):
    def v(x, t):
        assert t.shape == (x.shape[0],), "samplers pass a (B,) time tensor"
        calls.append(t.clone())
        return x + t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return v


X1 = torch.tensor([[-1.5, 0.0, 0.7], [2.0, -0.3, 1.1]], dtype=torch.float64)
EXACT = (X1 + 2) / math.e - 1


def _error(sampler: str, steps: int, schedule: str = "uniform") -> float:
    x0 = samplers.sample(_velocity([]), X1.clone(), steps=steps, sampler=sampler, schedule=schedule)
    return float((x0 - EXACT).abs().max())


@pytest.mark.parametrize("sampler, order", [("euler", 1.0), ("heun", 2.0)])
@pytest.mark.parametrize("schedule", ["uniform", "shifted", "edm"])
def test_convergence_order(sampler, order, schedule):
    errors = [_error(sampler, n, schedule) for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        observed = math.log2(coarse / fine)  # error ratio when halving the step size
        assert abs(observed - order) < 0.3, (errors, observed)
    if schedule == "uniform":
        assert errors[-1] < (0.02 if sampler == "euler" else 2e-4)


def test_heun_more_accurate_than_euler_for_same_nfe():
    # Heun with 16 steps (31 NFE) vs Euler with 32 steps (32 NFE)
    assert _error("heun", 16) < 0.1 * _error("euler", 32)


def test_single_step_values():
    # one Euler step from t=1 to t=0: x0 = x1 - v(x1, 1) = x1 - (x1 + 1) = -1
    x = samplers.euler(_velocity([]), X1.clone(), timesteps=samplers.make_timesteps(1))
    assert torch.allclose(x, torch.full_like(X1, -1.0))
    # Heun with two steps: the corrector at t=0.5, then a plain Euler step landing on t=0
    ts = samplers.make_timesteps(2)
    x = samplers.heun(_velocity([]), X1.clone(), timesteps=ts)
    pred = X1 - 0.5 * (X1 + 1)
    x_half = X1 - 0.25 * ((X1 + 1) + (pred + 0.5))
    assert torch.allclose(x, x_half - 0.5 * (x_half + 0.5))


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_nfe_and_times(sampler, steps):
    calls = []
    samplers.sample(_velocity(calls), X1.clone(), steps=steps, sampler=sampler)
    assert len(calls) == samplers.nfe(sampler, steps)
    times = torch.stack(calls)[:, 0].double()
    assert times[0] == 1.0 and times.min() > 0  # t = 0 is never evaluated
    assert set(times.tolist()) <= set(samplers.make_timesteps(steps).tolist())  # float64 state: float64 times


def test_samplers_keep_dtype_and_shape():
    noise = torch.randn(2, 3, 4, 4)
    for name in samplers.SAMPLERS:
        out = samplers.sample(lambda x, t: -x, noise, steps=3, sampler=name)
        assert out.shape == noise.shape and out.dtype == noise.dtype


@pytest.mark.parametrize("schedule", samplers.SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
def test_make_timesteps_monotone(schedule, steps):
    ts = samplers.make_timesteps(steps, schedule)
    assert ts.dtype == torch.float64 and ts.shape == (steps + 1,)
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.all(ts[1:] < ts[:-1])


@pytest.mark.parametrize("shift", [0.08, 0.1, 0.2, 0.3, 0.5, 3.0, 7.5])
def test_shifted_grid_ends_exactly_at_1_and_0(shift):
    # shift u / (1 + (shift - 1) u) rounded t_0 to 1 + 2^-52 for shift 0.1 or 0.2 (every sampler
    # then refused the grid) and to 1 - 2^-53 for 0.3 (dpmpp_2m's first step taken as second order)
    ts = samplers.make_timesteps(7, f"shifted:{shift}")
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0 and bool((ts.diff() < 0).all())
    samplers.euler(lambda x, t: x, torch.ones(1, 3), timesteps=ts)


def test_make_timesteps_values():
    assert torch.allclose(samplers.make_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = samplers.make_timesteps(4, "shifted", shift=3.0)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(shifted, 3 * u / (1 + 2 * u))
    assert torch.all(shifted[1:-1] > u[1:-1])  # more steps at high noise
    edm = samplers.make_timesteps(10, "edm")
    sig = edm[1:-1] / (1 - edm[1:-1])
    assert sig[0] == pytest.approx(80.0) and sig[-1] == pytest.approx(0.002)
    # rho-spaced: sigma^(1/rho) is evenly spaced between sigma_max and sigma_min
    steps_rho = torch.diff(sig ** (1 / 7.0))
    assert torch.allclose(steps_rho, steps_rho[0].expand_as(steps_rho))
    # more grid points at low noise than the uniform grid
    uni = samplers.make_timesteps(10, "uniform")
    assert int((edm[1:-1] < 0.1).sum()) > int((uni[1:-1] < 0.1).sum())
    for rho in (0.1, 0.3, 100.0):  # small rho: 80^(1/rho) dwarfs 0.002^(1/rho), and the ends stay exact
        grid = samplers.make_timesteps(5, f"edm:{rho}")
        sig = grid[1:-1] / (1 - grid[1:-1])
        assert sig[0].item() == pytest.approx(80.0) and sig[-1].item() == pytest.approx(0.002, rel=1e-9), rho
        assert torch.all(torch.diff(grid) < 0), rho


@pytest.mark.parametrize("steps", [0, -3, 2.0, 1.5, "4"])
def test_make_timesteps_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        samplers.make_timesteps(steps)


def test_make_timesteps_bad_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        samplers.make_timesteps(4, "cosine")
    with pytest.raises(ValueError, match="shift must be > 0"):
        samplers.make_timesteps(4, "shifted", shift=0.0)


def test_get_sampler():
    assert samplers.get_sampler("euler") is samplers.euler
    with pytest.raises(ValueError, match="unknown sampler 'dpm'.*euler.*heun"):
        samplers.get_sampler("dpm")


# --------------------------------------------------------------------------------------------
# multistep solvers, on the exact flow of Gaussian data: x ~ N(m, c^2), x_t = (1 - t) x + t e.
# The ODE's solution from x(1) = x1 is x(t) = (1 - t) m + sqrt((1 - t)^2 c^2 + t^2) x1, so
# x(0) = m + c x1, and v(x, t) = -m + (t - (1 - t) c^2) / ((1 - t)^2 c^2 + t^2) (x - (1 - t) m):
# the kind of field a decoder sees (curved near the data), unlike the linear test ODE above.

M, C = 0.3, 0.2


def _gauss_velocity(x, t):
    t = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return -M + (t - (1 - t) * C * C) / ((1 - t) ** 2 * C * C + t * t) * (x - (1 - t) * M)


def _gauss_error(sampler: str, steps: int, schedule: str) -> float:
    x0 = samplers.sample(_gauss_velocity, X1.clone(), steps=steps, sampler=sampler, schedule=schedule)
    return float((x0 - (M + C * X1)).abs().max())


@pytest.mark.parametrize("sampler, order, schedule", [
    ("euler", 1, "uniform"), ("heun", 2, "uniform"), ("ab2", 2, "uniform"), ("ab2", 2, "shifted:0.5"),
    ("ab3", 3, "shifted:0.5"), ("dpmpp_2m", 2, "edm"),
])
def test_gaussian_flow_convergence_order(sampler, order, schedule):
    errors = [_gauss_error(sampler, n, schedule) for n in (16, 32, 64)]
    observed = math.log2(errors[0] / errors[2]) / 2  # mean order over two halvings
    assert abs(observed - order) < 0.35, (errors, observed)


def test_multistep_beats_euler_at_equal_nfe():
    for sampler in ("ab2", "ab3", "dpmpp_2m"):
        assert _gauss_error(sampler, 16, "shifted:0.5") < 0.2 * _gauss_error("euler", 16, "shifted:0.5")


def test_adams_bashforth_weights():
    # constant steps: the textbook coefficients (times h = 1)
    assert samplers._lagrange_integrals([0.0, -1.0], 0.0, 1.0) == pytest.approx([1.5, -0.5])
    assert samplers._lagrange_integrals([0.0, -1.0, -2.0], 0.0, 1.0) == pytest.approx([23 / 12, -16 / 12, 5 / 12])
    # integrate a quadratic exactly on uneven nodes
    nodes, a, b = [0.7, 0.9, 1.0], 0.7, 0.4
    w = samplers._lagrange_integrals(nodes, a, b)
    f = lambda t: 3 * t * t - t + 2  # noqa: E731
    exact = (b ** 3 - b * b / 2 + 2 * b) - (a ** 3 - a * a / 2 + 2 * a)
    assert sum(wi * f(n) for wi, n in zip(w, nodes)) == pytest.approx(exact)
    with pytest.raises(ValueError, match="order must be 1-4"):
        samplers.adams_bashforth(lambda x, t: x, X1.clone(), timesteps=samplers.make_timesteps(3), order=5)


def test_first_steps_are_euler_steps():
    # one step: every solver is an Euler step (DPM-Solver++ first order = DDIM = Euler for this flow)
    ref = samplers.sample(_velocity([]), X1.clone(), steps=1, sampler="euler")
    for name in ("ab2", "ab3", "dpmpp_2m"):
        torch.testing.assert_close(samplers.sample(_velocity([]), X1.clone(), steps=1, sampler=name), ref)
    # two steps of ab2 with a constant velocity field: exact like Euler
    out = samplers.sample(lambda x, t: torch.ones_like(x), X1.clone(), steps=2, sampler="ab2")
    torch.testing.assert_close(out, X1 - 1)


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("schedule", ["uniform", "edm"])
def test_evaluation_times_predict_the_calls(sampler, schedule):
    calls = []
    ts = samplers.make_timesteps(5, schedule)
    noise = X1.clone()
    samplers.get_sampler(sampler)(_velocity(calls), noise, timesteps=ts)
    assert torch.equal(noise, X1)  # the noise is not modified
    assert len(calls) == samplers.nfe(sampler, 5)
    # a float64 state (X1) sees float64 times, the grid's own values (they had been rounded to
    # float32); a float32 state float32 ones
    assert all(t.dtype == torch.float64 for t in calls) and {float(t[0]) for t in calls} <= set(ts.tolist())
    assert [float(t[0]) for t in calls] == samplers.evaluation_times(sampler, ts, dtype=torch.float64)
    calls32 = []
    samplers.get_sampler(sampler)(_velocity(calls32), X1.float(), timesteps=ts)
    assert all(t.dtype == torch.float32 for t in calls32)
    assert [float(t[0]) for t in calls32] == samplers.evaluation_times(sampler, ts)


def test_parse_schedule():
    assert samplers.parse_schedule("uniform") == ("uniform", {})
    assert samplers.parse_schedule("shifted:0.5") == ("shifted", {"shift": 0.5})
    assert samplers.parse_schedule("edm:5") == ("edm", {"rho": 5.0})
    assert torch.equal(samplers.make_timesteps(6, "shifted:0.5"), samplers.make_timesteps(6, "shifted", shift=0.5))
    for bad, msg in (("uniform:2", "bad schedule"), ("shifted:x", "bad schedule"), ("shifted:inf", "bad schedule"),
                     ("cosine:1", "unknown schedule"), (None, "must be a string")):
        with pytest.raises(ValueError, match=msg):
            samplers.parse_schedule(bad)
    with pytest.raises(ValueError, match="rho must be > 0"):
        samplers.make_timesteps(4, "edm:-1")


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("grid, msg", [
    (torch.linspace(0, 1, 5, dtype=torch.float64), "decrease strictly"),
    (torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64), "decrease strictly"),
    (torch.tensor([1.5, 0.5, 0.0], dtype=torch.float64), r"in \[0, 1\]"),
    (torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64), r"finite and in \[0, 1\]"),
    (torch.tensor([1.0], dtype=torch.float64), "at least 2 times"),
    (torch.ones(2, 2, dtype=torch.float64), "1-D grid"),
])
def test_samplers_refuse_bad_grids(sampler, grid, msg):
    """An increasing grid (t = 0 is the image, an easy slip) integrated away from the image
    without a word; dpmpp_2m divided by zero."""
    with pytest.raises(ValueError, match=msg):
        samplers.get_sampler(sampler)(lambda x, t: torch.zeros_like(x), torch.zeros(1, 3), timesteps=grid)


def test_samplers_take_a_partial_grid_and_numpy_steps():
    """A grid that starts below 1 (decoding from a partly noised image) is valid, and numpy
    integers count as integers."""
    np = pytest.importorskip("numpy")
    x = samplers.euler(lambda x, t: torch.ones_like(x), torch.zeros(2), timesteps=torch.tensor([0.5, 0.25, 0.0]))
    torch.testing.assert_close(x, torch.full((2,), -0.5))
    torch.testing.assert_close(samplers.make_timesteps(np.int64(4)), samplers.make_timesteps(4))
