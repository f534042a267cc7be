"""Triton kernels against the float64 references of dito_fast/ops: outputs and gradients.

Not collected by the normal test run (the name does not match test_*.py): tests/kernels/test_triton.py
runs this file in a subprocess with TRITON_INTERPRET=1 (CPU tensors through triton's interpreter),
or, on a CUDA machine, with DITO_FAST_TRITON_TEST_DEVICE=cuda (real kernels, plus opcheck and
torch.compile with inductor).

Tolerances: float32 results must match the float64 reference to a few dozen float32 ulps of the
result's scale (or K times PyTorch's own float32 error, for ill-conditioned inputs); float16
results must be within K times the error of PyTorch's own float16 computation (the reference run
on the same float16 inputs, contiguous), with a floor of one float16 ulp at the result's scale for
cases where PyTorch's error happens to be tiny. Shapes are small: the interpreter costs
milliseconds per program instance.
"""

import os

if os.environ.get("DITO_FAST_TRITON_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch

from dito_fast import ops
from dito_fast.kernels.triton import attention as tri_attn
from dito_fast.kernels.triton import fm as tri_fm
from dito_fast.kernels.triton import group_norm_modulate_silu as tri_gn
from dito_fast.kernels.triton import latent_layernorm as tri_ln

DEVICE = os.environ.get("DITO_FAST_TRITON_TEST_DEVICE", "cpu")
CUDA = DEVICE == "cuda"
K = 4.0  # allowed multiple of PyTorch's own float16 error
F32_ULPS = 64  # allowed float32 error, in float32 ulps of the result's scale (sums of ~1e3 terms)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

if CUDA:
    assert torch.cuda.is_available(), "DITO_FAST_TRITON_TEST_DEVICE=cuda without a GPU"
else:
    assert os.environ.get("TRITON_INTERPRET") == "1"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed, scale=1.0, offset=0.0):
    """Values rounded to ``dtype`` (CPU); the float64 reference sees the same rounded values."""
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale + offset).to(dtype)


def _leaf(t, device=DEVICE, memory_format=torch.contiguous_format):
    return t.to(device).contiguous(memory_format=memory_format).detach().requires_grad_(True)


