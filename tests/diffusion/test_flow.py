"""Tests for dito_fast/diffusion/flow.py against the formulas of DESIGN.md §1:

    x_t = (1 - t) x + (s + t (1 - s)) e,   v = (1 - s) e - x,   loss = per-sample MSE,
    noise sync: z_tz = (1 - tz) z + (s + tz (1 - s)) e_z with prob p, decoder t ~ U(tz, 1).

A large sigma_min (s = 0.3) is used where the formula is checked, so that a missing or misplaced
s would show up far above rounding error.
"""

from __future__ import annotations

import math

import pytest
import torch

from dito_fast.config import FlowConfig
from dito_fast.diffusion import flow

S = 0.3


class RecordingDecoder:
    """Fake decoder: records its inputs and returns a fixed tensor."""

    def __init__(self, out: torch.Tensor | None = None):
        self.out = out
        self.calls = []

    def __call__(self, x_t, t, z):
        self.calls.append((x_t.clone(), t.clone(), z.clone()))
        return self.out if self.out is not None else torch.zeros_like(x_t)


@pytest.fixture
def fixed_draws(monkeypatch):
    """Pin the times and the Gaussian noise that flow_matching_loss draws (no noise sync), so the
    test does not depend on the order of the random draws."""
    B, shape = 5, (5, 3, 7, 9)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1)
    e = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.13, 0.5, 0.87, 1.0], dtype=torch.float64)
    monkeypatch.setattr(flow, "sample_times", lambda batch, generator=None, device=None, low=None, cfg=None: t.clone())

    def fake_randn(*size, generator=None, device=None, dtype=None, **kw):
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        assert size == shape, "flow_matching_loss should draw one noise tensor of x's shape"
        return e.clone().to(dtype or torch.float32)

    class TorchWithFixedRandn:  # torch, as seen from the flow module only, with a fixed randn
        randn = staticmethod(fake_randn)

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(flow, "torch", TorchWithFixedRandn())
    return x, e, t


def _hand_xt_v(x, e, t, s):
    x_t = torch.empty_like(x)
    v = torch.empty_like(x)
    for i in range(x.shape[0]):
        ti = float(t[i])
        x_t[i] = (1 - ti) * x[i] + (s + ti * (1 - s)) * e[i]
        v[i] = (1 - s) * e[i] - x[i]
    return x_t, v


def _hand_mse(a, b):
    return torch.tensor([float(((a[i] - b[i]) ** 2).sum()) / a[i].numel() for i in range(a.shape[0])],
                        dtype=torch.float64)


@pytest.mark.parametrize("objective", ["velocity", "epsilon", "x0"])
def test_flow_matching_loss_matches_hand_formula(fixed_draws, objective):
    x, e, t = fixed_draws
    cfg = FlowConfig(sigma_min=S, objective=objective)
    g = torch.Generator().manual_seed(1)
    out = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dec = RecordingDecoder(out)
    z = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    loss, info = flow.flow_matching_loss(dec, x, z, cfg)

    x_t_hand, v_hand = _hand_xt_v(x, e, t, S)
    target = {"velocity": v_hand, "epsilon": e, "x0": x}[objective]
    (x_t_seen, t_seen, z_seen), = dec.calls
    assert torch.allclose(x_t_seen, x_t_hand, rtol=0, atol=1e-12)
    assert torch.equal(t_seen, t) and torch.equal(info["t"], t)
    assert torch.equal(z_seen, z)  # no noise sync: the latent reaches the decoder untouched
    assert not info["noise_sync_mask"].any()
    assert loss.shape == (5,)
    assert torch.allclose(loss.double(), _hand_mse(out, target), rtol=2e-6, atol=0)


@pytest.mark.parametrize("objective", ["velocity", "epsilon", "x0"])
def test_flow_matching_loss_zero_for_exact_prediction(fixed_draws, objective):
    x, e, t = fixed_draws
    cfg = FlowConfig(sigma_min=S, objective=objective)
    exact = {"velocity": (1 - S) * e - x, "epsilon": e, "x0": x}[objective]
    loss, _ = flow.flow_matching_loss(RecordingDecoder(exact), x, torch.zeros(5, 4, 1, 1), cfg)
    assert torch.all(loss < 1e-25)  # float64; fused kernels may round differently


