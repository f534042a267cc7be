"""Attention over (B, heads, N, D) tensors.

Backends in priority order: ``sdpa`` (torch's scaled_dot_product_attention, the default
everywhere; under torch.func transforms and forward-mode AD it runs SDPA's math kernel, the one
with forward-mode formulas), ``xformers`` (memory-efficient attention; only when xformers is
installed, imports and the tensors are on CUDA), ``triton`` (our flash-attention
forward/backward; CUDA, or CPU under TRITON_INTERPRET=1; self-attention shapes only: k and v of
q's shape, head dims 16/32/64/128, batch x heads <= 65535, float32/float16/bfloat16) and ``ref``
(the specification). Pick one with ``backend=`` or DITO_FAST_BACKEND (e.g. ``attention=triton``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _triton
from ._dispatch import Backend, always_supported, autograd_mode_reasons, check_dtype, dispatch


def _check(q, k, v):
    """q: (B, heads, N, D); k, v: (B, heads, M, D); one supported float dtype and one device."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(a).__name__}")
        check_dtype("attention", name, a)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] \
            or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q of shape (B, heads, N, D) and k, v of shape (B, heads, M, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(D)) v. q: (B, heads, N, D); k, v: (B, heads, M, D); returns
    (B, heads, N, D) in the inputs' dtype, computed in float32 for float16/bfloat16 inputs when
    ``upcast`` (else in their dtype)."""
    _check(q, k, v)
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ v).to(dtype)


def _sdpa(q, k, v):
    if autograd_mode_reasons():
        # torch.func transforms or forward-mode AD: SDPA's fused CPU (flash) kernel has no
        # forward-mode formula (a jvp raised); its math kernel has, and batching rules.
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


_XFORMERS: dict = {}


def _xformers_reasons(q, k, v) -> list[str]:
    if q.device.type != "cuda":
        return ["xformers runs on CUDA tensors only"]
    if q.dtype == torch.float64:
        return ["xformers has no float64 kernels"]
    if "ops" not in _XFORMERS:
        try:
            import xformers.ops as xops  # optional; its compiled part must match this torch

            _XFORMERS["ops"] = xops
        except Exception as exc:  # ImportError, or a binary built for another torch
            _XFORMERS["ops"] = None
            _XFORMERS["error"] = f"{type(exc).__name__}: {exc}"
    if _XFORMERS["ops"] is None:
        return [f"xformers is not usable ({_XFORMERS['error']})"]
    return []


def _xformers(q, k, v):
    # xformers takes (B, N, heads, D).
    out = _XFORMERS["ops"].memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_BACKENDS = [
    Backend("sdpa", _sdpa, always_supported),
    Backend("xformers", _xformers, _xformers_reasons),
    _triton.backend("attention", "attention"),
    Backend("ref", attention_ref, always_supported),
]


def attention(q, k, v, backend: str | None = None) -> torch.Tensor:
    """Non-causal attention: q (B, heads, N, D), k and v (B, heads, M, D) -> (B, heads, N, D)."""
    _check(q, k, v)
    return dispatch("attention", _BACKENDS, backend, q, k, v)
