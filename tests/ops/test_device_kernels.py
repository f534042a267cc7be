"""The ``cpp`` backend on each device it has kernels for: the C++ CPU kernels and, where there is a
GPU and the extension was built with CUDA, the CUDA kernels (csrc/ops/*/*_cuda.cu), against the
float64 reference computed on the CPU.

The per-op files (test_fm.py, test_latent_layernorm.py, test_group_norm_modulate_silu.py) test
the CPU kernels in depth; this file runs one compact set of cases through one harness on every
device, so that a GPU machine has the CUDA kernels' outputs and gradients checked (dtypes, odd
shapes, both layouts, the vectorised and chunked launch plans, groups far from zero, gradcheck,
opcheck; the model with ref vs cpp ops: tests/models/test_backends.py). The "cpu" cases run everywhere and keep the harness
itself tested; the "cuda" cases skip, with the reason, on machines without a GPU (DESIGN.md §4).
"""

from __future__ import annotations

import pytest
import torch

from dito_fast.ops import (fm_loss, fm_loss_ref, fm_noise, fm_noise_ref, group_norm_modulate_silu,
                           group_norm_modulate_silu_ref, latent_layernorm, latent_layernorm_ref)

from backend_cases import assert_close_to_ref
from conftest import CPP_DEVICES


DEVICES = CPP_DEVICES
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(fn, inputs):
    """fn(*leaves) -> a tensor or a tuple of tensors; returns (outputs, gradients of every input
    that is not None) under fixed random upstream gradients, detached."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * _randn(*o.shape, seed=100 + i).to(device=o.device, dtype=o.dtype)).sum()
                for i, o in enumerate(outs))
    total.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves if t is not None]


def _on(t: torch.Tensor | None, device: str, dtype: torch.dtype | None = None):
    """t on ``device`` (in ``dtype``), channels_last kept: what the test means by "the same input"."""
    if t is None:
        return None
    moved = t.to(device=device, dtype=dtype or t.dtype)
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        moved = moved.contiguous(memory_format=torch.channels_last)
    return moved


def _check(fn, ref, inputs, device, dtype, names, ref_kw_same=None):
    """fn(*inputs) on ``device`` in ``dtype`` against ref in float64 on the CPU, under the
    tolerance rule; torch's own error in ``dtype`` is ref run in that dtype on ``device`` with
    ``ref_kw_same``. Returns fn's outputs and gradients."""
    on = [_on(t, device, dtype) for t in inputs]
    outs, grads = _grads(fn, on)
    outs64, grads64 = _grads(ref, [_on(t, "cpu", torch.float64) for t in on])
    outs_t, grads_t = _grads(lambda *a: ref(*a, **(ref_kw_same or {})), on)
    for name, a, r, s in zip(names, outs + grads, outs64 + grads64, outs_t + grads_t, strict=True):
        assert a.device.type == device and a.dtype == s.dtype, name
        assert_close_to_ref(a.cpu(), r, dtype, s.cpu(), f"{name} on {device}")
    return outs, grads


# ---- group_norm_modulate_silu ---------------------------------------------------------------------
GNMS_SHAPES = [  # (B, C, H, W, groups)
    (3, 36, 23, 19, 6),   # odd sizes
    (1, 32, 8, 8, 8),     # batch 1
    (2, 37, 5, 7, 37),    # one channel per group, no vector loads
    (4, 64, 1, 1, 32),    # 1x1 planes
    (2, 64, 16, 16, 32),  # planes and channels that take vector loads
    (1, 16, 128, 96, 2),  # large groups: the chunked statistics plan of the GPU kernels
]
GNMS_NAMES = ["y", "grad x", "grad weight", "grad bias", "grad scale", "grad shift"]


def _gnms_inputs(B, C, H, W, layout, seed=0):
    x = _randn(B, C, H, W, seed=seed) * 1.7 + 0.6
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return [x, _randn(C, seed=seed + 1) * 0.5 + 1, _randn(C, seed=seed + 2) * 0.3,
            _randn(B, C, seed=seed + 3) * 0.4, _randn(B, C, seed=seed + 4) * 0.4]


def _gnms(G, silu=True, **kw):
    return lambda x, w, b, s, sh: group_norm_modulate_silu(x, G, w, b, s, sh, eps=1e-5, silu=silu, **kw)


