"""The C++ backend's autograd (csrc/autograd.cpp): registered in C++ for the Autograd key, the fused
fm_noise backward kernel (including absent upstream gradients), and once-differentiable backwards."""

from __future__ import annotations

import warnings

import pytest
import torch

from dito_fast.ops import fm_loss, fm_noise, fm_noise_ref, group_norm_modulate_silu, latent_layernorm

from backend_cases import CPP_REASON, assert_close_to_ref

pytestmark = pytest.mark.skipif(bool(CPP_REASON), reason=CPP_REASON)

OPS = ["fm_noise", "fm_loss", "latent_layernorm", "group_norm_modulate_silu"]


@pytest.mark.parametrize("op", OPS)
def test_autograd_kernel_is_the_cpp_one(op):
    name = f"dito_fast::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
    lines = [line for line in torch._C._dispatch_dump(name).splitlines() if line.startswith("Autograd")]
    # One Autograd registration, from the extension (a Python torch.library.register_autograd
    # would show as registered at torch/library.py, and would be boxed-only).
    assert len(lines) == 1 and "csrc/autograd.cpp" in lines[0] and "unboxed" in lines[0], lines


def _draw(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)] + [
        torch.rand(shape[0], generator=g, dtype=torch.float64).to(dtype)]


@pytest.mark.parametrize("use", ["both", "x_t only", "v only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 3, 23, 19), (2, 4, 1, 1), (4, 70000)], ids=lambda s: "x".join(map(str, s)))
def test_fm_noise_backward_kernel(shape, dtype, use):
    """Gradients of x and noise with either output unused (its gradient is undefined in the backward)."""
    x, e, gxt, gv, t = _draw(shape, dtype)

    def grads(fn, x, e, t, gxt, gv):
        x, e = x.detach().clone().requires_grad_(), e.detach().clone().requires_grad_()
        xt, v = fn(x, e, t, 1e-3)
        outs, grad_outs = {"both": ([xt, v], [gxt, gv]), "x_t only": ([xt], [gxt]), "v only": ([v], [gv])}[use]
        return torch.autograd.grad(outs, (x, e), grad_outs)

    ours = grads(lambda *a: fm_noise(*a, backend="cpp"), x, e, t, gxt, gv)
    ref = grads(fm_noise_ref, x.double(), e.double(), t.double(), gxt.double(), gv.double())
    same = grads(fm_noise_ref, x, e, t, gxt, gv)
    for name, a, r, s in zip(["grad x", "grad noise"], ours, ref, same):
        assert a.dtype == dtype and a.is_contiguous()
        assert_close_to_ref(a, r, dtype, s, f"{name} ({use})")


def test_fm_noise_backward_op_direct():
    x, e, gxt, gv, t = _draw((3, 2, 5, 4), torch.float64)
    op = torch.ops.dito_fast.fm_noise_backward
    s = 0.01
    tb = t.reshape(-1, 1, 1, 1)
    gx, ge = op(gxt, gv, t, s)
    torch.testing.assert_close(gx, gxt * (1 - tb) - gv)
    torch.testing.assert_close(ge, gxt * (s + tb * (1 - s)) + gv * (1 - s))
    gx, ge = op(None, gv, t, s)
    torch.testing.assert_close(gx, -gv)
    torch.testing.assert_close(ge, gv * (1 - s))
    gx, ge = op(gxt.transpose(2, 3), None, t.float(), s)  # non-contiguous grad, float32 t
    torch.testing.assert_close(gx, (gxt * (1 - tb)).transpose(2, 3).contiguous())
    with pytest.raises(RuntimeError, match="at least one of grad_xt and grad_v"):
        op(None, None, t, s)
    with pytest.raises(RuntimeError, match=r"t must have shape \(3\)"):
        op(gxt, gv, t[:2], s)
    for args in [(gxt.float(), gv.float(), t.float(), s), (None, gv.float(), t.float(), s), (gxt.float(), None, t, s)]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("op", OPS)
def test_double_backward_raises(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out = {
        "fm_noise": lambda: fm_noise(x, y, torch.rand(2, dtype=torch.float64), backend="cpp")[0],
        "fm_loss": lambda: fm_loss(x, y, backend="cpp"),
        "latent_layernorm": lambda: latent_layernorm(x, backend="cpp"),
        "group_norm_modulate_silu": lambda: group_norm_modulate_silu(x, 2, scale=y[:, :, 0, 0], backend="cpp"),
    }[op]()
    # incoming grads that require grad (square), and grads that do not but saved tensors that do
    # (sum; fm_noise is linear, so its gradient is a constant without a graph)
    for loss in [out.square().sum()] + ([] if op == "fm_noise" else [out.sum()]):
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        assert gx.requires_grad  # once differentiable: a graph exists, but differentiating it raises
        with pytest.raises(RuntimeError, match=f"{op}: double backward is not supported"):
            gx.sum().backward()
        # also when only the tensors the gradient depends on are asked for: the error node's
        # edges lead to them, so the engine cannot skip it and leave its share out (zeros)
        for wrt in (x,) if op == "latent_layernorm" else (x, y):
            (gx,) = torch.autograd.grad(loss if op == "fm_noise" else out.square().sum(), x, create_graph=True)
            with pytest.raises(RuntimeError, match=f"{op}: double backward is not supported"):
                torch.autograd.grad(gx.sum(), wrt, allow_unused=True)


NOT_DIFFERENTIABLE = ["fm_noise_backward", "fm_loss_backward", "latent_layernorm_backward",
                      "group_norm_modulate_silu_backward", "winograd_conv3x3_weight_grad", "winograd_filter",
                      "winograd_filter_adjoint"]


def _not_differentiable_args(name, grad):
    """Valid arguments for a direct call of ``name``, its first tensor requiring grad if ``grad``."""
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64) for _ in range(2))
    if name == "fm_noise_backward":
        args = [dy, x, torch.rand(2, generator=g, dtype=torch.float64), 1e-5]
    elif name == "fm_loss_backward":
        args = [torch.ones(2, dtype=torch.float64), dy, x]
    elif name == "latent_layernorm_backward":
        y, rstd = torch.ops.dito_fast.latent_layernorm(x, 1e-5)
        args = [dy, y, rstd]
    elif name == "group_norm_modulate_silu_backward":
        _, mean, rstd = torch.ops.dito_fast.group_norm_modulate_silu(x, 2, None, None, None, None, 1e-5, True)
        args = [dy, x, mean, rstd, 2, torch.randn(4, generator=g, dtype=torch.float64), None, None, None, True]
    elif name == "winograd_filter":
        args = [torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64), 2, False]
    elif name == "winograd_filter_adjoint":
        args = [torch.randn(16, 6, 4, generator=g, dtype=torch.float64)]
    else:
        args = [x, dy, 2, True]
    if grad:
        args[0] = args[0].clone().requires_grad_()
    return args


