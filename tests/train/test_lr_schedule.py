"""Learning-rate schedule: warm-up, constant, cosine decay to lr_min_ratio."""

import math

import pytest

from dito_fast.config import TrainConfig
from dito_fast.train.trainer import lr_factor


def test_warmup_then_constant():
    t = TrainConfig(steps=100, warmup_steps=10)
    assert [lr_factor(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert all(lr_factor(s, t) == 1.0 for s in range(10, 200))


def test_cosine_decay_shape():
    t = TrainConfig(steps=110, warmup_steps=10, lr_decay="cosine", lr_min_ratio=0.1)
    assert lr_factor(10, t) == pytest.approx(1.0)
    assert lr_factor(60, t) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_factor(110, t) == pytest.approx(0.1) and lr_factor(500, t) == pytest.approx(0.1)
    values = [lr_factor(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone non-increasing
    assert lr_factor(35, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_unknown_decay_rejected():
    from dito_fast.config import RunConfig, apply_overrides, validate_run_config

    cfg = apply_overrides(RunConfig(), {"train.lr_decay": "linear"})
    with pytest.raises(ValueError, match="lr_decay"):
        validate_run_config(cfg)