def _check(name, got, ref64, base=None):
    """got: kernel result; ref64: float64 reference; base: PyTorch's own same-dtype result."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    got64 = got.detach().cpu().double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values"
    err = (got64 - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1e-30)
    base_err = (base.detach().cpu().double() - ref64).abs().max().item() if base is not None else 0.0
    if got.dtype == torch.float32:
        # float32: a few dozen ulps of the result's scale, or K x PyTorch's own float32 error where
        # the problem is ill-conditioned (e.g. mean >> std in a normalisation)
        tol = max(F32_ULPS * torch.finfo(torch.float32).eps * scale, K * base_err)
        assert err <= tol, f"{name}: float32 error {err:.3g} > {tol:.3g} (PyTorch's: {base_err:.3g})"
    else:
        assert base is not None
        tol = K * base_err + torch.finfo(got.dtype).eps * scale
        assert err <= tol, f"{name}: {got.dtype} error {err:.3g} > {K} x PyTorch's {base_err:.3g} + 1 ulp"


def _run(fn, inputs, grads_out, device):
    """Outputs of fn(*inputs) and d(sum out_i * g_i)/d(tensor inputs that require grad)."""
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.to(torch.float64) * g.to(device)).sum() for o, g in zip(outs, grads_out) if g is not None)
    grads = torch.autograd.grad(loss, leaves)
    return outs, grads


def _compare(name, kernel_fn, ref_fn, raw_inputs, grads_out, dtype, memory_format=torch.contiguous_format,
             ref_kwargs=None, requires_grad=None):
    """Run kernel_fn on DEVICE and ref_fn in float64 and in ``dtype`` on CPU; check outputs and grads.

    raw_inputs: CPU tensors (already rounded to their storage dtype) or other arguments;
    requires_grad: per input, whether to differentiate (default: every floating tensor).
    """
    ref_kwargs = ref_kwargs or {}
    if requires_grad is None:
        requires_grad = [isinstance(a, torch.Tensor) and a.is_floating_point() for a in raw_inputs]

    def prep(device, to64, layout=memory_format):
        out = []
        for a, rg in zip(raw_inputs, requires_grad):
            if isinstance(a, torch.Tensor):
                t = a.double() if to64 else a
                mf = layout if t.dim() == 4 else torch.contiguous_format
                t = t.to(device).contiguous(memory_format=mf)
                out.append(t.detach().requires_grad_(True) if rg else t)
            else:
                out.append(a)
        return out

    got_out, got_grads = _run(kernel_fn, prep(DEVICE, False), grads_out, DEVICE)
    ref_out, ref_grads = _run(lambda *a: ref_fn(*a, **ref_kwargs), prep("cpu", True), grads_out, "cpu")
    # PyTorch's own same-dtype result, on contiguous inputs (its CPU channels_last GroupNorm is far
    # less accurate in float32 and would make a weak yardstick)
    base_out, base_grads = _run(lambda *a: ref_fn(*a, **ref_kwargs), prep("cpu", False, torch.contiguous_format),
                                grads_out, "cpu")
    for i, (g, r, b) in enumerate(zip(got_out, ref_out, base_out)):
        _check(f"{name} output {i}", g, r.double(), b)
    for i, (g, r, b) in enumerate(zip(got_grads, ref_grads, base_grads)):
        _check(f"{name} grad {i}", g, r, b)
    return got_out, got_grads


# --------------------------------------------------------------------------------------------
# capability checks under the interpreter / on CUDA


def test_unsupported_reasons_accept_and_reject():
    x = torch.zeros(2, 4, 3, 3, device=DEVICE)
    t = torch.zeros(2, device=DEVICE)
    assert tri_fm.fm_noise_unsupported_reasons(x, x, t, 1e-5) == []
    assert tri_fm.fm_loss_unsupported_reasons(x, x) == []
    assert tri_ln.unsupported_reasons(x, 1e-5) == []
    assert tri_gn.unsupported_reasons(x, 2, None, None, None, None, 1e-5, True) == []
    q = torch.zeros(1, 2, 5, 16, device=DEVICE)
    assert tri_attn.unsupported_reasons(q, q, q) == []
    d = x.double()
    assert any("float64" in r for r in tri_ln.unsupported_reasons(d))
    assert any("divisible" in r for r in tri_gn.unsupported_reasons(x, 3))
    assert any("shape" in r for r in tri_gn.unsupported_reasons(x, 2, None, None, torch.zeros(4, device=DEVICE)))
    assert any("head dim" in r for r in tri_attn.unsupported_reasons(q[..., :12], q[..., :12], q[..., :12]))
    assert any("t must have shape" in r for r in tri_fm.fm_noise_unsupported_reasons(x, x, t[:1]))


# --------------------------------------------------------------------------------------------
# fm_noise / fm_loss

FM_SHAPES = [(3, 12, 5, 7), (1, 3, 5, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FM_SHAPES)
def test_fm_noise(shape, dtype):
    x, e = _randn(shape, dtype, 1), _randn(shape, dtype, 2)
    t = torch.rand(shape[0], generator=_gen(3))
    t[0] = 1.0  # endpoint
    gxt, gv = _randn(shape, dtype, 4), _randn(shape, dtype, 5)
    (x_t, v), grads = _compare("fm_noise", lambda a, b, c: tri_fm.fm_noise(a, b, c.to(DEVICE), 1e-5),
                               ops.fm_noise_ref, [x, e, t], [gxt, gv], dtype)  # gradients of x, noise and t
    assert x_t.dtype == dtype and v.dtype == dtype and len(grads) == 3 and grads[2].dtype == t.dtype


def test_fm_noise_channels_last_and_single_output_grad():
    shape = (3, 12, 5, 7)
    x = _leaf(_randn(shape, torch.float32, 6), memory_format=torch.channels_last)
    e = _leaf(_randn(shape, torch.float32, 7), memory_format=torch.channels_last)
    t = torch.rand(3, generator=_gen(8)).to(DEVICE)
    x_t, v = tri_fm.fm_noise(x, e, t, 0.25)
    assert x_t.is_contiguous(memory_format=torch.channels_last)
    rx, re_ = x.detach().cpu().double().requires_grad_(), e.detach().cpu().double().requires_grad_()
    r_xt, r_v = ops.fm_noise_ref(rx, re_, t.cpu().double(), 0.25)
    _check("x_t", x_t, r_xt.detach())
    _check("v", v, r_v.detach())
    g = _randn(shape, torch.float32, 9)
    dx, de = torch.autograd.grad(x_t, (x, e), g.to(DEVICE))  # v unused: its gradient is None
    rdx, rde = torch.autograd.grad(r_xt, (rx, re_), g.double())
    _check("dx", dx, rdx)
    _check("dnoise", de, rde)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FM_SHAPES + [(2, 3, 40, 41)])  # the last: several partial sums per sample
def test_fm_loss(shape, dtype):
    p, y = _randn(shape, dtype, 10), _randn(shape, dtype, 11, offset=0.5)
    g = torch.randn(shape[0], generator=_gen(12))
    (loss,), _ = _compare("fm_loss", tri_fm.fm_loss, ops.fm_loss_ref, [p, y], [g], dtype)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)


# --------------------------------------------------------------------------------------------
# latent_layernorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 12, 5, 7), (1, 4, 5, 7), (2, 4, 32, 33)])  # last: N > one block
def test_latent_layernorm(shape, dtype):
    z = _randn(shape, dtype, 20, scale=2.0, offset=0.3)
    g = _randn(shape, dtype, 21)
    (y,), _ = _compare("latent_layernorm", lambda a: tri_ln.latent_layernorm(a, 1e-5),
                       ops.latent_layernorm_ref, [z], [g], dtype)
    assert y.dtype == dtype


def test_latent_layernorm_channels_last_and_large_mean():
    z = _randn((2, 4, 5, 7), torch.float32, 22, scale=0.01, offset=100.0)  # mean >> std
    g = _randn((2, 4, 5, 7), torch.float32, 23)
    (y,), _ = _compare("latent_layernorm", lambda a: tri_ln.latent_layernorm(a, 1e-5), ops.latent_layernorm_ref,
                       [z], [g], torch.float32, memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_latent_layernorm_finite_values_whose_squares_overflow(memory_format):
    """Finite float32 latents of ~1e20 (squares overflow float32) are normalised as in float64,
    forward and backward (the float32 sum of squares had made rstd 0 and the output silently 0);
    a sample holding an inf stays non-finite and leaves the others alone."""
    z = (_randn((3, 4, 6, 5), torch.float64, 24, offset=0.5) * 1e20).float()
    g = _randn((3, 4, 6, 5), torch.float32, 25)
    zk = _leaf(z, memory_format=memory_format)
    y = tri_ln.latent_layernorm(zk, 1e-5)
    (gz,) = torch.autograd.grad(y, zk, g.to(DEVICE))
    z64 = (z.double() * 1e-20).requires_grad_()
    y64 = ops.latent_layernorm_ref(z64, 1e-45)  # eps scaled with the values
    (gz64,) = torch.autograd.grad(y64, z64, g.double())
    _check("latent_layernorm output", y, y64)
    _check("latent_layernorm grad", gz * 1e20, gz64)  # dz scales as 1/z
    z[1, 0, 0, 0] = float("inf")
    y = tri_ln.latent_layernorm(z.to(DEVICE).contiguous(memory_format=memory_format), 1e-5).cpu()
    assert not y[1].isfinite().any() and y[0].isfinite().all() and y[2].isfinite().all()


# --------------------------------------------------------------------------------------------
# group_norm_modulate_silu


def _gn_inputs(shape, dtype, params, seed=30, offset=0.0, scale=1.0):
    B, C = shape[:2]
    x = _randn(shape, dtype, seed, scale=scale, offset=offset)
    # affine parameters stay float32 (as in mixed-precision training); the modulation is in dtype
    w = _randn((C,), torch.float32, seed + 1, scale=0.5, offset=1.0) if "w" in params else None
    b = _randn((C,), torch.float32, seed + 2, scale=0.5) if "b" in params else None
    s = _randn((B, C), dtype, seed + 3, scale=0.5) if "s" in params else None
    sh = _randn((B, C), dtype, seed + 4, scale=0.5) if "t" in params else None
    return x, w, b, s, sh


def _gn_case(shape, groups, dtype, params="wbst", silu=True, memory_format=torch.contiguous_format, **kw):
    x, w, b, s, sh = _gn_inputs(shape, dtype, params, **kw)
    g = _randn(shape, dtype, 99)
    args = [x, groups, w, b, s, sh, 1e-5, silu]
    (y,), grads = _compare("group_norm_modulate_silu", tri_gn.group_norm_modulate_silu,
                           ops.group_norm_modulate_silu_ref, args, [g], dtype, memory_format=memory_format)
    assert y.dtype == dtype
    assert len(grads) == 1 + sum(p is not None for p in (w, b, s, sh))
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 12, 5, 7), (1, 12, 5, 7)])
def test_group_norm_modulate_silu(shape, dtype):
    _gn_case(shape, 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_modulate_silu_channels_last(dtype):
    y = _gn_case((3, 12, 5, 7), 3, dtype, memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("params,silu", [("", True), ("wb", False), ("st", True), ("t", False)])
def test_group_norm_modulate_silu_optional_parts(params, silu):
    _gn_case((3, 12, 5, 7), 3, torch.float32, params=params, silu=silu)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_group_norm_modulate_silu_several_tiles_and_large_mean(memory_format):
    # 40 x 41 spatial > one 1024-element tile; mean >> std stresses the merged statistics
    _gn_case((2, 8, 40, 41), 2, torch.float32, memory_format=memory_format, offset=50.0, scale=0.1)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_group_norm_modulate_silu_finite_values_whose_squares_overflow(memory_format):
    """Finite float32 values of ~1e20 (squares overflow float32), over several tiles and spatial
    ranges, with every parameter and SiLU: normalised as in float64, forward and backward (the
    float32 M2 had made rstd 0 and the output silently silu(beta)). One group holding an inf stays
    non-finite and leaves the others alone."""
    shape, G = (2, 8, 40, 41), 4
    x, w, b, s, sh = _gn_inputs(shape, torch.float64, "wbst", seed=31)
    x = (x * 1e20).float()
    w, b, s, sh = (t.float() for t in (w, b, s, sh))
    g = _randn(shape, torch.float32, 98)
    leaves = [_leaf(x, memory_format=memory_format)] + [_leaf(t) for t in (w, b, s, sh)]
    y = tri_gn.group_norm_modulate_silu(leaves[0], G, *leaves[1:], 1e-5, True)
    grads = torch.autograd.grad(y, leaves, g.to(DEVICE))
    leaves64 = [t.double().requires_grad_() for t in (x * 1e-20, w, b, s, sh)]
    y64 = ops.group_norm_modulate_silu_ref(leaves64[0], G, *leaves64[1:], eps=1e-45, silu=True)
    grads64 = torch.autograd.grad(y64, leaves64, g.double())
    _check("group_norm_modulate_silu output", y, y64)
    for name, gk, g64 in zip(["x", "weight", "bias", "scale", "shift"], grads, grads64):
        _check(f"group_norm_modulate_silu grad {name}", gk * 1e20 if name == "x" else gk, g64)
    x[1, 2, 3, 4] = float("inf")  # sample 1, group 1
    y = tri_gn.group_norm_modulate_silu(x.to(DEVICE).contiguous(memory_format=memory_format), G,
                                        *(t.to(DEVICE) for t in (w, b, s, sh)), 1e-5, True).cpu()
    assert not y[1, 2:4].isfinite().any() and y[0].isfinite().all() and y[1, :2].isfinite().all()


# --------------------------------------------------------------------------------------------
# attention


def _attn_case(shape, dtype, transpose=False):
    q, k, v = (_randn(shape, dtype, 40 + i) for i in range(3))
    g = _randn(shape, dtype, 43)

    def kernel(a, b, c):
        if transpose:  # (B, N, H, D) storage viewed as (B, H, N, D): strided rows
            a, b, c = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (a, b, c))
        return tri_attn.attention(a, b, c)

    # the yardstick is PyTorch's own computation in dtype (no upcast)
    (o,), _ = _compare("attention", kernel, ops.attention_ref, [q, k, v], [g], dtype, ref_kwargs={"upcast": False})
    assert o.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2, 37, 16), (1, 1, 37, 16)])
def test_attention(shape, dtype):
    _attn_case(shape, dtype)


@pytest.mark.parametrize("shape,transpose", [((1, 2, 130, 32), False),  # several query/key blocks
                                             ((2, 2, 20, 64), True),  # strided q, k, v
                                             ((1, 1, 37, 128), False)])
def test_attention_more_shapes(shape, transpose):
    _attn_case(shape, torch.float32, transpose=transpose)


def test_attention_fp16_several_blocks():
    _attn_case((1, 1, 130, 32), torch.float16)


def test_attention_very_negative_logits():
    # logits near -100 (row log-sum-exp near -144 in base 2): the key columns past N in the last
    # block have exp2(0 - lse) = inf, which only the column mask keeps out of dq (NaN without it)
    g = _gen(7)
    base = torch.randn(1, 2, 1, 16, generator=g, dtype=torch.float64)
    q = (5 * base.sign() + 0.3 * torch.randn(1, 2, 37, 16, generator=g, dtype=torch.float64)).float()
    k = (-5 * base.sign() + 0.3 * torch.randn(1, 2, 37, 16, generator=g, dtype=torch.float64)).float()
    v = _randn((1, 2, 37, 16), torch.float32, 8)
    logits = q.double() @ k.double().transpose(-1, -2) / 4
    assert logits.max() < -60
    _compare("attention", tri_attn.attention, ops.attention_ref, [q, k, v], [_randn((1, 2, 37, 16), torch.float32, 9)],
             torch.float32, ref_kwargs={"upcast": False})


def test_attention_through_the_dispatcher_with_strided_inputs():
    # non-unit last-dim strides (copied), k and v expanded over the batch (stride 0)
    q = _randn((2, 20, 2, 16), torch.float32, 11).permute(0, 2, 1, 3)
    k = _randn((1, 2, 20, 16), torch.float32, 12).expand(2, -1, -1, -1)
    v = _randn((2, 2, 16, 20), torch.float32, 13).transpose(-1, -2)
    got = ops.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend="triton")
    _check("attention (dispatcher)", got, ops.attention_ref(q.double(), k.double(), v.double()),
           ops.attention_ref(q, k, v))


def test_attention_op_checks_shapes():
    # the registered op itself: a shorter k or v had been read past its end
    q = torch.zeros(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        tri_attn.attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.dito_fast_triton.attention(q[..., :8], q[..., :8], q[..., :8])


# --------------------------------------------------------------------------------------------
# 64-bit offsets (IDX64): chosen past 2^31 elements; run here on small tensors by lowering the limit


def test_needs_int64_counts_the_furthest_element():
    from dito_fast.kernels.triton import needs_int64

    meta = lambda shape, stride: torch.empty_strided(shape, stride, device="meta")  # noqa: E731
    assert not needs_int64(meta((2, 8, 1024, 1024), (8 << 20, 1 << 20, 1024, 1)))  # 2^24 elements
    assert not needs_int64(meta((1, 128, 4096, 4096), (128 << 24, 1 << 24, 4096, 1)))  # last offset 2^31 - 1
    assert needs_int64(meta((1, 129, 4096, 4096), (129 << 24, 1 << 24, 4096, 1)))
    assert needs_int64(meta((1, 4, 3, 64), (0, 0, 2**31 - 16, 1)), lead=2)  # three rows far apart
    assert not needs_int64(meta((1, 4, 3, 64), (0, 0, 2**29, 1)), None, lead=2)
    assert not needs_int64(meta((0, 3, 2**20, 2**20), (1, 1, 1, 1)))  # empty
    # the leading (batch; batch and head) dims are indexed in int64 by the kernels: not counted
    assert not needs_int64(meta((1024, 4, 1024, 1024), (4 << 20, 1 << 20, 1024, 1)))
    assert not needs_int64(meta((64, 64, 1024, 1024), (64 << 20, 1 << 20, 1024, 1)), lead=2)


@pytest.fixture
def int64_offsets(monkeypatch):
    import dito_fast.kernels.triton as tri

    monkeypatch.setattr(tri, "INT32_OFFSET_LIMIT", 0)  # every sample of more than one element
    assert tri.needs_int64(torch.zeros(1, 2))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_int64_offsets_group_norm_modulate_silu(int64_offsets, memory_format):
    _gn_case((2, 8, 40, 41), 2, torch.float32, memory_format=memory_format)


def test_int64_offsets_fm_and_attention(int64_offsets):
    test_fm_noise((3, 12, 5, 7), torch.float32)
    test_fm_loss((2, 3, 40, 41), torch.float32)
    _attn_case((1, 2, 130, 32), torch.float32, transpose=True)


# --------------------------------------------------------------------------------------------
# CUDA only: opcheck and inductor


def _op_samples():
    dev = DEVICE
    x = torch.randn(2, 8, 5, 7, device=dev, requires_grad=True)
    e = torch.randn(2, 8, 5, 7, device=dev, requires_grad=True)
    t = torch.rand(2, device=dev)
    w, b = (torch.randn(8, device=dev, requires_grad=True) for _ in range(2))
    s, sh = (torch.randn(2, 8, device=dev, requires_grad=True) for _ in range(2))
    q = torch.randn(1, 2, 37, 16, device=dev, requires_grad=True)
    return [
        (torch.ops.dito_fast_triton.fm_noise.default, (x, e, t, 1e-5)),
        (torch.ops.dito_fast_triton.fm_loss.default, (x, e)),
        (torch.ops.dito_fast_triton.latent_layernorm.default, (x, 1e-5)),
        (torch.ops.dito_fast_triton.group_norm_modulate_silu.default, (x, 2, w, b, s, sh, 1e-5, True)),
        (torch.ops.dito_fast_triton.group_norm_modulate_silu.default, (x, 4, None, None, None, None, 1e-5, False)),
        (torch.ops.dito_fast_triton.attention.default, (q, q.detach().clone(), q.detach().clone())),
    ]


@pytest.mark.skipif(not CUDA, reason="opcheck runs the kernels on FakeTensors: needs real (non-interpreted) triton")
@pytest.mark.parametrize("i", range(6))
def test_opcheck(i):
    op, args = _op_samples()[i]
    torch.library.opcheck(op, args)


@pytest.mark.skipif(not CUDA, reason="inductor compiles triton kernels for a GPU")
def test_torch_compile_inductor():
    def f(x, e, t, w, s, q):
        x_t, v = tri_fm.fm_noise(x, e, t)
        h = tri_gn.group_norm_modulate_silu(x_t, 2, w, None, s, None)
        h = tri_ln.latent_layernorm(h)
        a = tri_attn.attention(q, q * 0.5, q)
        return tri_fm.fm_loss(h, v).sum() + a.sum()

    x, e, t, w, _, s, q = (a for a in _gn_like_inputs())
    compiled = torch.compile(f, fullgraph=True)
    out_c = compiled(x, e, t, w, s, q)
    grads_c = torch.autograd.grad(out_c, (x, e, w, s, q))
    out_e = f(x, e, t, w, s, q)
    grads_e = torch.autograd.grad(out_e, (x, e, w, s, q))
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _gn_like_inputs():
    dev = DEVICE
    g = _gen(7)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev).requires_grad_(True)  # noqa: E731
    return (mk(2, 8, 5, 7), mk(2, 8, 5, 7), torch.rand(2, generator=g).to(dev), mk(8), mk(8), mk(2, 8),
            mk(1, 2, 37, 16))