@pytest.mark.parametrize("name", NOT_DIFFERENTIABLE)
def test_ops_without_derivatives_refuse_differentiation(name):
    """The backward ops called directly: the same values, no graph without grad, and with an input
    requiring grad outputs whose differentiation raises (not the autograd fallback's warning and
    missing gradient)."""
    op = getattr(torch.ops.dito_fast, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd")
    plain = op(*_not_differentiable_args(name, grad=False))
    plain = plain if isinstance(plain, tuple) else (plain,)
    assert all(o.grad_fn is None and not o.requires_grad for o in plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's autograd fallback warns at the backward instead of raising
        outs = op(*_not_differentiable_args(name, grad=True))
        outs = outs if isinstance(outs, tuple) else (outs,)
        for a, b in zip(outs, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert outs[0].requires_grad
        with pytest.raises(RuntimeError, match=f"{name} has no derivative of its own"):
            outs[0].sum().backward()
        args = _not_differentiable_args(name, grad=True)
        out = op(*args)
        with pytest.raises(RuntimeError, match=f"{name} has no derivative of its own"):
            torch.autograd.grad((out[0] if isinstance(out, tuple) else out).sum(), args[0])
    with torch.no_grad():
        assert not op(*_not_differentiable_args(name, grad=True))[0].requires_grad


def test_no_graph_without_grad():
    """Grad mode off or no input requiring grad: outputs carry no grad_fn (the kernel is called below autograd)."""
    x = torch.randn(2, 4, 3, 3)
    assert latent_layernorm(x, backend="cpp").grad_fn is None
    with torch.no_grad():
        assert latent_layernorm(x.requires_grad_(), backend="cpp").grad_fn is None
    y, mean, rstd = torch.ops.dito_fast.group_norm_modulate_silu(x, 2, None, None, None, None, 1e-5, True)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad  # stats: not differentiable


@pytest.mark.parametrize("use", ["x_t only", "v only"])
def test_fm_noise_backward_under_compile(use):
    """torch.compile(fullgraph=True) traces the C++ backward, with one upstream gradient absent."""
    torch._dynamo.reset()
    x, e, _, _, t = _draw((2, 3, 8, 8), torch.float32)
    k = 0 if use == "x_t only" else 1

    def f(a, b):
        return fm_noise(a, b, t, 1e-3, backend="cpp")[k].square().sum()

    ins_c = [x.clone().requires_grad_(), e.clone().requires_grad_()]
    ins_e = [x.clone().requires_grad_(), e.clone().requires_grad_()]
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*ins_c)
    out_e = f(*ins_e)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(torch.autograd.grad(out_c, ins_c), torch.autograd.grad(out_e, ins_e))


def _func_cases():
    """(name, make, p) for each op with C++ autograd formulas: make(backend) is a function of p
    (an input or the weight) returning a scalar, computed with that backend (None: automatic)."""
    from dito_fast.ops import conv3x3

    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w, b, s, sh = r(2, 32, 6, 5), r(32), r(32), r(2, 32), r(2, 32)
    e, t, xc, wc, bc = r(2, 32, 6, 5), torch.rand(2, generator=g, dtype=torch.float64), r(2, 32, 7, 6), r(32, 32, 3, 3), r(32)
    xc = xc.contiguous(memory_format=torch.channels_last)
    wy, wc_y = r(2, 32, 6, 5), r(2, 32, 7, 6)
    return [
        ("group_norm_modulate_silu", lambda be: lambda p: (group_norm_modulate_silu(p, 4, w, b, s, sh, backend=be) * wy).sum(), x),
        ("latent_layernorm", lambda be: lambda p: (latent_layernorm(p, backend=be) * wy).sum(), x),
        ("fm_noise+fm_loss", lambda be: lambda p: fm_loss(*fm_noise(p, e, t, backend=be), backend=be).sum(), x),
        ("conv3x3", lambda be: lambda p: (conv3x3(xc, p, bc, backend=be) * wc_y).sum(), wc),
    ]


@pytest.mark.parametrize("case", _func_cases(), ids=lambda c: c[0])
def test_torch_func_transforms_use_the_reference(case):
    """Under torch.func the C++ autograd formulas cannot run: the dispatchers choose the reference,
    whose gradient equals the C++ backend's outside the transform; asking for cpp explicitly names
    why it cannot run."""
    _, make, p = case
    ours = torch.func.grad(make(None))(p)
    q = p.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(make("cpp")(q), (q,))
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(make("cpp"))(p)


def test_vmap_over_the_norm_block():
    """vmap of the per-sample norm block equals the batched op (the reference runs under vmap)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 5, 4, generator=g)
    per_sample = torch.func.vmap(lambda xx: group_norm_modulate_silu(xx[None], 2)[0])(x)
    torch.testing.assert_close(per_sample, group_norm_modulate_silu(x, 2, backend="cpp"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", _func_cases(), ids=lambda c: c[0])
def test_forward_ad_uses_the_reference(case):
    """With a forward-AD level open the dispatchers choose the reference, whose directional
    derivative equals the C++ backend's gradient dotted with the tangent; asking for cpp explicitly
    names why it cannot run (the fused ops have no forward-mode formulas: they used to drop the
    tangent silently)."""
    import torch.autograd.forward_ad as fwAD

    _, make, p = case
    tangent = torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype)
    q = p.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(make("cpp")(q), (q,))
    with fwAD.dual_level():
        jvp = fwAD.unpack_dual(make(None)(fwAD.make_dual(p, tangent))).tangent
        with pytest.raises(RuntimeError, match="forward-mode AD is active"):
            make("cpp")(fwAD.make_dual(p, tangent))
    assert jvp is not None
    torch.testing.assert_close(jvp, (grad * tangent).sum(), rtol=1e-9, atol=1e-9)


def _node_cases():
    """(op, run, inputs, saved, node): run(*inputs) -> the op's differentiable output, computed by
    the C++ backend; saved: how many tensors its backward node saves; node: that node's name."""
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    t = torch.rand(2, generator=g, dtype=torch.float64)
    return [
        ("fm_noise", lambda x, e: torch.add(*fm_noise(x, e, t, backend="cpp")), (r(2, 4, 3, 3), r(2, 4, 3, 3)), 1,
         "FmNoiseBackward"),  # saves t
        ("fm_loss", lambda p, y: fm_loss(p, y, backend="cpp"), (r(2, 4, 3, 3), r(2, 4, 3, 3)), 2,
         "FmLossBackward"),
        ("latent_layernorm", lambda z: latent_layernorm(z, backend="cpp"), (r(2, 4, 3, 3),), 2,
         "LatentLayerNormBackward"),  # y, rstd
        ("group_norm_modulate_silu", lambda x, w, b, s, sh: group_norm_modulate_silu(x, 2, w, b, s, sh, backend="cpp"),
         (r(2, 4, 3, 3), r(4), r(4), r(2, 4), r(2, 4)), 7, "GroupNormModulateSiluBackward"),  # x, mean, rstd, 4 params
    ]


@pytest.mark.parametrize("case", _node_cases(), ids=lambda c: c[0])
def test_backward_nodes_save_like_aten_ops(case):
    """The backward nodes keep their tensors as SavedVariables: saved-tensor hooks see each of them
    (so activation checkpointing and offloading work), non-reentrant checkpointing gives the same
    gradients, and a second backward through a freed graph raises autograd's own error."""
    from torch.utils.checkpoint import checkpoint

    op, run, inputs, saved, node_name = case
    weight = torch.randn(run(*inputs).shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    loss = lambda *a: (run(*a) * weight).sum()  # noqa: E731
    expected = torch.autograd.grad(loss(*inputs), inputs)

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x.shape) or x, lambda x: x):
        out = run(*inputs)
    assert len(packed) == saved, packed
    node = out.grad_fn.next_functions[0][0] if op == "fm_noise" else out.grad_fn  # fm_noise: below the add
    assert node.name() == f"dito_fast::{node_name}"
    got = torch.autograd.grad(checkpoint(loss, *inputs, use_reentrant=False), inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    value = loss(*inputs)
    torch.autograd.grad(value, inputs, retain_graph=True)
    again = torch.autograd.grad(value, inputs)  # the retained graph runs again, alike
    for a, b in zip(again, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(value, inputs)


@pytest.mark.parametrize("op", OPS)
def test_direct_op_call_refuses_forward_ad(op):
    """Called through torch.ops (no dispatcher to fall back), a dual input raises instead of the
    tangent being dropped."""
    import torch.autograd.forward_ad as fwAD

    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    call = {
        "fm_noise": lambda a: torch.ops.dito_fast.fm_noise(a, y, torch.rand(2), 1e-5),
        "fm_loss": lambda a: torch.ops.dito_fast.fm_loss(a, y),
        "latent_layernorm": lambda a: torch.ops.dito_fast.latent_layernorm(a, 1e-5),
        "group_norm_modulate_silu": lambda a: torch.ops.dito_fast.group_norm_modulate_silu(a, 2, None, None, None,
                                                                                            None, 1e-5, True),
    }[op]
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=f"{op}: forward-mode AD"):
        call(fwAD.make_dual(x, torch.ones_like(x)))


def test_direct_op_call_under_torch_func():
    """Through torch.ops (no dispatcher to fall back): vmap without gradients runs (functorch's
    per-sample fallback), while recording a backward node under a transform raises."""
    op = torch.ops.dito_fast.latent_layernorm.default
    x = torch.randn(3, 2, 4, 3, 3)
    per_sample = torch.func.vmap(lambda a: op(a, 1e-5)[0])(x)
    torch.testing.assert_close(per_sample[1], op(x[1], 1e-5)[0])
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda a: op(a, 1e-5)[0].square().sum())(x[0])


def _layouts():
    """4-d layouts of one (2, 8, 4, 6) float32 activation: name -> tensor. The slices are not dense
    (the kernels copy them, conv3x3 reads "cl slice" in place); "cl slice" is channels_last-ordered
    but not dense: suggest_memory_format() says channels_last, where the fakes once said contiguous."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 8, 8, 6, generator=g)
    cl = base.contiguous(memory_format=torch.channels_last)
    return {
        "contiguous": base[:, :, :4].contiguous(),
        "channels_last": cl[:, :, :4].contiguous(memory_format=torch.channels_last),
        "cl slice": cl[:, :, ::2],
        "nchw slice": base[:, :, ::2],
        "transposed": base[:, :, :6, :4].transpose(2, 3),
        "1x1 channels_last": torch.randn(2, 8, 1, 1, generator=g).contiguous(memory_format=torch.channels_last),
    }


def _op_calls(x):
    """(name, op, args) for every C++ op, forward and backward, on activation x (2, 8, H, W)."""
    g = torch.Generator().manual_seed(8)
    B, C = x.shape[:2]
    like = lambda: torch.randn(x.shape, generator=g).to(memory_format=torch.contiguous_format)  # noqa: E731
    t, w, b, s, sh = torch.rand(B, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g), \
        torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
    ops = torch.ops.dito_fast
    from dito_fast.ops.conv3x3 import winograd_filter

    u = winograd_filter(torch.randn(6, C, 3, 3, generator=g), 2)  # (16, 6, C)
    y, mean, rstd = ops.group_norm_modulate_silu(x, 4, w, b, s, sh, 1e-5, True)
    z, zr = ops.latent_layernorm(x, 1e-5)
    return [
        ("fm_noise", ops.fm_noise, (x, like(), t, 1e-5)),
        ("fm_noise_backward", ops.fm_noise_backward, (x, None, t, 1e-5)),
        ("fm_loss", ops.fm_loss, (x, like())),
        ("fm_loss_backward", ops.fm_loss_backward, (torch.ones(B), x, like())),
        ("latent_layernorm", ops.latent_layernorm, (x, 1e-5)),
        ("latent_layernorm_backward", ops.latent_layernorm_backward, (x, z, zr)),
        ("group_norm_modulate_silu", ops.group_norm_modulate_silu, (x, 4, w, b, s, sh, 1e-5, True)),
        ("group_norm_modulate_silu_backward", ops.group_norm_modulate_silu_backward,
         (torch.randn_like(y), x, mean, rstd, 4, w, b, s, sh, True)),
        ("winograd_conv3x3", ops.winograd_conv3x3, (x, u, torch.randn(6, generator=g), False)),
        ("winograd_conv3x3 transposed", ops.winograd_conv3x3, (x, u.transpose(1, 2), None, True)),
    ]


@pytest.mark.parametrize("layout", list(_layouts()))
def test_output_strides_match_the_fakes(layout):
    """Every C++ op gives outputs with the strides its fake kernel promises, for dense, sliced and
    ambiguous (size-1) layouts of its activation argument: torch.compile plans buffers from the
    fakes, so a mismatch is a wrong-stride bug under compile. opcheck checks the same and more."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _layouts()[layout]
    for name, op, args in _op_calls(x):
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real, fake = ([real], [fake]) if isinstance(real, torch.Tensor) else (real, fake)
        for i, (r, f) in enumerate(zip(real, fake)):
            if r is None or f is None:
                continue
            assert r.shape == f.shape and r.stride() == f.stride(), \
                f"{name} output {i} on a {layout} input: real strides {r.stride()}, fake {f.stride()}"
        if layout in ("cl slice", "1x1 channels_last"):
            torch.library.opcheck(op, args)


def test_jvp_of_the_norm_block_on_channels_last_input():
    """torch's group_norm has no jvp for channels_last input ("view size is not compatible"): the
    reference, which the dispatcher takes under torch.func, gives it a contiguous copy; the result
    keeps x's layout and equals the jvp on the contiguous input."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 5, 4, generator=g, dtype=torch.float64)
    w, b, s, sh = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((8,), (8,), (2, 8), (2, 8)))
    tangent = torch.randn(x.shape, generator=g, dtype=torch.float64)
    fn = lambda a: group_norm_modulate_silu(a, 2, w, b, s, sh)  # noqa: E731
    out, jvp = torch.func.jvp(fn, (x.contiguous(memory_format=torch.channels_last),),
                              (tangent.contiguous(memory_format=torch.channels_last),))
    ref_out, ref_jvp = torch.func.jvp(fn, (x,), (tangent,))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(jvp, ref_jvp, rtol=0, atol=1e-12)


def test_ops_refuse_wrong_statistics_and_mixed_devices():
    """The backward reads B * groups values of mean and rstd (a shorter pair had been read past
    its end, giving NaN); a meta tensor among CPU ones reached the fake kernels, which had returned
    uninitialised CPU tensors."""
    x = torch.randn(4, 8, 3, 3)
    y, mean, rstd = torch.ops.dito_fast.group_norm_modulate_silu(x, 4, None, None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"mean and rstd must have shape \(4, 4\)"):
        torch.ops.dito_fast.group_norm_modulate_silu_backward(torch.ones_like(y), x, mean[:1, :1], rstd[:1, :1], 4,
                                                              None, None, None, None, True)
    with pytest.raises(TypeError, match="mean must be a floating tensor"):
        torch.ops.dito_fast.group_norm_modulate_silu_backward(torch.ones_like(y), x, mean.long(), rstd, 4,
                                                              None, None, None, None, True)
    with pytest.raises(RuntimeError, match="t is on meta but x is on cpu"):
        torch.ops.dito_fast.fm_noise(x, x, torch.rand(4, device="meta"), 1e-5)
    with pytest.raises(RuntimeError, match="weight is on meta but x is on cpu"):
        torch.ops.dito_fast.group_norm_modulate_silu(x, 4, torch.ones(8, device="meta"), None, None, None, 1e-5, True)


@pytest.mark.parametrize("shape", [(3, 64, 16, 16, 8), (1, 220, 24, 24, 10)], ids=["batch3", "batch1_wide"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_ops_do_not_depend_on_the_thread_count(channels_last, shape):
    """group_norm_modulate_silu and latent_layernorm, forward and backward: bitwise the same on one
    and on two threads (fixed chunking of every sum). One channels_last sample runs as one task on
    one thread and split over row chunks on two (the chunks' sums stored, then added in order)."""
    B, C, H, W, G = shape
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, C, H, W, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    p = [torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(B, C, generator=g),
         torch.randn(B, C, generator=g)]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_() for t in (x, *p)]
            y = group_norm_modulate_silu(leaves[0], G, *leaves[1:], backend="cpp")
            z = leaves[0].detach().clone().requires_grad_()
            w = latent_layernorm(z, backend="cpp")
            (y * y).sum().backward()
            (w * w.detach().flip(-1)).sum().backward()
            results.append([y, w] + [t.grad for t in leaves] + [z.grad])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)
