"""latent_layernorm: the C++ backend against the float64 reference, gradcheck, opcheck, compile."""

from __future__ import annotations

import pytest
import torch

from dito_fast.ops import latent_layernorm, latent_layernorm_ref

from backend_cases import CPP_REASON, assert_close_to_ref

needs_cpp = pytest.mark.skipif(bool(CPP_REASON), reason=CPP_REASON)
SHAPES = [(3, 4, 23, 19), (1, 4, 8, 8), (2, 37, 5, 7), (5, 8, 1, 1), (2, 16, 64, 64)]


def _grads(fn, z, **kw):
    z = z.detach().clone().requires_grad_()
    y = fn(z, 1e-5, **kw)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(y.dtype)
    y.backward(g)
    return y.detach(), z.grad


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cpp_matches_reference(shape, dtype, layout):
    z = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1).to(dtype)
    if layout == "channels_last":
        z = z.to(memory_format=torch.channels_last)
    elif layout == "strided":
        z = torch.cat([z, z], dim=2)[:, :, ::2]
    y, gz = _grads(latent_layernorm, z, backend="cpp")
    y64, gz64 = _grads(latent_layernorm_ref, z.double())
    yt, gzt = _grads(latent_layernorm_ref, z)  # torch's own layer norm in this dtype
    assert y.dtype == dtype and gz.dtype == dtype
    assert_close_to_ref(y, y64, dtype, yt, "y")
    assert_close_to_ref(gz, gz64, dtype, gzt, "grad z")
    if layout == "channels_last" and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)


@needs_cpp
def test_gradcheck_opcheck_compile():
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: latent_layernorm(a, backend="cpp"), (z,))
    zf = torch.randn(2, 4, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.dito_fast.latent_layernorm, (zf, 1e-5))
    y, rstd = torch.ops.dito_fast.latent_layernorm(zf.detach(), 1e-5)
    torch.library.opcheck(torch.ops.dito_fast.latent_layernorm_backward, (torch.randn_like(y), y, rstd))
    torch._dynamo.reset()
    f = lambda a: (latent_layernorm(a, backend="cpp") * torch.arange(9.0).reshape(3, 3)).sum()  # noqa: E731
    a1, a2 = zf.detach().clone().requires_grad_(), zf.detach().clone().requires_grad_()
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(a1)
    out_e = f(a2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(a1.grad, a2.grad)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=needs_cpp)])
def test_errors(backend):
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        latent_layernorm(torch.zeros(2, 3, 4), backend=backend)
    with pytest.raises(ValueError, match="empty"):
        latent_layernorm(torch.zeros(0, 3, 4, 4), backend=backend)
    with pytest.raises(TypeError, match="z must be float32, float64, float16 or bfloat16, got torch.int64"):
        latent_layernorm(torch.zeros(1, 3, 4, 4, dtype=torch.int64), backend=backend)
