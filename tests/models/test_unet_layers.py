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
