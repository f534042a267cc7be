"""fm_noise / fm_loss: the C++ backend against the float64 reference (outputs, gradients,
dtypes, odd shapes, layouts), gradcheck, opcheck, torch.compile, errors."""

from __future__ import annotations

import pytest
import torch

from dito_fast.ops import fm_loss, fm_loss_ref, fm_noise, fm_noise_ref

from backend_cases import CPP_REASON, assert_close_to_ref

needs_cpp = pytest.mark.skipif(bool(CPP_REASON), reason=CPP_REASON)
SHAPES = [(3, 3, 23, 19), (1, 3, 8, 8), (5, 123, 37), (2, 4, 1, 1), (4, 70000)]  # last: several chunks


def _draw(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    e = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape[0], generator=g, dtype=torch.float64)
    return x.to(dtype), e.to(dtype), t


def _noise_grads(fn, x, e, t, **kw):
    x, e, t = (a.detach().clone().requires_grad_() for a in (x, e, t))
    xt, v = fn(x, e, t, 1e-3, **kw)
    g = torch.Generator().manual_seed(9)
    (xt * torch.randn(xt.shape, generator=g, dtype=torch.float64).to(xt.dtype)
     + v * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)).sum().backward()
    return xt.detach(), v.detach(), x.grad, e.grad, t.grad


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fm_noise_cpp_matches_reference(shape, dtype):
    x, e, t = _draw(shape, dtype)
    ours = _noise_grads(fm_noise, x, e, t.to(dtype), backend="cpp")
    ref = _noise_grads(fm_noise_ref, x.double(), e.double(), t.to(dtype).double())
    same = _noise_grads(fm_noise_ref, x, e, t.to(dtype))
    for name, a, r, s in zip(["x_t", "v", "grad x", "grad noise", "grad t"], ours, ref, same, strict=True):
        assert a.dtype == dtype
        assert_close_to_ref(a, r, dtype, s, name)


def _loss_grads(fn, p, y, **kw):
    p, y = p.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    loss = fn(p, y, **kw)
    (loss * torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype)).sum().backward()
    return loss.detach(), p.grad, y.grad


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fm_loss_cpp_matches_reference(shape, dtype):
    p, y, _ = _draw(shape, dtype)
    loss, gp, gy = _loss_grads(fm_loss, p, y, backend="cpp")
    loss64, gp64, gy64 = _loss_grads(fm_loss_ref, p.double(), y.double())
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The loss accumulates in float32/float64 whatever the input dtype: compare at fp32 tolerance.
    assert_close_to_ref(loss, loss64, torch.float64 if dtype == torch.float64 else torch.float32)
    lt, gpt, gyt = _loss_grads(lambda a, b: (a - b).square().flatten(1).mean(1), p, y)  # torch, same dtype
    assert_close_to_ref(gp, gp64, dtype, gpt, "grad pred")
    assert_close_to_ref(gy, gy64, dtype, gyt, "grad target")


@needs_cpp
def test_noncontiguous_and_channels_last_inputs():
    x, e, t = _draw((3, 3, 9, 10), torch.float32)
    xs = torch.cat([x, x], dim=3)[..., ::2]
    ecl = e.to(memory_format=torch.channels_last)
    xt, v = fm_noise(xs, ecl, t.float(), backend="cpp")
    xr, vr = fm_noise_ref(xs.double(), ecl.double(), t)
    assert_close_to_ref(xt, xr, torch.float32)
    assert_close_to_ref(v, vr, torch.float32)
    assert_close_to_ref(fm_loss(xs, ecl, backend="cpp"), fm_loss_ref(xs.double(), ecl.double()), torch.float32)


