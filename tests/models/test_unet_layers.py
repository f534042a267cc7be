"""Layers of the UNet decoder that are not fused ops."""

import pytest
import torch
import torch.nn.functional as F

from dito_fast.models.unet import upsample_nearest


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("factor", [2, 8])
def test_upsample_nearest_matches_interpolate_and_keeps_the_layout(channels_last, factor):
    x = torch.randn(3, 5, 4, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = upsample_nearest(x, factor)
    assert torch.equal(y, F.interpolate(x, scale_factor=factor, mode="nearest"))
    assert y.shape == (3, 5, 4 * factor, 7 * factor)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # gradients: each input value receives the sum over its factor x factor copies
    xg = x.clone().requires_grad_()
    g = torch.randn_like(y)
    upsample_nearest(xg, factor).backward(g)
    expected = F.avg_pool2d(g, factor) * factor**2
    torch.testing.assert_close(xg.grad, expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_nearest_gradcheck_double_backward_and_layout(channels_last):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: upsample_nearest(a, 2), (x,))
    assert torch.autograd.gradgradcheck(lambda a: upsample_nearest(a, 3), (x,))
    y = upsample_nearest(x, 2)
    (grad,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_nearest_gradient_of_a_channel_slice(channels_last):
    """torch.cat's backward hands each input a channel slice of its gradient (not dense in either
    layout): the block sums are right and follow the slice's layout (channels innermost: channels_last)."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    full = torch.randn(2, 7, 8, 10, dtype=torch.float64).contiguous(memory_format=fmt)
    g = full[:, 2:5]
    assert not g.is_contiguous() and not g.is_contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(upsample_nearest(x, 2), x, g)
    torch.testing.assert_close(grad, F.avg_pool2d(g, 2) * 4)
    assert grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upsample_nearest_half_gradient(dtype):
    x = torch.randn(2, 3, 4, 5, dtype=dtype, requires_grad=True)
    upsample_nearest(x, 2).sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.full_like(x, 4))


def test_upsample_nearest_under_torch_func():
    xs = torch.randn(3, 2, 3, 4, 5, dtype=torch.float64)
    per_sample = torch.func.vmap(lambda a: upsample_nearest(a, 2))(xs)
    assert torch.equal(per_sample, torch.stack([upsample_nearest(a, 2) for a in xs]))
    # d/dx sum(up(x)^2) = 2 x * (number of copies)
    grads = torch.func.vmap(torch.func.grad(lambda a: upsample_nearest(a, 2).pow(2).sum()))(xs)
    torch.testing.assert_close(grads, 8 * xs)


def test_upsample_nearest_compiles_fullgraph():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = torch.compile(lambda a: upsample_nearest(a, 2), fullgraph=True)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.full_like(x, 4))


def test_time_embedding_of_a_float64_model_is_float64_throughout(micro_config):
    """The sinusoidal features follow a float64 model (they were float32 whatever the weights,
    which limited float64 reference comparisons of the whole model to ~1e-6)."""
    import math

    from dito_fast.models.unet import UNetDecoder

    torch.manual_seed(0)
    dec = UNetDecoder(micro_config.decoder, 4, 1000.0).double()
    t = torch.tensor([0.123456789012, 0.987654321098], dtype=torch.float64)
    half = micro_config.decoder.time_freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = (t * 1000.0)[:, None] * freqs[None]
    expected = F.silu(dec.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=1)))
    torch.testing.assert_close(dec.embed_time(t), expected, rtol=1e-12, atol=1e-12)
    dec32 = UNetDecoder(micro_config.decoder, 4, 1000.0)
    assert dec32.embed_time(t.float()).dtype == torch.float32