def _gnms_ref(G, silu=True):
    return lambda x, w, b, s, sh, upcast=True: group_norm_modulate_silu_ref(x, G, w, b, s, sh, eps=1e-5, silu=silu,
                                                                           upcast=upcast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", GNMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_modulate_silu(device, dtype, layout, shape):
    B, C, H, W, G = shape
    outs, grads = _check(_gnms(G, backend="cpp"), _gnms_ref(G), _gnms_inputs(B, C, H, W, layout), device, dtype,
                         GNMS_NAMES, {"upcast": False})
    if layout == "channels_last" and H * W > 1 and C > 1:
        assert outs[0].is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no_silu"])
def test_group_norm_modulate_silu_without_parameters(device, silu):
    x = _randn(2, 12, 6, 5, seed=3)
    fn = lambda x_: group_norm_modulate_silu(x_, 3, eps=1e-5, silu=silu, backend="cpp")  # noqa: E731
    ref = lambda x_, upcast=True: group_norm_modulate_silu_ref(x_, 3, eps=1e-5, silu=silu, upcast=upcast)  # noqa: E731
    _check(fn, ref, [x], device, torch.float32, ["y", "grad x"], {"upcast": False})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["offset", "constant", "mixed"])
def test_group_norm_modulate_silu_far_from_zero(device, layout, case):
    """Groups with |mean| >> std (300 + 0.01 n), constant groups (rstd = 1/sqrt(eps)) and one
    such group among ordinary ones, in float32: the kernels normalise them in shifted coordinates;
    folded around zero, two terms of size |mean| rstd cancel beyond PyTorch's own error."""
    B, C, H, W, G = 2, 8, 6, 5, 4
    for seed in range(4):
        x, *p = _gnms_inputs(B, C, H, W, "nchw", seed=seed)
        far = {"offset": 300 + 0.01 * _randn(B, C, H, W, seed=50 + seed), "constant": torch.full_like(x, -40.0),
               "mixed": x.clone()}[case]
        if case == "mixed":
            far[:, :2] = 7.3  # group 0 constant
        if layout == "channels_last":
            far = far.contiguous(memory_format=torch.channels_last)
        _check(_gnms(G, backend="cpp"), _gnms_ref(G), [far, *p], device, torch.float32, GNMS_NAMES, {"upcast": False})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_modulate_silu_gradcheck(device, layout):
    leaves = [_on(t, device).requires_grad_() for t in _gnms_inputs(2, 6, 3, 5, layout, seed=7)]
    assert torch.autograd.gradcheck(_gnms(3, backend="cpp"), leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 8, 6, 5, 4), (1, 16, 128, 96, 2)], ids=["fused", "chunked"])
