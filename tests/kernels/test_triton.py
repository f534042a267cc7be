"""Triton backend (dito_fast/kernels/triton): numerical checks, compile checks, capability checks.

Triton reads TRITON_INTERPRET once, when it is imported, and this process may already have
imported it without the variable; so the kernel checks run in subprocesses:
- triton_interpret_cases.py with TRITON_INTERPRET=1: every op against the float64 references of
  dito_fast/ops, outputs and gradients, float32/float16, odd shapes, channels_last;
- triton_compile_cases.py without it: torch.compile(fullgraph=True) tracing of forward and
  backward, and every launched kernel compiled to an sm_90 cubin (no GPU needed);
- on a CUDA machine, triton_interpret_cases.py again on the GPU (bfloat16 too, opcheck, inductor).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _run_cases(case_file: str, **env_updates) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DITO_FAST_TRITON_TEST_DEVICE")}
    env.update(env_updates)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / case_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{case_file} failed (exit {proc.returncode}):\n{out[-6000:]}"
    assert " passed" in out
    return out


@needs_triton
def test_kernels_match_references_under_interpreter():
    _run_cases("triton_interpret_cases.py", TRITON_INTERPRET="1")


@needs_triton
def test_kernels_trace_with_torch_compile_and_compile_for_sm90():
    _run_cases("triton_compile_cases.py")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_cuda():
    _run_cases("triton_interpret_cases.py", DITO_FAST_TRITON_TEST_DEVICE="cuda")


def test_modules_import_and_explain_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from dito_fast.kernels.triton import attention, fm, group_norm_modulate_silu, latent_layernorm
x = torch.zeros(2, 4, 3, 3)
t = torch.zeros(2)
assert fm.fm_noise_unsupported_reasons(x, x, t) == ["triton is not installed"]
assert fm.fm_loss_unsupported_reasons(x, x) == ["triton is not installed"]
assert fm.unsupported_reasons(x, x) == ["triton is not installed"]
assert latent_layernorm.unsupported_reasons(x) == ["triton is not installed"]
assert group_norm_modulate_silu.unsupported_reasons(x, 2) == ["triton is not installed"]
assert attention.unsupported_reasons(x, x, x) == ["triton is not installed"]
for f, args in ((fm.fm_noise, (x, x, t)), (fm.fm_loss, (x, x)), (latent_layernorm.latent_layernorm, (x,)),
                (group_norm_modulate_silu.group_norm_modulate_silu, (x, 2)), (attention.attention, (x, x, x))):
    try:
        f(*args)
    except RuntimeError as e:
        assert "triton is not installed" in str(e)
    else:
        raise AssertionError(f"{f.__name__} ran without triton")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@needs_triton
def test_unsupported_reasons_without_interpreter(monkeypatch):
    """In this process kernels cannot run on CPU tensors; the reasons say why instead of crashing."""
    from dito_fast.kernels.triton import attention, fm, group_norm_modulate_silu, latent_layernorm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 4, 3, 3)
    reasons = latent_layernorm.unsupported_reasons(x)
    assert reasons and all("TRITON_INTERPRET" in r for r in reasons)
    assert any("not cuda" in r for r in fm.fm_noise_unsupported_reasons(x, x, torch.zeros(2)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set after the kernels were defined: still compiled kernels
    assert any("set before" in r for r in latent_layernorm.unsupported_reasons(x))
    import dito_fast.kernels.triton as kt

    monkeypatch.setattr(kt, "_INTERPRET", True)  # as if set before the import
    assert latent_layernorm.unsupported_reasons(x) == []
    assert any("float64" in r for r in fm.fm_loss_unsupported_reasons(x.double(), x.double()))
    assert any("same shape" in r for r in fm.fm_loss_unsupported_reasons(x, x[:, :2]))
    assert any("(B, C, H, W)" in r for r in latent_layernorm.unsupported_reasons(x[0]))
    assert any("(B, C, H, W)" in r for r in group_norm_modulate_silu.unsupported_reasons(x[0], 2))
    assert any("weight must have shape" in r
               for r in group_norm_modulate_silu.unsupported_reasons(x, 2, torch.zeros(3)))
    q = torch.zeros(1, 2, 5, 16)
    assert attention.unsupported_reasons(q, q, q) == []
    assert any("share the shape" in r for r in attention.unsupported_reasons(q, q[:, :1], q))
    assert any("share a dtype" in r for r in attention.unsupported_reasons(q, q.half(), q))
    assert any("head dim 512" in r for r in attention.unsupported_reasons(*(torch.zeros(1, 1, 4, 512),) * 3))
    assert any("bfloat16 tl.dot" in r for r in attention.unsupported_reasons(q.bfloat16(), q.bfloat16(), q.bfloat16()))