@needs_cpp
def test_channels_last_kept():
    # channels_last in, channels_last out (x's layout; noise and the gradients are brought to it), as
    # the other ops and the triton backend do: a channels_last training step copies nothing here.
    x, e, t = (a.float() for a in _draw((3, 5, 6, 7), torch.float32))
    xcl, ecl = (a.contiguous(memory_format=torch.channels_last).requires_grad_() for a in (x, e))
    xt, v = fm_noise(xcl, ecl, t, backend="cpp")
    assert xt.is_contiguous(memory_format=torch.channels_last) and v.is_contiguous(memory_format=torch.channels_last)
    pred = torch.randn_like(xt).requires_grad_()
    loss = fm_loss(pred + xt, v, backend="cpp")
    gx, ge, gp = torch.autograd.grad(loss.sum(), (xcl, ecl, pred))
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in (gx, ge, gp))
    rx, re_ = x.double().requires_grad_(), e.double().requires_grad_()
    rxt, rv = fm_noise_ref(rx, re_, t.double())
    rpred = pred.detach().double().requires_grad_()
    rloss = fm_loss_ref(rpred + rxt, rv)
    for got, want in zip((xt, v, loss, gx, ge, gp), (rxt, rv, rloss, *torch.autograd.grad(rloss.sum(), (rx, re_, rpred)))):
        assert_close_to_ref(got.detach(), want.detach(), torch.float32)
    # a contiguous noise with a channels_last x: x's layout wins
    assert fm_noise(xcl.detach(), e, t, backend="cpp")[0].is_contiguous(memory_format=torch.channels_last)


@needs_cpp
@pytest.mark.parametrize("t_dtype", [torch.float64, torch.bfloat16])
def test_strided_per_sample_inputs(t_dtype):
    """t and the loss's upstream gradient are read in their own dtype and stride (no conversion op):
    a strided t of another dtype than x, and a strided gradient, give the reference's values."""
    x, e, t = _draw((3, 3, 9, 10), torch.float32)
    ts = torch.stack([t, 1 - t], dim=1).to(t_dtype)[:, 0]  # stride 2
    assert ts.stride() == (2,)
    x, e = x.requires_grad_(), e.requires_grad_()
    xt, v = fm_noise(x, e, ts, backend="cpp")
    xr, vr = fm_noise_ref(x.detach().double(), e.detach().double(), ts.double())
    assert_close_to_ref(xt, xr, torch.float32)
    assert_close_to_ref(v, vr, torch.float32)
    gxt = torch.randn_like(xt)
    gx, ge = torch.autograd.grad((xt,), (x, e), (gxt,))
    assert_close_to_ref(gx, gxt.double() * (1 - ts.double()).view(-1, 1, 1, 1), torch.float32)
    assert_close_to_ref(ge, gxt.double() * (1e-5 + ts.double() * (1 - 1e-5)).view(-1, 1, 1, 1), torch.float32)
    p = x.detach().clone().requires_grad_()
    w = torch.tensor([[0.5, 9.0], [-2.0, 9.0], [3.0, 9.0]])[:, 0]  # a strided upstream gradient
    (gp,) = torch.autograd.grad((fm_loss(p, e.detach(), backend="cpp"),), (p,), (w,))
    ref = 2 * (p.detach().double() - e.detach().double()) / p[0].numel() * w.double().view(-1, 1, 1, 1)
    assert_close_to_ref(gp, ref, torch.float32)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=needs_cpp)])
def test_v_has_no_history_when_only_t_requires_grad(backend):
    """v = (1 - sigma_min) noise - x does not depend on t: with only t requiring grad, v carries
    no graph (as the reference's), while x_t does; with x requiring grad, both do."""
    x, e, t = _draw((2, 3, 4, 4), torch.float32)
    t = t.float().requires_grad_()
    xt, v = fm_noise(x, e, t, backend=backend)
    assert xt.requires_grad and not v.requires_grad and v.grad_fn is None
    (gt,) = torch.autograd.grad(xt.sum(), t)
    assert torch.allclose(gt, (e * (1 - 1e-5) - x).sum((1, 2, 3)), rtol=1e-5)
    xt, v = fm_noise(x.requires_grad_(), e, t, backend=backend)
    assert xt.requires_grad and v.requires_grad


