"""Tests for dito_fast/eval: PSNR, SSIM, the bicubic baseline, image grids and PNG writing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dito_fast.eval.metrics import bicubic_baseline, psnr, ssim
from dito_fast.eval.report import make_grid, save_image, to_uint8


def test_psnr_hand_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 5, 7, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(3, 3, 5, 7, generator=g)).clamp(-1, 1)
    got = psnr(x, y)
    assert got.dtype == torch.float64 and got.shape == (3,)
    for i in range(3):
        mse = float(((x[i].double() - y[i].double()) ** 2).mean())
        assert got[i].item() == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-12)
    assert torch.isinf(psnr(x, x)).all()
    # a slight overshoot is clamped first; values far outside [-1, 1] are another range (float
    # images in 0..255 had been clamped into plausible but wrong figures)
    assert torch.isinf(psnr(torch.full((1, 3, 2, 2), 1.2), torch.ones(1, 3, 2, 2))).all()
    for metric, shape in ((psnr, (1, 3, 2, 2)), (ssim, (1, 3, 16, 16))):
        with pytest.raises(ValueError, match="y must be in \\[-1, 1\\], got values up to 255"):
            metric(torch.zeros(shape), torch.full(shape, 255.0))
        with pytest.raises(ValueError, match="x contains inf values"):  # had read "values up to 3.4e+38"
            metric(torch.full(shape, float("inf")), torch.zeros(shape))
        with pytest.raises(ValueError, match="empty batch or no channels"):
            metric(torch.zeros(0, *shape[1:]), torch.zeros(0, *shape[1:]))
        with pytest.raises(ValueError, match="empty batch or no channels"):
            metric(torch.zeros(1, 0, *shape[2:]), torch.zeros(1, 0, *shape[2:]))
    # an error of 2 everywhere (black vs white) is 0 dB
    assert psnr(-torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2)).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"one shape \(B, C, H, W\), got \(3, 3, 5, 7\) and \(3, 2, 5, 7\)"):
        psnr(x, y[:, :2])
    # a single image had given one value per channel, and uint8 images (fast_decode's default
    # output) were clamped to [-1, 1] silently (5.47 dB where the images' PSNR was 6.88)
    with pytest.raises(ValueError, match=r"one image: x\[None\]"):
        psnr(x[0], y[0])
    with pytest.raises(TypeError, match="x must be a floating tensor in \\[-1, 1\\], got torch.uint8"):
        psnr(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.ones(1, 3, 2, 2))


def test_ssim_matches_scikit_image():
    """Against an independent implementation (Wang et al.'s settings in scikit-image), on noisy and
    on blurred real photographs, odd sizes, values outside [-1, 1] clamped first."""
    metrics = pytest.importorskip("skimage.metrics")
    data = pytest.importorskip("skimage.data")
    g = torch.Generator().manual_seed(0)
    photo = torch.from_numpy(data.astronaut()[100:140, 150:187].copy()).permute(2, 0, 1).double() / 127.5 - 1
    x = torch.stack([photo, photo.flip(-1), torch.rand(3, 40, 37, generator=g, dtype=torch.float64) * 2 - 1])
    noisy = x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # partly outside [-1, 1]
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    for y in (noisy, blurred):
        got = ssim(y.float(), x.float())
        assert got.dtype == torch.float64 and got.shape == (3,)
        for i in range(3):
            want = metrics.structural_similarity(
                y[i].float().double().clamp(-1, 1).numpy(), x[i].float().double().numpy(), gaussian_weights=True,
                sigma=1.5, use_sample_covariance=False, data_range=2, channel_axis=0)
            assert got[i].item() == pytest.approx(want, abs=1e-9)
    # on the photographs a mild blur keeps more structure than this noise (not on white noise)
    assert ssim(blurred, x)[:2].min() > ssim(noisy, x)[:2].max()


def test_ssim_bounds_and_errors():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 11, 16, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert (ssim(x, torch.zeros_like(x)) < 0.05).all()  # no structure left
    assert (ssim(x, x.roll(3, -1)) < 1).all()
    with pytest.raises(ValueError, match="expected x and y of one shape"):
        ssim(x, x[:, :2])
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(x[..., :10, :], x[..., :10, :])


def test_bicubic_baseline():
    const = torch.full((2, 3, 16, 24), 0.25)
    out = bicubic_baseline(const, 8)
    assert out.shape == const.shape and torch.allclose(out, const, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    out = bicubic_baseline(x, 8)
    assert out.min() >= -1 and out.max() <= 1
    # the information is reduced: a smooth image survives far better than noise
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = (0.5 * torch.sin(math.pi * xx / 2) * torch.cos(math.pi * yy / 2)).expand(1, 3, 32, 32)
    assert psnr(bicubic_baseline(smooth, 8), smooth).item() > psnr(out, x).item() + 10
    # images smaller than the factor, or in 0..255, are refused by name (a bare torch error, a clamp before)
    with pytest.raises(ValueError, match=r"at least 8x8 pixels, got shape \(1, 3, 4, 32\)"):
        bicubic_baseline(x[..., :4, :], 8)
    with pytest.raises(ValueError, match="x must be in \\[-1, 1\\]"):
        bicubic_baseline(x * 127.5 + 127.5, 8)


def test_make_grid_layout():
    a, b = torch.full((2, 3, 4, 5), -1.0), torch.full((2, 3, 4, 5), 0.5)
    grid = make_grid([a, b], pad=2)
    assert grid.shape == (3, 2 * (4 + 2) + 2, 2 * (5 + 2) + 2)
    assert torch.all(grid[:, 2:6, 2:7] == -1) and torch.all(grid[:, 8:12, 9:14] == 0.5)
    assert torch.all(grid[:, 0:2] == 1)  # padding is white


def test_save_image_round_trip(tmp_path):
    x = torch.rand(3, 6, 10) * 2 - 1
    save_image(x, tmp_path / "sub" / "a.png")
    arr = np.array(Image.open(tmp_path / "sub" / "a.png"))
    assert arr.shape == (6, 10, 3) and arr.dtype == np.uint8
    assert torch.equal(torch.from_numpy(arr).permute(2, 0, 1), to_uint8(x))


def test_report_helpers_name_bad_input(tmp_path):
    """uint8 input to to_uint8 had been garbled ([0, 128, 255] -> [128, 255, 255]); rows of another
    batch size in make_grid had raised IndexError or been cut; save_image of a (1, 3, H, W) batch
    or a grey image had failed inside PIL."""
    with pytest.raises(TypeError, match="floating images"):
        to_uint8(torch.tensor([0, 128, 255], dtype=torch.uint8))
    assert to_uint8(torch.tensor([float("nan"), 1.0])).tolist() == [0, 255]
    with pytest.raises(ValueError, match="batches of one shape"):
        make_grid([torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4)])
    with pytest.raises(ValueError, match="batches of one shape"):
        make_grid([])
    x = torch.rand(1, 3, 6, 10) * 2 - 1
    save_image(x, tmp_path / "b.png")
    assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "b.png"))).permute(2, 0, 1), to_uint8(x[0]))
    save_image(x[:, :1], tmp_path / "grey.png")
    assert np.array(Image.open(tmp_path / "grey.png")).shape == (6, 10)
    with pytest.raises(ValueError, match=r"one image \(3, H, W\)"):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "c.png")
