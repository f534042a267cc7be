"""Attention over (B, heads, N, D) tensors; torch's scaled_dot_product_attention is the default."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import Backend, always_supported, dispatch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(D)) v in the inputs' dtype. q, k, v: (B, heads, N, D)."""
    w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


_BACKENDS = [Backend("sdpa", _sdpa, always_supported), Backend("ref", attention_ref, always_supported)]


def attention(q, k, v, backend: str | None = None) -> torch.Tensor:
    """Non-causal attention, (B, heads, N, D) -> (B, heads, N, D)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q, k, v of shape (B, heads, N, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return dispatch("attention", _BACKENDS, backend, q, k, v)