@needs_cpp
def test_fm_loss_independent_of_threads():
    p, y, _ = _draw((1, 3, 256, 256), torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = fm_loss(p, y, backend="cpp")
        torch.set_num_threads(2)
        b = fm_loss(p, y, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)  # fixed chunking: bitwise the same result


@needs_cpp
def test_gradcheck():
    x, e, t = _draw((2, 3, 4, 5), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: fm_noise(a, b, c, 0.01, backend="cpp"),
                                    (x.requires_grad_(), e.requires_grad_(), t.requires_grad_()))
    # t alone, and each output alone (t's gradient comes from x_t's only)
    for out in (0, 1):
        assert torch.autograd.gradcheck(lambda c: fm_noise(x.detach(), e.detach(), c, 0.01, backend="cpp")[out],
                                        (t,))
    p, y, _ = _draw((3, 2, 5), torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda a, b: fm_loss(a, b, backend="cpp"), (p.requires_grad_(), y.requires_grad_()))


@needs_cpp
def test_opcheck():
    x, e, t = _draw((2, 3, 4, 5), torch.float32)
    torch.library.opcheck(torch.ops.dito_fast.fm_noise, (x.requires_grad_(), e.requires_grad_(), t.float(), 1e-5))
    cl = [a.detach().contiguous(memory_format=torch.channels_last) for a in (x, e)]  # layouts kept alike by the fakes
    torch.library.opcheck(torch.ops.dito_fast.fm_noise, (cl[0].requires_grad_(), cl[1], t.float().requires_grad_(), 1e-5))
    torch.library.opcheck(torch.ops.dito_fast.fm_noise_backward, (cl[0].detach(), None, t.float(), 1e-5))
    torch.library.opcheck(torch.ops.dito_fast.fm_loss_backward, (torch.ones(2), cl[0].detach(), cl[1]))
    p, y, _ = _draw((3, 2, 5), torch.float32, seed=1)
    torch.library.opcheck(torch.ops.dito_fast.fm_loss, (p.clone().requires_grad_(), y.clone().requires_grad_()))
    torch.library.opcheck(torch.ops.dito_fast.fm_loss_backward, (torch.ones(3), p, y))


@needs_cpp
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, e, t = _draw((2, 3, 8, 8), torch.float32)
    pred = torch.randn(2, 3, 8, 8)

    def step(p, tt):
        x_t, v = fm_noise(x, e, tt, backend="cpp")
        return fm_loss(p * x_t, v, backend="cpp").mean()

    (p1, t1), (p2, t2) = ((pred.clone().requires_grad_(), t.float().requires_grad_()) for _ in range(2))
    out_c = torch.compile(step, fullgraph=True, backend="aot_eager")(p1, t1)
    out_e = step(p2, t2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(p1.grad, p2.grad)
    torch.testing.assert_close(t1.grad, t2.grad)  # t's gradient through the compiled graph too


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=needs_cpp)])
def test_errors(backend):
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        fm_noise(x, x[:, :2], torch.zeros(2), backend=backend)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        fm_noise(x, x, torch.zeros(3), backend=backend)
    with pytest.raises(TypeError, match="differ in dtype"):
        fm_noise(x, x.double(), torch.zeros(2), backend=backend)
    with pytest.raises(TypeError, match="pred must be float32, float64, float16 or bfloat16, got torch.int64"):
        fm_loss(x.long(), x.long(), backend=backend)
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.float8_e4m3fn"):
        fm_noise(x.to(torch.float8_e4m3fn), x.to(torch.float8_e4m3fn), torch.zeros(2), backend=backend)
    with pytest.raises(ValueError, match="non-empty batch"):
        fm_loss(x[:0], x[:0], backend=backend)


@needs_cpp
def test_compile_keeps_a_dynamic_batch_with_t_gradient():
    # fm_noise's t gradient reshaped by the concrete batch size, which specialised a batch marked
    # dynamic (ConstraintViolationError under torch.compile) whenever t required a gradient
    import torch._dynamo

    def f(x, e, t):
        x_t, v = fm_noise(x, e, t, backend="cpp")
        return (x_t * v).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for B in (3, 5):
        x, e = torch.randn(B, 2, 3, 4), torch.randn(B, 2, 3, 4)
        t = torch.rand(B, requires_grad=True)
        for a in (x, e, t):
            torch._dynamo.mark_dynamic(a, 0)
        compiled(x, e, t).backward()
        t_ref = t.detach().clone().requires_grad_()
        f(x, e, t_ref).backward()
        torch.testing.assert_close(t.grad, t_ref.grad)
