"""Tests for dito_fast/eval/lpips.py: LPIPS's layout, its formula, weight loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dito_fast.eval.lpips import LPIPS, TAP_CHANNELS


def _lpips_with_random_weights(seed=0) -> LPIPS:
    torch.manual_seed(seed)
    net = LPIPS()
    with torch.no_grad():
        for k in range(len(TAP_CHANNELS)):
            getattr(net, f"lin{k}").weight.uniform_(0, 0.1)  # the calibrated layers are non-negative
    return net


def test_layout_matches_vgg16():
    net = LPIPS()
    # torchvision documents vgg16 at 138,357,544 parameters; its classifier holds
    # 25088*4096 + 4096 + 4096*4096 + 4096 + 4096*1000 + 1000 of them; LPIPS adds 1472 weights
    classifier = 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert sum(p.numel() for p in net.parameters()) == 138_357_544 - classifier + sum(TAP_CHANNELS)
    taps = net.taps(torch.zeros(1, 3, 64, 48))
    assert [tuple(t.shape) for t in taps] == [(1, 64, 64, 48), (1, 128, 32, 24), (1, 256, 16, 12), (1, 512, 8, 6),
                                            (1, 512, 4, 3)]
    assert all(k.startswith(("features.", "lin")) for k in net.state_dict())


def test_distance_against_a_direct_computation():
    net = _lpips_with_random_weights()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 40, 36, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        got = net(x, y)
        # the definition, written out: VGG taps of the scaled inputs, unit-length feature
        # vectors, squared differences weighted per channel, mean over positions, sum of layers
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        expected = torch.zeros(2)
        for k, (a, b) in enumerate(zip(net.taps(x), net.taps(y))):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            w = getattr(net, f"lin{k}").weight.view(1, -1, 1, 1)
            expected += ((a - b) ** 2 * w).sum(1).mean((1, 2))
        # the first tap against torchvision's first two layers run by hand
        h = F.relu(net.features["2"](F.relu(net.features["0"]((x - shift) / scale))))
        assert torch.allclose(net.taps(x)[0], h, atol=1e-6)
    assert got.shape == (2,) and torch.allclose(got, expected, rtol=1e-5)
    assert (got > 0).all() and torch.equal(net(x, x), torch.zeros(2))
    # closer images, smaller distance
    assert (net(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)) < got).all()
    with pytest.raises(ValueError, match="at least 16x16"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"one shape \(B, 3, H, W\)"):
        net(x, y[:1])


def test_from_files(tmp_path):
    net = _lpips_with_random_weights(2)
    vgg = {f"features.{k[len('features.'):]}": v for k, v in net.state_dict().items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file has the classifier: ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    # the lpips package's names: lin<k>.model.1.weight (a dropout before the 1x1 convolution)
    torch.save({f"lin{k}.model.1.weight": getattr(net, f"lin{k}").weight.detach().clone()
                for k in range(len(TAP_CHANNELS))}, tmp_path / "vgg.pth")
    loaded = LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    x, y = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x, y), net(x, y))
    with pytest.raises(ValueError, match="do not match VGG16 / LPIPS v0.1: missing .*lin0.weight"):
        LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "vgg16.pth")  # the arguments' second file wrong
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPS.from_files(tmp_path / "missing.pth", tmp_path / "vgg.pth")