def test_group_norm_modulate_silu_squares_overflow(device, layout, shape):
    """Finite float32 values of ~1e20, whose squares overflow float32, are normalised as in float64
    (the op is scale-invariant: against the reference on x * 1e-20 with eps scaled alike); float
    sums had made rstd 0 and the output silently silu(beta). A group holding an inf stays
    non-finite, alone."""
    B, C, H, W, G = shape
    x, *p = _gnms_inputs(B, C, H, W, layout, seed=11)
    xf = _on(x * 1e20, device, torch.float32)
    outs, grads = _grads(_gnms(G, backend="cpp"), [xf, *(_on(t, device, torch.float32) for t in p)])
    outs64, grads64 = _grads(lambda *a: group_norm_modulate_silu_ref(*a[:1], G, *a[1:], eps=1e-45),
                             [_on(xf, "cpu", torch.float64) * 1e-20, *(t.float().double() for t in p)])
    grads[0] = grads[0] * 1e20  # dx scales as 1/x
    for name, a, r in zip(GNMS_NAMES, outs + grads, outs64 + grads64, strict=True):
        assert_close_to_ref(a.cpu(), r, torch.float32, what=f"{name} on {device}")
    xf[B - 1, C // G, 0, 0] = float("inf")  # the last sample's group 1
    y = group_norm_modulate_silu(xf, G, *(_on(t, device, torch.float32) for t in p), backend="cpp").cpu()
    assert not y[B - 1, C // G:2 * C // G].isfinite().any()
    assert y[:B - 1].isfinite().all() and y[B - 1, :C // G].isfinite().all() and y[B - 1, 2 * C // G:].isfinite().all()


# ---- latent_layernorm -----------------------------------------------------------------------------
LATENT_SHAPES = [(3, 4, 23, 19), (1, 4, 8, 8), (2, 37, 5, 7), (5, 8, 1, 1), (2, 16, 64, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_latent_layernorm(device, dtype, layout, shape):
    z = _randn(*shape, seed=0) * 3 + 1
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    _check(lambda a: latent_layernorm(a, 1e-5, backend="cpp"), lambda a: latent_layernorm_ref(a, 1e-5), [z], device,
           dtype, ["y", "grad z"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (2, 16, 64, 64)], ids=["small", "chunked"])
def test_latent_layernorm_squares_overflow(device, layout, shape):
    """Finite float32 latents of ~1e20 (squares overflow float32) are normalised as in float64;
    a sample holding an inf stays non-finite, alone."""
    z = _randn(*shape, seed=12) + 0.5
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    zf = _on(z * 1e20, device, torch.float32)
    (y,), (gz,) = _grads(lambda a: latent_layernorm(a, 1e-5, backend="cpp"), [zf])
    (y64,), (gz64,) = _grads(lambda a: latent_layernorm_ref(a, 1e-45), [_on(zf, "cpu", torch.float64) * 1e-20])
    assert_close_to_ref(y.cpu(), y64, torch.float32, what=f"y on {device}")
    assert_close_to_ref(gz.cpu() * 1e20, gz64, torch.float32, what=f"grad z on {device}")
    zf[1, 0, 0, 0] = float("inf")
    y = latent_layernorm(zf, backend="cpp").cpu()
    assert not y[1].isfinite().any() and y[0].isfinite().all() and y[2:].isfinite().all()


# ---- fm_noise, fm_loss ----------------------------------------------------------------------------
FM_SHAPES = [(3, 3, 23, 19), (1, 3, 8, 8), (2, 4, 1, 1), (4, 70000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", FM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fm_noise_and_loss(device, dtype, shape):
    x, e, p = (_randn(*shape, seed=s) for s in (0, 1, 2))
    t = torch.rand(shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _check(lambda *a: fm_noise(*a, 1e-3, backend="cpp"), lambda *a: fm_noise_ref(*a, 1e-3), [x, e, t], device, dtype,
           ["x_t", "v", "grad x", "grad noise", "grad t"])
    # the loss accumulates in float32 (float64 for float64 inputs) whatever the input dtype
    loss_same = lambda a, b: (a - b).square().flatten(1).mean(1)  # noqa: E731  torch in the input dtype
    on = [_on(a, device, dtype) for a in (p, x)]
    (loss,), grads = _grads(lambda a, b: fm_loss(a, b, backend="cpp"), on)
    (loss64,), grads64 = _grads(fm_loss_ref, [a.double().cpu() for a in on])
    _, grads_t = _grads(loss_same, on)
    assert loss.device.type == device and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_ref(loss.cpu(), loss64, loss.dtype)
    for name, a, r, s in zip(["grad pred", "grad target"], grads, grads64, grads_t, strict=True):
        assert_close_to_ref(a.cpu(), r, dtype, s.cpu(), f"{name} on {device}")


@pytest.mark.parametrize("device", DEVICES)
def test_fm_gradcheck(device):
    x, e, p = (_on(_randn(2, 3, 4, 5, seed=s), device).requires_grad_() for s in (0, 1, 2))
    t = _on(torch.rand(2, generator=torch.Generator().manual_seed(3), dtype=torch.float64), device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: fm_noise(a, b, c, 0.01, backend="cpp"), (x, e, t))
    assert torch.autograd.gradcheck(lambda a, b: fm_loss(a, b, backend="cpp"), (p, e))


# ---- registration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schemas, fake kernels and autograd registrations agree with the kernels on this device."""
    ops = torch.ops.dito_fast
    x, w, b, s, sh = (_on(t, device, torch.float32) for t in _gnms_inputs(2, 8, 5, 3, "nchw"))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    grad = lambda *ts: tuple(t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t  # noqa: E731
                             for t in ts)
    for args in [(x, 4, w, b, s, sh, 1e-5, True), (x_cl, 4, None, None, s, None, 1e-5, False)]:
        torch.library.opcheck(ops.group_norm_modulate_silu, grad(*args))
    y, mean, rstd = ops.group_norm_modulate_silu(x, 4, w, b, s, sh, 1e-5, True)
    torch.library.opcheck(ops.group_norm_modulate_silu_backward, (torch.randn_like(y), x, mean, rstd, 4, w, b, s, sh,
                                                                  True))
    torch.library.opcheck(ops.latent_layernorm, grad(x, 1e-5))
    z, r = ops.latent_layernorm(x, 1e-5)
    torch.library.opcheck(ops.latent_layernorm_backward, (torch.randn_like(z), z, r))
    t = torch.rand(2, device=device)
    torch.library.opcheck(ops.fm_noise, grad(x, torch.randn_like(x), t, 1e-5))
    torch.library.opcheck(ops.fm_loss, grad(x, torch.randn_like(x)))
