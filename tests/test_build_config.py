"""setup.py's build switches, read without building: ``python setup.py --name`` runs the
extension configuration (which prints why CUDA kernels are skipped) and stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _setup(use_cuda: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DITO_FAST_USE_CUDA": use_cuda}
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false", "No"])
def test_cuda_off_spellings(value):
    out = _setup(value)
    assert out.returncode == 0, out.stderr
    assert f"CUDA kernels skipped: DITO_FAST_USE_CUDA={value}" in out.stderr


def test_cuda_unknown_value_is_an_error():
    out = _setup("sometimes")
    assert out.returncode != 0
    assert "DITO_FAST_USE_CUDA='sometimes': expected auto, 1/on/true/yes or 0/off/false/no" in out.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch's message")
@pytest.mark.parametrize("value", ["1", "ON", "yes"])
def test_cuda_on_without_cuda_torch_fails_with_the_reason(value):
    out = _setup(value)
    assert out.returncode != 0
    assert "CUDA kernels skipped: this torch build has no CUDA" in out.stderr
    assert "DITO_FAST_USE_CUDA asks for CUDA kernels, but they cannot be built" in out.stderr
