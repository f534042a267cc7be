"""Tests for the reference implementations in dito_fast/ops (hand formulas in float64, odd shapes)
and for the backend dispatcher (DESIGN.md §3)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from dito_fast import ops
from dito_fast.ops import _dispatch
from dito_fast.ops._dispatch import Backend, always_supported, dispatch

G = torch.Generator().manual_seed(0)


def _randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=G, dtype=dtype)


# --------------------------------------------------------------------------------------------
# fm_noise / fm_loss


def test_fm_noise_ref_hand_formula():
    s = 0.25
    x, e = _randn(5, 3, 13, 7), _randn(5, 3, 13, 7)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t, v = ops.fm_noise_ref(x, e, t, s)
    for i in range(5):
        ti = t[i].item()
        assert torch.allclose(x_t[i], (1 - ti) * x[i] + (s + ti * (1 - s)) * e[i], rtol=0, atol=1e-14)
        assert torch.allclose(v[i], (1 - s) * e[i] - x[i], rtol=0, atol=1e-14)
    # v is the time derivative of x_t (finite difference in t)
    h = 1e-6
    tp = torch.full((5,), 0.4, dtype=torch.float64)
    xp, _ = ops.fm_noise_ref(x, e, tp + h, s)
    xm, _ = ops.fm_noise_ref(x, e, tp - h, s)
    assert torch.allclose((xp - xm) / (2 * h), v, atol=1e-8)
    # endpoints: t=0 gives (almost) the image, t=1 gives pure noise
    assert torch.equal(x_t[-1], e[-1])
    assert torch.allclose(x_t[0], x[0] + s * e[0])


def test_fm_noise_ref_other_ranks_and_dtypes():
    x, e = _randn(3, 11), _randn(3, 11)
    t = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    x_t, v = ops.fm_noise_ref(x, e, t, 1e-5)
    assert torch.allclose(x_t, (1 - t[:, None]) * x + (1e-5 + t[:, None] * (1 - 1e-5)) * e)
    xf = x.float()
    x_t32, v32 = ops.fm_noise(xf, e.float(), t.float(), 1e-5)
    assert x_t32.dtype == torch.float32 and torch.allclose(x_t32.double(), x_t, atol=1e-6)


def test_fm_noise_ref_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        ops.fm_noise_ref(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        ops.fm_noise_ref(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        ops.fm_noise_ref(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1))
    a, t = torch.zeros(2, 3), torch.zeros(2)
    for fn in (ops.fm_noise_ref, ops.fm_noise):
        for bad in (float("nan"), -0.1, 1.0, float("inf")):
            with pytest.raises(ValueError, match=r"sigma_min must be in \[0, 1\), got"):
                fn(a, a, t, bad)
        for bad in ("0.1", True, None):
            with pytest.raises(TypeError, match="sigma_min must be a real number"):
                fn(a, a, t, bad)


def test_fm_loss_ref_hand_formula():
    pred, target = _randn(5, 3, 13, 7), _randn(5, 3, 13, 7)
    loss = ops.fm_loss_ref(pred, target)
    assert loss.dtype == torch.float64 and loss.shape == (5,)  # float64 in, float64 out
    assert ops.fm_loss_ref(pred.float(), target.float()).dtype == torch.float32
    for i in range(5):
        d = (pred[i] - target[i]).flatten().tolist()
        assert loss[i].item() == pytest.approx(sum(v * v for v in d) / len(d), rel=1e-6)
    # half-precision inputs accumulate in float32
    lb = ops.fm_loss(pred.bfloat16(), target.bfloat16())
    assert lb.dtype == torch.float32
    assert torch.allclose(lb.double(), ops.fm_loss_ref(pred.bfloat16().double(), target.bfloat16().double()).double(),
                          rtol=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        ops.fm_loss_ref(pred, target[:, :2])
    # one value per sample: 1-d inputs, as the other backends take them
    p1, y1 = _randn(4), _randn(4)
    torch.testing.assert_close(ops.fm_loss_ref(p1, y1), (p1 - y1).square())
    torch.testing.assert_close(ops.fm_loss(p1, y1), (p1 - y1).square())
    # empty samples have no mean: refused on every backend, before any runs
    for backend in (None, "ref"):
        with pytest.raises(ValueError, match=r"each sample must have at least one value.*\(2, 0\)"):
            ops.fm_loss(torch.zeros(2, 0), torch.zeros(2, 0), backend=backend)


def test_fm_loss_gradient():
    pred = _randn(3, 2, 5).requires_grad_()
    target = _randn(3, 2, 5)
    ops.fm_loss(pred, target).sum().backward()
    assert torch.allclose(pred.grad, 2 * (pred - target).detach() / 10, atol=1e-6)


# --------------------------------------------------------------------------------------------
# latent_layernorm


def _hand_layernorm(z, eps):
    out = torch.empty_like(z)
    for b in range(z.shape[0]):
        vals = z[b].flatten().tolist()
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)
        out[b] = (z[b] - mean) / math.sqrt(var + eps)
    return out


@pytest.mark.parametrize("shape", [(5, 3, 7, 11), (1, 4, 1, 1), (2, 1, 9, 2)])
def test_latent_layernorm_ref_hand_formula(shape):
    z = _randn(*shape) * 3 + 2
    eps = 1e-2  # large eps so that a missing eps is visible
    assert torch.allclose(ops.latent_layernorm_ref(z, eps), _hand_layernorm(z, eps), rtol=0, atol=1e-12)
    assert torch.allclose(ops.latent_layernorm(z, eps), _hand_layernorm(z, eps), rtol=0, atol=1e-12)


def test_latent_layernorm_properties():
    z = _randn(4, 4, 6, 5) * 5 - 3
    y = ops.latent_layernorm(z, 1e-12)
    assert torch.allclose(y.mean((1, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y.var((1, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-9)
    # per sample: scaling and shifting one sample changes nothing
    z2 = z.clone()
    z2[1] = 7 * z2[1] + 4
    assert torch.allclose(ops.latent_layernorm(z2, 1e-12), y, atol=1e-10)
    # non-contiguous input
    zt = _randn(4, 5, 6, 4).transpose(1, 3)
    assert not zt.is_contiguous()
    assert torch.allclose(ops.latent_layernorm(zt, 1e-5), _hand_layernorm(zt.contiguous(), 1e-5), atol=1e-12)


def test_latent_layernorm_half_precision_accumulates_in_float32():
    z = (_randn(3, 4, 5, 5) * 100 + 1000).to(torch.bfloat16)
    y = ops.latent_layernorm_ref(z, 1e-5)
    assert y.dtype == torch.bfloat16
    ref = _hand_layernorm(z.double(), 1e-5)
    err = (y.double() - ref).abs().max()
    assert err < 0.0157  # one bf16 rounding of outputs of magnitude < 4 (ulp/2 = 2**-7)
    # computing the statistics in bf16 instead is measurably worse (values ~1000 +- 100)
    mean = z.mean(dim=(1, 2, 3), keepdim=True)
    y_bf16 = (z - mean) * torch.rsqrt((z - mean).square().mean(dim=(1, 2, 3), keepdim=True) + 1e-5)
    assert y_bf16.dtype == torch.bfloat16
    assert (y_bf16.double() - ref).abs().max() > 2 * err


def test_latent_layernorm_ref_keeps_channels_last():
    z = _randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert ops.latent_layernorm_ref(z).is_contiguous(memory_format=torch.channels_last)


def test_latent_layernorm_errors():
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        ops.latent_layernorm(torch.zeros(3, 4, 5))
    z = torch.zeros(1, 2, 2, 2)
    with pytest.raises(TypeError, match="z must be float32, float64, float16 or bfloat16, got torch.float8_e5m2"):
        ops.latent_layernorm(z.to(torch.float8_e5m2))
    for eps in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            ops.latent_layernorm(z, eps=eps)


# --------------------------------------------------------------------------------------------
# group_norm_modulate_silu


def _hand_gn_mod_silu(x, groups, weight, bias, scale, shift, eps, silu=True):
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    cpg = C // groups
    for b in range(B):
        for g in range(groups):
            chunk = x[b, g * cpg:(g + 1) * cpg]
            vals = chunk.flatten().tolist()
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / len(vals)
            out[b, g * cpg:(g + 1) * cpg] = (chunk - mean) / math.sqrt(var + eps)
    if weight is not None:
        out = out * weight[None, :, None, None]
    if bias is not None:
        out = out + bias[None, :, None, None]
    if scale is not None:
        out = out * (1 + scale[:, :, None, None])
    if shift is not None:
        out = out + shift[:, :, None, None]
    return out * torch.sigmoid(out) if silu else out


@pytest.mark.parametrize("shape, groups", [((5, 6, 7, 11), 3), ((1, 4, 1, 3), 4), ((2, 8, 3, 5), 1)])
@pytest.mark.parametrize("affine, modulate, silu", [(True, True, True), (False, False, True),
                                                    (True, False, False), (False, True, True)])
def test_group_norm_modulate_silu_ref_hand_formula(shape, groups, affine, modulate, silu):
    B, C = shape[:2]
    x = _randn(*shape) * 2 + 1
    weight, bias = (_randn(C), _randn(C)) if affine else (None, None)
    scale, shift = (_randn(B, C), _randn(B, C)) if modulate else (None, None)
    eps = 1e-2
    expected = _hand_gn_mod_silu(x, groups, weight, bias, scale, shift, eps, silu)
    got = ops.group_norm_modulate_silu_ref(x, groups, weight, bias, scale, shift, eps=eps, silu=silu)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    got = ops.group_norm_modulate_silu(x, groups, weight, bias, scale, shift, eps=eps, silu=silu)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_group_norm_modulate_silu_noncontiguous_and_grad():
    x = _randn(2, 5, 6, 6).transpose(2, 3).requires_grad_()
    scale = _randn(2, 6).requires_grad_()
    x6 = torch.cat([x, x[:, :1]], dim=1)  # 6 channels, non-contiguous source
    y = ops.group_norm_modulate_silu(x6, 2, None, None, scale, None, eps=1e-5)
    assert torch.allclose(y, _hand_gn_mod_silu(x6.detach(), 2, None, None, scale.detach(), None, 1e-5), atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, s: ops.group_norm_modulate_silu_ref(a, 2, None, None, s, None, eps=1e-5),
        (_randn(2, 4, 3, 3).requires_grad_(), _randn(2, 4).requires_grad_()))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("needs", ["w", "b", "wb", "b, no weight", "x b, no weight"])
def test_group_norm_modulate_silu_ref_parameter_gradients(layout, needs):
    """Gradients of the reference for weight and bias when x needs none (a frozen input) or a bias
    without a weight: cases where torch's CPU group_norm backward crashes (channels_last) or raises
    ("tensor does not have a device"), which the reference avoids; against the hand formula."""
    x = (_randn(2, 8, 3, 5) * 2 + 1).contiguous(memory_format=layout)
    w, b, scale = _randn(8), _randn(8), _randn(2, 8)
    if "no weight" in needs:
        w = None
    args = [x.clone().requires_grad_("x" in needs), w, b]
    for i, name in ((1, "w"), (2, "b")):
        if args[i] is not None:
            args[i] = args[i].clone().requires_grad_(name in needs.split(",")[0])
    leaves = [a for a in args if a is not None and a.requires_grad]
    out = ops.group_norm_modulate_silu_ref(args[0], 4, args[1], args[2], scale, None, eps=1e-5)
    got = torch.autograd.grad(out.square().sum(), leaves)
    torch.testing.assert_close(out, _hand_gn_mod_silu(x, 4, w, b, scale, None, 1e-5))
    # gradients: the same formula written with differentiable torch ops (float64)
    hx, hw, hb = (a.detach().clone().requires_grad_(a.requires_grad) if a is not None else None for a in args)
    xg = hx.reshape(2, 4, -1)
    xhat = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-5)
    h = xhat.reshape(x.shape)
    h = h * (hw[:, None, None] if hw is not None else 1) + hb[:, None, None]
    h = F.silu(h * (1 + scale[:, :, None, None]))
    hand_leaves = [a for a in (hx, hw, hb) if a is not None and a.requires_grad]
    for g, e in zip(got, torch.autograd.grad(h.square().sum(), hand_leaves)):
        torch.testing.assert_close(g, e)


def test_group_norm_modulate_silu_ref_keeps_torch_affine_without_grad():
    """Without grad mode the reference keeps torch's fused affine group_norm (one pass fewer than
    the decomposed form the crash workaround uses), though the parameters require grad."""
    x, w, b = _randn(2, 8, 3, 5), _randn(8).requires_grad_(), _randn(8).requires_grad_()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), torch.profiler.profile() as prof:
            ops.group_norm_modulate_silu_ref(x, 4, w, b, silu=False)
        names = [e.name for e in prof.events()]
        assert "aten::native_group_norm" in names and "aten::mul" not in names, names


def test_group_norm_modulate_silu_ref_one_value_per_group():
    """Groups of one value normalize to 0 (the output is the bias), on the reference as on cpp;
    F.group_norm would refuse them ("more than 1 value per channel")."""
    x, b = _randn(1, 4, 1, 1), _randn(4)
    for backend in ("ref", None):
        y = ops.group_norm_modulate_silu(x, 4, None, b, silu=False, backend=backend)
        torch.testing.assert_close(y, b.reshape(1, 4, 1, 1))


def test_group_norm_modulate_silu_half_precision():
    x = _randn(2, 8, 5, 5)
    scale, shift = _randn(2, 8) * 0.1, _randn(2, 8) * 0.1
    ref = _hand_gn_mod_silu(x, 4, None, None, scale, shift, 1e-5)
    y = ops.group_norm_modulate_silu(x.bfloat16(), 4, None, None, scale.bfloat16(), shift.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() < 0.05


def test_group_norm_modulate_silu_errors():
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        ops.group_norm_modulate_silu(torch.zeros(2, 4, 5), 2)
    with pytest.raises(ValueError, match="not divisible by 3 groups"):
        ops.group_norm_modulate_silu(torch.zeros(2, 4, 5, 5), 3)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 4\)"):
        ops.group_norm_modulate_silu(torch.zeros(2, 4, 5, 5), 2, scale=torch.zeros(4))
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 4\)"):
        ops.group_norm_modulate_silu(torch.zeros(2, 4, 5, 5), 2, shift=torch.zeros(1, 4))
    x = torch.zeros(2, 4, 5, 5)
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.float8_e4m3fn"):
        ops.group_norm_modulate_silu(x.to(torch.float8_e4m3fn), 2)
    with pytest.raises(TypeError, match="weight must be float32, float64, float16 or bfloat16, got torch.int64"):
        ops.group_norm_modulate_silu(x, 2, torch.ones(4, dtype=torch.long))
    for eps in (float("nan"), -1e-5, float("inf")):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            ops.group_norm_modulate_silu(x, 2, eps=eps)


def test_group_norm_modulate_silu_parameter_dtypes():
    # Parameters of another float dtype than x are computed in x's dtype, on every CPU backend alike.
    x = _randn(2, 4, 3, 3).float()
    w, b, s, sh = _randn(4), _randn(4), _randn(2, 4), _randn(2, 4)
    for backend in ("ref", "cpp") if ops.available_backends()["group_norm_modulate_silu"][0] == "cpp" else ("ref",):
        for dtype in (torch.float16, torch.float64):
            ps = [p.to(dtype) for p in (w, b, s, sh)]
            y = ops.group_norm_modulate_silu(x, 2, *ps, backend=backend)
            assert y.dtype == torch.float32
            expected = _hand_gn_mod_silu(x.double(), 2, *(p.double() for p in ps), 1e-5)
            assert (y.double() - expected).abs().max() < 1e-5, (backend, dtype)


# --------------------------------------------------------------------------------------------
# attention


def test_attention_backends_match_hand_formula():
    q, k, v = _randn(2, 1, 13, 6), _randn(2, 1, 17, 6), _randn(2, 1, 17, 6)
    w = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(6))
    expected = (w / w.sum(-1, keepdim=True)) @ v
    for backend in ("ref", "sdpa", None):
        assert torch.allclose(ops.attention(q, k, v, backend=backend), expected, atol=1e-12)
    with pytest.raises(ValueError, match=r"\(B, heads, N, D\)"):
        ops.attention(q, k[..., :5], v[..., :5])


def test_attention_errors():
    q = _randn(2, 3, 5, 8).float()
    with pytest.raises(ValueError, match=r"k, v of shape \(B, heads, M, D\); got \(2, 3, 5, 8\), \(3, 5, 8\)"):
        ops.attention(q, q[0], q[0])  # SDPA would broadcast a 3-d k and v
    with pytest.raises(ValueError, match=r"\(B, heads, M, D\)"):
        ops.attention(q, q[:1], q[:1])
    with pytest.raises(TypeError, match="q must be float32, float64, float16 or bfloat16, got torch.int64"):
        ops.attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="k must be a tensor, got list"):
        ops.attention(q, [1.0], q)
    with pytest.raises(TypeError, match="must share a dtype, got torch.float32, torch.float64, torch.float32"):
        ops.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="must be on one device, got cpu, meta, cpu"):
        ops.attention(q, q.to("meta"), q)
    for backend in ("ref", "sdpa"):  # the reference checks too
        with pytest.raises(ValueError, match=r"\(B, heads, M, D\)"):
            ops.attention(q, q[0], q[0], backend=backend)


# --------------------------------------------------------------------------------------------
# dispatcher


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match=r"latent_layernorm: unknown backend 'cuda'; available: \[.*'ref'\]"):
        ops.latent_layernorm(torch.zeros(1, 2, 2, 2), backend="cuda")
    with pytest.raises(ValueError, match=r"available: \['sdpa', 'xformers', 'triton', 'ref'\]"):
        ops.attention(*(torch.zeros(1, 1, 2, 2),) * 3, backend="flash")


def test_available_backends():
    avail = ops.available_backends()
    assert set(avail) == {"attention", "conv3x3", "fm_noise", "fm_loss", "group_norm_modulate_silu", "latent_layernorm"}
    assert set(avail) == _dispatch.KNOWN_OPS  # the names DITO_FAST_BACKEND's entries accept
    assert all("ref" in names and "triton" in names for op, names in avail.items() if op != "conv3x3")
    assert avail["conv3x3"] == ["cpp", "ref"]  # on CUDA, ref is F.conv2d, i.e. cuDNN
    assert all(names[0] == "cpp" for op, names in avail.items() if op != "attention")
    assert avail["attention"][0] == "sdpa"


def test_gpu_backends_explain_why_not_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: Triton kernels need CUDA tensors"):
        ops.attention(q, q, q, backend="triton")
    with pytest.raises(RuntimeError, match="xformers runs on CUDA tensors only"):
        ops.attention(q, q, q, backend="xformers")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dito_fast.ops.attention import _xformers_reasons
    with FakeTensorMode():  # CUDA tensors without a GPU: the dtype reason comes before importing xformers
        qc = torch.empty(1, 1, 4, 16, device="cuda", dtype=torch.float64)
        assert _xformers_reasons(qc, qc, qc) == ["xformers has no float64 kernels"]
    with pytest.raises(RuntimeError, match="triton.*need CUDA"):
        ops.group_norm_modulate_silu(torch.randn(1, 4, 2, 2), 2, backend="triton")


def _recording_backends(log):
    def make(name, reasons):
        def fn(x):
            log.append(name)
            return name
        return Backend(name, fn, lambda x: list(reasons))
    return [make("fast", ["needs CUDA"]), make("medium", []), make("ref", [])]


def test_dispatch_priority_and_reasons(monkeypatch):
    monkeypatch.delenv("DITO_FAST_BACKEND", raising=False)
    log = []
    backends = _recording_backends(log)
    # first backend with no reasons wins
    assert dispatch("op", backends, None, 0) == "medium"
    # explicit choice
    assert dispatch("op", backends, "ref", 0) == "ref"
    # explicit choice that cannot run: its reasons are in the error
    with pytest.raises(RuntimeError, match="op: backend 'fast' cannot run: needs CUDA"):
        dispatch("op", backends, "fast", 0)
    # nothing fits: every backend's reasons are listed
    none_fit = [Backend("a", lambda x: 1, lambda x: ["too big"]), Backend("b", lambda x: 2, lambda x: ["no GPU", "fp64"])]
    with pytest.raises(RuntimeError, match="no backend can run these inputs: a: too big; b: no GPU, fp64"):
        dispatch("op", none_fit, None, 0)
    assert log == ["medium", "ref"]


@pytest.fixture
def toy_ops(monkeypatch):
    """The toy op names these tests dispatch, accepted in DITO_FAST_BACKEND's 'op=name' entries."""
    monkeypatch.setattr(_dispatch, "KNOWN_OPS", _dispatch.KNOWN_OPS | {"op", "other"})


