"""The cpp backend's direct entry points (dito_fast._C.<op>, csrc/module.cpp), which the dispatcher
tries first: they must compute exactly what torch.ops computes, decline (NotImplemented) every call
the cpp backend's selection would refuse or that only torch.ops serves correctly, and raise clear
errors."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from dito_fast.ops import _cpp, fm_loss, fm_noise, group_norm_modulate_silu, latent_layernorm
from dito_fast.ops._dispatch import autograd_mode_reasons

from backend_cases import CPP_REASON

pytestmark = pytest.mark.skipif(not _cpp.AVAILABLE, reason=CPP_REASON)

OPS = torch.ops.dito_fast


def _cases(dtype=torch.float32, channels_last=False):
    """(name, direct call, torch.ops call, differentiable inputs) for each op."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 8, 5, 4, generator=g, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    w, b, s, sh = r(8), r(8), r(3, 8), r(3, 8)
    e, t = r(3, 8, 5, 4), torch.rand(3, generator=g, dtype=dtype)
    pred, target = r(3, 8, 5, 4), r(3, 8, 5, 4)
    C = _cpp._C
    return [
        ("group_norm_modulate_silu", lambda: C.group_norm_modulate_silu(x, 4, w, b, s, sh, 1e-5, True),
         lambda: OPS.group_norm_modulate_silu(x, 4, w, b, s, sh, 1e-5, True)[0], (x, w, b, s, sh)),
        ("group_norm_modulate_silu (no parameters)", lambda: C.group_norm_modulate_silu(x, 2, None, None, None, None,
                                                                                      1e-3, False),
         lambda: OPS.group_norm_modulate_silu(x, 2, None, None, None, None, 1e-3, False)[0], (x,)),
        ("latent_layernorm", lambda: C.latent_layernorm(x, 1e-5), lambda: OPS.latent_layernorm(x, 1e-5)[0], (x,)),
        ("fm_noise", lambda: C.fm_noise(x, e, t, 1e-5), lambda: OPS.fm_noise(x, e, t, 1e-5), (x, e)),
        ("fm_loss", lambda: C.fm_loss(pred, target), lambda: OPS.fm_loss(pred, target), (pred, target)),
    ]


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_results_as_torch_ops(dtype, channels_last):
    for name, direct, boxed, inputs in _cases(dtype, channels_last):
        ours, theirs = _outputs(direct()), _outputs(boxed())
        assert len(ours) == len(theirs), name
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), name
            assert a.stride() == b.stride() and a.dtype == b.dtype, name
            assert a.grad_fn is not None and a.grad_fn.name() == b.grad_fn.name(), name
        grads = [torch.randn_like(o) for o in ours]
        assert all(torch.equal(p, q) for p, q in zip(torch.autograd.grad(ours, inputs, grads),
                                                      torch.autograd.grad(theirs, inputs, grads))), name
        with torch.no_grad():
            assert all(o.grad_fn is None for o in _outputs(direct())), name


def test_meta_tensors_reach_the_fake_kernels():
    # The call releases the GIL; the fake kernels are Python and take it back.
    x = torch.empty(2, 8, 3, 3, device="meta").contiguous(memory_format=torch.channels_last)
    y = _cpp._C.group_norm_modulate_silu(x, 4, None, None, torch.empty(2, 8, device="meta"), None, 1e-5, True)
    assert y.device.type == "meta" and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert _cpp._C.fm_loss(x, x).shape == (2,)