def test_flow_matching_loss_real_draws_are_consistent():
    # with the real random draws: the noise implied by x_t is standard normal, t ~ U(0, 1), and
    # the loss is the MSE of the decoder output against (1 - s) e - x for that same e
    B = 256
    x = torch.full((B, 3, 4, 4), 0.8, dtype=torch.float64)
    dec = RecordingDecoder(torch.zeros(B, 3, 4, 4, dtype=torch.float64))
    cfg = FlowConfig(sigma_min=S)
    loss, info = flow.flow_matching_loss(dec, x, torch.zeros(B, 4, 1, 1), cfg,
                                         generator=torch.Generator().manual_seed(3))
    x_t, t, _ = dec.calls[0]
    assert t.min() >= 0 and t.max() <= 1 and abs(float(t.mean()) - 0.5) < 0.1
    tb = t.double().reshape(-1, 1, 1, 1)
    e = (x_t - (1 - tb) * x) / (S + tb * (1 - S))
    assert abs(float(e.mean())) < 0.05 and abs(float(e.std()) - 1) < 0.05
    assert torch.allclose(loss.double(), ((1 - S) * e - x).square().flatten(1).mean(1), rtol=1e-5)
    # the same generator seed gives the same draws
    dec2 = RecordingDecoder(torch.zeros(B, 3, 4, 4, dtype=torch.float64))
    loss2, _ = flow.flow_matching_loss(dec2, x, torch.zeros(B, 4, 1, 1), cfg,
                                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(loss, loss2) and torch.equal(dec2.calls[0][0], x_t)


def test_sigma():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(flow.sigma(t, S), torch.tensor([S, S + 0.5 * (1 - S), 1.0], dtype=torch.float64))


def test_training_target():
    x, e, v = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    assert flow.training_target(x, e, v, "velocity") is v
    assert flow.training_target(x, e, v, "epsilon") is e
    assert flow.training_target(x, e, v, "x0") is x
    with pytest.raises(ValueError, match="unknown flow objective 'score'"):
        flow.training_target(x, e, v, "score")


@pytest.mark.parametrize("objective", ["velocity", "epsilon", "x0"])
@pytest.mark.parametrize("s", [S, 1e-5])
def test_to_velocity_inverts_training_target(objective, s):
    # the network output that exactly equals the training target maps to the exact velocity
    g = torch.Generator().manual_seed(0)
    B = 64
    x = torch.rand(B, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    e = torch.randn(B, 3, 5, 5, generator=g, dtype=torch.float64)
    # away from t = 1 for epsilon (x0 = (x_t - sigma e) / (1 - t) is ill-conditioned there)
    t = torch.linspace(0.0, 0.99 if objective == "epsilon" else 1.0, B, dtype=torch.float64)
    cfg = FlowConfig(sigma_min=s, objective=objective)
    x_t, v = _hand_xt_v(x, e, t, s)
    out = flow.training_target(x, e, v, objective)
    assert torch.allclose(flow.to_velocity(out, x_t, t, cfg), v, rtol=0, atol=1e-9)


def test_to_velocity_unknown_objective():
    with pytest.raises(ValueError, match="unknown flow objective"):
        flow.to_velocity(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1), FlowConfig(objective="nope"))


def test_to_velocity_epsilon_is_finite_at_t1():
    cfg = FlowConfig(objective="epsilon")
    e = torch.randn(2, 3, 4, 4)
    v = flow.to_velocity(e, e.clone(), torch.ones(2), cfg)
    assert torch.isfinite(v).all()
    # t = 1: the exact epsilon says nothing of x0, taken as 0 (v = (1 - s) e)
    assert torch.allclose(v, (1 - cfg.sigma_min) * e)


def test_to_velocity_epsilon_exact_just_below_t1():
    # a floor of 1e-3 under 1 - t had scaled x0 by (1 - t) / 1e-3 for t in (0.999, 1): an exact
    # epsilon gave a velocity off by 0.45 at t = 0.9999 (grids of over 1000 steps evaluate there)
    g = torch.Generator().manual_seed(1)
    cfg = FlowConfig(objective="epsilon")
    x = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) - 0.5
    e = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.999, 0.9995, 0.9999, 0.99999], dtype=torch.float64)
    x_t, v = _hand_xt_v(x, e, t, cfg.sigma_min)
    assert torch.allclose(flow.to_velocity(e, x_t, t, cfg), v, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# noise synchronisation


def _binomial_ok(k: int, n: int, p: float, sds: float = 5.0) -> bool:
    return abs(k - n * p) <= sds * math.sqrt(n * p * (1 - p))


def test_noise_sync_statistics():
    B, p, tmax = 4000, 0.3, 0.6
    cfg = FlowConfig(sigma_min=S, noise_sync_prob=p, noise_sync_tmax=tmax)
    z = torch.randn(B, 2, 2, 2, generator=torch.Generator().manual_seed(0)) + 3.0
    z_out, t_low, mask = flow.noise_sync(z, cfg, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (B,) and t_low.shape == (B,)
    assert _binomial_ok(int(mask.sum()), B, p)
    # clean samples unchanged, noised samples changed
    assert torch.equal(z_out[~mask], z[~mask])
    assert ((z_out[mask] - z[mask]).flatten(1).abs().amax(1) > 0).all()
    # "above": the lower time bound is tz in [0, tmax) for noised samples, 0 for clean ones
    assert torch.all(t_low[~mask] == 0)
    tz = t_low[mask]
    assert tz.min() >= 0 and tz.max() < tmax
    assert abs(float(tz.mean()) - tmax / 2) < 0.02  # tz ~ U(0, tmax)
    assert tz.max() > 0.9 * tmax
    # z_tz = (1 - tz) z + (s + tz (1 - s)) e_z with e_z ~ N(0, 1): recover e_z and check it
    tzb = tz.reshape(-1, 1, 1, 1)
    e_z = (z_out[mask] - (1 - tzb) * z[mask]) / (S + tzb * (1 - S))
    assert abs(float(e_z.mean())) < 0.05 and abs(float(e_z.std()) - 1) < 0.05


def test_noise_sync_independent_rule():
    cfg = FlowConfig(noise_sync_prob=0.5, noise_sync_time_rule="independent")
    z = torch.randn(500, 4, 2, 2)
    z_out, t_low, mask = flow.noise_sync(z, cfg, torch.Generator().manual_seed(0))
    assert mask.any() and not torch.equal(z_out, z)
    assert torch.all(t_low == 0)


def test_noise_sync_prob_zero_and_one():
    z = torch.randn(64, 4, 2, 2)
    z_out, t_low, mask = flow.noise_sync(z, FlowConfig(noise_sync_prob=0.0))
    assert torch.equal(z_out, z) and not mask.any() and torch.all(t_low == 0)
    z_out, t_low, mask = flow.noise_sync(z, FlowConfig(noise_sync_prob=1.0), torch.Generator().manual_seed(0))
    assert mask.all() and (t_low > 0).all()


@pytest.mark.parametrize("rule", ["above", "independent"])
def test_flow_matching_loss_noise_sync(monkeypatch, rule):
    # spy on noise_sync to learn each sample's tz, then check what the decoder saw
    B, p, tmax = 2000, 0.3, 0.5
    cfg = FlowConfig(sigma_min=S, noise_sync_prob=p, noise_sync_tmax=tmax, noise_sync_time_rule=rule)
    seen = {}
    real = flow.noise_sync

    def spy(z, c, generator=None):
        out = real(z, c, generator)
        seen["out"] = out
        return out

    monkeypatch.setattr(flow, "noise_sync", spy)
    x = torch.rand(B, 3, 2, 2) * 2 - 1
    z = torch.randn(B, 4, 1, 1)
    dec = RecordingDecoder()
    _, info = flow.flow_matching_loss(dec, x, z, cfg, torch.Generator().manual_seed(5))
    z_noised, t_low, mask = seen["out"]
    _, t_dec, z_dec = dec.calls[0]
    assert torch.equal(info["noise_sync_mask"], mask) and torch.equal(info["t"], t_dec)
    assert _binomial_ok(int(mask.sum()), B, p)
    assert torch.equal(z_dec, z_noised)  # the decoder is conditioned on the noised latent
    assert torch.equal(z_dec[~mask], z[~mask]) and not torch.equal(z_dec[mask], z[mask])
    assert t_dec.min() >= 0 and t_dec.max() <= 1
    if rule == "above":
        # never a decoder time below the latent's noise level; t ~ U(tz, 1)
        assert torch.all(t_low[mask] > 0) and torch.all(t_low[mask] < tmax)
        assert torch.all(t_dec >= t_low)
        u = (t_dec[mask] - t_low[mask]) / (1 - t_low[mask])
        assert abs(float(u.mean()) - 0.5) < 0.05 and abs(float(u.var()) - 1 / 12) < 0.015
        # clean samples: t ~ U(0, 1)
        assert abs(float(t_dec[~mask].mean()) - 0.5) < 0.05
    else:
        assert torch.all(t_low == 0)
        assert t_dec[mask].min() < 0.05  # noised samples can get a decoder time below their tz


def test_noise_sync_refuses_an_unknown_time_rule():
    """A FlowConfig passed straight to the flow functions (no DiTo to validate it): a typo in the
    rule is an error, not a silent switch to independent times."""
    cfg = FlowConfig(noise_sync_prob=1.0, noise_sync_time_rule="abve")
    with pytest.raises(ValueError, match="unknown flow.noise_sync_time_rule 'abve'"):
        flow.noise_sync(torch.randn(2, 4, 4, 4), cfg, torch.Generator().manual_seed(0))
