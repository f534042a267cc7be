"""attention: the sdpa and ref backends against the float64 reference (outputs and gradients,
per-dtype tolerances, odd and strided shapes), forward-mode AD and torch.func, torch.compile.
The Triton backend runs in the interpreter process (tests/kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend_cases import assert_close_to_ref
from dito_fast import ops
from dito_fast.ops import attention_ref

BACKENDS = ("sdpa", "ref")


def _qkv(B, H, N, M, D, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * scale
    k = torch.randn(B, H, M, D, generator=g) * scale
    v = torch.randn(B, H, M, D, generator=g)
    return [t.to(dtype) for t in (q, k, v)]


def _grads(fn, q, k, v, go):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), go.to(out.dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 17, 23, 8), (1, 1, 5, 5, 16), (3, 2, 64, 40, 32)])
def test_outputs_and_gradients_against_float64(backend, dtype, shape):
    q, k, v = _qkv(*shape, scale=2.0)
    go = torch.randn(*shape[:3], shape[4], generator=torch.Generator().manual_seed(1))
    ref = _grads(lambda *a: attention_ref(*a), *(t.double() for t in (q, k, v)), go.double())
    ours = _grads(lambda *a: ops.attention(*a, backend=backend), *(t.to(dtype) for t in (q, k, v)), go)
    # PyTorch's own same-dtype computation: the reference without upcasting
    theirs = _grads(lambda *a: attention_ref(*a, upcast=False), *(t.to(dtype) for t in (q, k, v)), go)
    for what, a, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, theirs):
        assert a.dtype == dtype, what
        assert_close_to_ref(a, r, dtype, t, what=f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # (B, N, heads, D) storage viewed as (B, heads, N, D); k, v expanded over the batch
    q = torch.randn(2, 19, 3, 8).transpose(1, 2)
    k = torch.randn(1, 3, 11, 8).expand(2, -1, -1, -1)
    v = torch.randn(2, 3, 8, 11).transpose(-1, -2)  # last dim not unit-stride
    out = ops.attention(q, k, v, backend=backend)
    assert_close_to_ref(out, attention_ref(q.double(), k.double(), v.double()), torch.float32)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_forward_mode_ad_and_func_transforms(backend):
    # torch's fused CPU SDPA kernel has no forward-mode formula: a jvp through the default
    # backend had raised NotImplementedError
    q, k, v = _qkv(2, 2, 9, 7, 8, dtype=torch.float64)
    tq, tk, tv = _qkv(2, 2, 9, 7, 8, dtype=torch.float64, seed=3)
    fn = lambda *a: ops.attention(*a, backend=backend)  # noqa: E731
    out, tangent = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))
    eps = 1e-6
    numeric = (attention_ref(q + eps * tq, k + eps * tk, v + eps * tv)
               - attention_ref(q - eps * tq, k - eps * tk, v - eps * tv)) / (2 * eps)
    torch.testing.assert_close(out, attention_ref(q, k, v))
    torch.testing.assert_close(tangent, numeric, rtol=1e-6, atol=1e-8)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(q, tq)
        t2 = torch.autograd.forward_ad.unpack_dual(fn(dual, k, v)).tangent
    assert t2 is not None and t2.shape == q.shape
    batched = torch.func.vmap(fn)(q[None].expand(3, -1, -1, -1, -1), k[None].expand(3, -1, -1, -1, -1),
                                  v[None].expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(batched, attention_ref(q, k, v)[None].expand(3, -1, -1, -1, -1))


def test_compile_fullgraph_through_the_dispatcher():
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 2, 12, 12, 16))
    fn = torch.compile(lambda *a: ops.attention(*a) * 2, fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    torch.testing.assert_close(out, 2 * F.scaled_dot_product_attention(q, k, v))
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