class _Recording(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_declines_where_the_cpp_backend_is_not_chosen():
    """Every mode in which _cpp.unsupported_reasons refuses the cpp backend makes the entry points
    decline too, so the dispatcher's choice (the reference there) is the same on either route."""
    C = _cpp._C
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    seen = {}

    def probe(p):
        seen["reasons"] = _cpp.unsupported_reasons(p)
        seen["direct"] = C.latent_layernorm(p, 1e-5)
        return p.sum()

    for transform in (torch.func.grad, torch.func.vmap, lambda f: lambda p: torch.func.jvp(f, (p,), (p,))):
        seen.clear()
        transform(probe)(z)
        assert seen["reasons"] and seen["direct"] is NotImplemented
    with fwAD.dual_level():
        assert autograd_mode_reasons() and C.latent_layernorm(z, 1e-5) is NotImplemented
        assert C.fm_loss(fwAD.make_dual(z, z), z) is NotImplemented
    assert not autograd_mode_reasons() and C.latent_layernorm(z, 1e-5) is not NotImplemented
    f8 = z.to(torch.float8_e4m3fn)
    assert _cpp.unsupported_reasons(f8) and C.latent_layernorm(f8, 1e-5) is NotImplemented
    assert C.group_norm_modulate_silu(z, 2, None, None, f8[:, :, 0, 0], None, 1e-5, True) is NotImplemented


def test_torch_function_overrides_are_honoured():
    """__torch_function__ (a mode, or a tensor subclass) sees the fused op as it does through
    torch.ops: the entry points decline there, and the dispatcher takes torch.ops."""
    z = torch.randn(2, 4, 3, 3)
    expected = latent_layernorm(z, backend="cpp")
    with _Recording() as mode:
        assert _cpp._C.latent_layernorm(z, 1e-5) is NotImplemented
        torch.testing.assert_close(latent_layernorm(z), expected)
    assert "dito_fast.latent_layernorm.default" in mode.seen
    sub = z.as_subclass(_Subclass)
    _Subclass.seen = []
    assert _cpp._C.latent_layernorm(sub, 1e-5) is NotImplemented
    latent_layernorm(sub)
    assert "dito_fast.latent_layernorm.default" in _Subclass.seen


def test_the_dispatcher_takes_the_direct_route(monkeypatch):
    """The public ops reach the entry points (an entry point replaced by a recorder is called) for
    the automatic choice and backend="cpp", and not for backend="ref"."""
    from dito_fast.ops import _dispatch

    calls = []
    for mod_name in ("group_norm_modulate_silu", "latent_layernorm", "fm"):
        module = __import__(f"dito_fast.ops.{mod_name}", fromlist=["_"])
        for attr in ("_BACKENDS", "_NOISE_BACKENDS", "_LOSS_BACKENDS"):
            backends = getattr(module, attr, None)
            if backends is None or backends[0].direct is None:
                continue
            first = backends[0]
            recorded = _dispatch.Backend(first.name, first.fn, first.unsupported_reasons,
                                         (lambda d, n: lambda *a: (calls.append(n), d(*a))[1])(first.direct, attr))
            monkeypatch.setattr(module, attr, [recorded, *backends[1:]])
    monkeypatch.delenv("DITO_FAST_BACKEND", raising=False)
    x = torch.randn(2, 4, 3, 3)
    t = torch.rand(2)
    for backend in (None, "cpp", "ref"):
        calls.clear()
        group_norm_modulate_silu(x, 2, backend=backend)
        latent_layernorm(x, backend=backend)
        fm_loss(*fm_noise(x, x, t, backend=backend), backend=backend)
        if backend == "ref":
            assert calls == []
        else:
            assert sorted(calls) == ["_BACKENDS", "_BACKENDS", "_LOSS_BACKENDS", "_NOISE_BACKENDS"]


def test_compiled_callers_do_not_recompile(monkeypatch):
    """Under torch.compile the dispatcher decides without the direct route and without anything
    that changes between calls: a compiled caller compiles once, whatever DIRECT_ROUTES says."""
    from dito_fast.ops import _dispatch

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    fn = torch.compile(lambda z: latent_layernorm(z) * 2, fullgraph=True, backend="eager")
    z = torch.randn(2, 4, 3, 3)
    expected = latent_layernorm(z, backend="cpp") * 2
    for route in (True, True, False, True):
        monkeypatch.setattr(_dispatch, "DIRECT_ROUTES", route)
        torch.testing.assert_close(fn(z), expected)
    torch._dynamo.reset()


def test_argument_errors():
    C = _cpp._C
    z = torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="latent_layernorm takes 2 positional arguments, got 1"):
        C.latent_layernorm(z)
    with pytest.raises(TypeError, match="latent_layernorm: z must be a tensor, got list"):
        C.latent_layernorm([1.0], 1e-5)
    with pytest.raises(TypeError, match="latent_layernorm: eps must be a float, got str"):
        C.latent_layernorm(z, "1e-5")
    with pytest.raises(TypeError, match="group_norm_modulate_silu: num_groups must be an int, got float"):
        C.group_norm_modulate_silu(z, 2.0, None, None, None, None, 1e-5, True)
    with pytest.raises(TypeError, match="group_norm_modulate_silu: silu must be a bool, got int"):
        C.group_norm_modulate_silu(z, 2, None, None, None, None, 1e-5, 1)
    with pytest.raises(TypeError, match="group_norm_modulate_silu: scale must be a tensor, got int"):
        C.group_norm_modulate_silu(z, 2, None, None, 3, None, 1e-5, True)
    # The kernels' own checks raise the Python exception types (csrc/include/dito_fast/check.h).
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\), got \(3,\)"):
        C.group_norm_modulate_silu(z, 2, torch.ones(3), None, None, None, 1e-5, True)