def test_dispatch_env_var(monkeypatch, toy_ops):
    log = []
    backends = _recording_backends(log)
    monkeypatch.setenv("DITO_FAST_BACKEND", "ref")
    assert dispatch("op", backends, None, 0) == "ref"  # env var beats priority order
    assert dispatch("op", backends, "medium", 0) == "medium"  # explicit argument beats env var
    monkeypatch.setenv("DITO_FAST_BACKEND", "triton")  # a backend this op lacks: fall back silently
    assert dispatch("op", backends, None, 0) == "medium"
    monkeypatch.setenv("DITO_FAST_BACKEND", "fast")  # named and present but unsupported: error
    with pytest.raises(RuntimeError, match=r"backend 'fast' \(asked for by DITO_FAST_BACKEND='fast'\) cannot run: "
                                           r"needs CUDA"):
        dispatch("op", backends, None, 0)
    monkeypatch.setenv("DITO_FAST_BACKEND", "other=fast, op=ref")  # per-op entries
    assert dispatch("op", backends, None, 0) == "ref"
    monkeypatch.setenv("DITO_FAST_BACKEND", "other=ref")  # no entry for this op: priority order
    assert dispatch("op", backends, None, 0) == "medium"
    monkeypatch.setenv("DITO_FAST_BACKEND", "ref, other=fast")  # a leading name: every op without an entry
    assert dispatch("op", backends, None, 0) == "ref"
    monkeypatch.setenv("DITO_FAST_BACKEND", "fast,op=ref")  # this op's entry wins over it
    assert dispatch("op", backends, None, 0) == "ref"
    monkeypatch.setenv("DITO_FAST_BACKEND", "ref,op=")  # an empty entry: this op by priority order
    assert dispatch("op", backends, None, 0) == "medium"
    monkeypatch.setenv("DITO_FAST_BACKEND", " , ref,")  # empty entries before it do not matter
    assert dispatch("op", backends, None, 0) == "ref"


