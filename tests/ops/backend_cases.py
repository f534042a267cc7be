"""Shared helpers for the per-op backend tests: which backends can run here, the per-dtype
tolerance rule, and comparison against the float64 reference (DESIGN.md §4)."""

from __future__ import annotations

import torch

from dito_fast.ops import _cpp

# Backends compared against the reference in this process (Triton runs in its own interpreter
# process: tests/kernels). `cpp` is skipped with a reason when the extension is not built.
CPP_REASON = "" if _cpp.AVAILABLE else f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}"

# fp32/fp64: absolute/relative tolerance against the float64 reference, or (for ill-conditioned
# cases such as a 2-value group) within FACTOR x the error of PyTorch's own same-dtype computation.
# fp16/bf16: within FACTOR x PyTorch's same-dtype error (+ a small slack for values near 0).
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}
FACTOR = 2.0


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                        torch_same_dtype: torch.Tensor | None = None, what: str = "output") -> None:
    """out (any dtype) vs the float64 reference under the tolerance rule for ``dtype``."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if dtype in TOL:
        atol, rtol = TOL[dtype]
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        err = max_err(out, ref64)
        theirs = max_err(torch_same_dtype, ref64) if torch_same_dtype is not None else 0.0
        assert err <= max(atol + rtol * scale, FACTOR * theirs), (
            f"{what} ({dtype}): max error {err:.3g} (scale {scale:.3g}, torch's own {theirs:.3g})")
    else:
        assert torch_same_dtype is not None
        ours, theirs = max_err(out, ref64), max_err(torch_same_dtype, ref64)
        slack = 1e-3 * max(1.0, ref64.abs().max().item())
        assert ours <= FACTOR * theirs + slack, f"{what} ({dtype}): error {ours:.3g} vs torch's {theirs:.3g}"