def test_dispatch_env_var_rejects_typos(monkeypatch, toy_ops):
    # A name no op has, an op name that is not one, or a malformed value: a clear error on the
    # first call, not a silent fallback to the priority order.
    backends = _recording_backends([])
    for value, match in [("fsat", r"names unknown backend 'fsat'; known: \[.*'cpp'.*'ref'"),
                         ("op=rfe", "names unknown backend 'rfe'"),
                         ("opp=ref", r"'op=name' entries .* with op one of \[.*'group_norm_modulate_silu'"),
                         ("op=ref,medium", "expected a backend name, optionally followed by 'op=name' entries"),
                         ("op=ref=fast", "expected a backend name"),
                         ("ref,medium", "expected a backend name"),  # a second name for every op
                         ("ref,=medium", "expected a backend name")]:
        monkeypatch.setenv("DITO_FAST_BACKEND", value)
        with pytest.raises(ValueError, match=match):
            dispatch("op", backends, None, 0)
    monkeypatch.setenv("DITO_FAST_BACKEND", "latent_layernorm=cpp,attention=sdpa,op=ref,")  # a trailing comma is fine
    assert dispatch("op", backends, None, 0) == "ref"
    monkeypatch.setenv("DITO_FAST_BACKEND", "latent_layernorm=rfe")  # another op's entry is checked too
    with pytest.raises(ValueError, match="unknown backend 'rfe'"):
        ops.latent_layernorm(_randn(1, 2, 2, 2))


def test_dispatch_env_var_follows_os_environ(monkeypatch, toy_ops):
    # The variable is read from os.environ's encoded mapping on every call (_dispatch): setting,
    # deleting and non-ASCII values take effect at once, and a replaced os.environ is honoured.
    log = []
    backends = _recording_backends(log)
    monkeypatch.setenv("DITO_FAST_BACKEND", "ref")
    assert dispatch("op", backends, None, 0) == "ref"
    monkeypatch.delenv("DITO_FAST_BACKEND")
    assert dispatch("op", backends, None, 0) == "medium"
    monkeypatch.setenv("DITO_FAST_BACKEND", "op=r\u00e9f")  # decoded: the error names it
    with pytest.raises(ValueError, match="unknown backend 'r\u00e9f'"):
        dispatch("op", backends, None, 0)
    monkeypatch.setattr(os, "environ", {"DITO_FAST_BACKEND": "op=ref"})
    assert dispatch("op", backends, None, 0) == "ref"
    monkeypatch.setattr(os, "environ", {})
    assert dispatch("op", backends, None, 0) == "medium"


def test_dispatch_direct_route(monkeypatch, toy_ops):
    # The first backend's direct route runs whenever that backend is asked for or first in line, and
    # not otherwise; NotImplemented from it falls back to the ordinary selection (same backend, or
    # the reasons error when it was asked for explicitly).
    monkeypatch.delenv("DITO_FAST_BACKEND", raising=False)
    log = []

    def direct(x):
        log.append("direct")
        return NotImplemented if x < 0 else "direct"

    backends = [Backend("first", lambda x: log.append("first") or "first", lambda x: ["negative"] if x < 0 else [],
                        direct), Backend("ref", lambda x: log.append("ref") or "ref", always_supported)]
    assert dispatch("op", backends, None, 1) == "direct"
    assert dispatch("op", backends, "first", 1) == "direct"
    assert dispatch("op", backends, "ref", 1) == "ref"
    assert dispatch("op", backends, None, -1) == "ref"  # declined, and the selection agrees
    with pytest.raises(RuntimeError, match="backend 'first' cannot run: negative"):
        dispatch("op", backends, "first", -1)
    monkeypatch.setenv("DITO_FAST_BACKEND", "op=ref")
    assert dispatch("op", backends, None, 1) == "ref"
    monkeypatch.setenv("DITO_FAST_BACKEND", "first")
    assert dispatch("op", backends, None, 1) == "direct"
    monkeypatch.delenv("DITO_FAST_BACKEND")
    monkeypatch.setattr(_dispatch, "DIRECT_ROUTES", False)  # switched off
    assert dispatch("op", backends, None, 1) == "first"
    monkeypatch.setattr(_dispatch, "DIRECT_ROUTES", True)
    monkeypatch.setattr(_dispatch, "PROFILE_RANGES", True)  # profiled calls take the recorded route
    assert dispatch("op", backends, None, 1) == "first"
    assert log == ["direct", "direct", "ref", "direct", "ref", "direct", "ref", "direct", "first", "first"]


def test_env_var_backend_real_ops(monkeypatch):
    # DITO_FAST_BACKEND=sdpa: attention uses it, the ops without an sdpa backend fall back to ref
    monkeypatch.setenv("DITO_FAST_BACKEND", "sdpa")
    z = _randn(2, 3, 4, 5)
    assert torch.allclose(ops.latent_layernorm(z), ops.latent_layernorm_ref(z))
    x = _randn(2, 4, 3, 3)
    assert torch.allclose(ops.group_norm_modulate_silu(x, 2), ops.group_norm_modulate_silu_ref(x, 2))
    called = []
    real = _dispatch.Backend
    orig = ops.attention.__globals__["_BACKENDS"]
    monkeypatch.setitem(ops.attention.__globals__, "_BACKENDS",
                        [real(b.name, (lambda f, n: lambda *a: (called.append(n), f(*a))[1])(b.fn, b.name),
                              b.unsupported_reasons) for b in orig])
    q = _randn(1, 1, 3, 2)
    ops.attention(q, q, q)
    monkeypatch.setenv("DITO_FAST_BACKEND", "ref")
    ops.attention(q, q, q)
    assert called == ["sdpa", "ref"]
    assert always_supported(1, a=2) == []
