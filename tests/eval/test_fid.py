"""Tests for dito_fast/eval/fid.py: the Fréchet distance, feature statistics, the FID network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dito_fast.eval.fid import FID_DIM, FeatureStats, InceptionFeatures, frechet_distance


def _random_cov(d: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def test_frechet_distance_against_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    for d in (1, 7, 40):
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        s1, s2 = _random_cov(d, g), _random_cov(d, g)
        root = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
        expected = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(root))
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-11)


def test_frechet_distance_closed_forms_and_singular_covariances():
    g = torch.Generator().manual_seed(1)
    d = 30
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # a random rotation
    a, b = torch.rand(d, generator=g, dtype=torch.float64), torch.rand(d, generator=g, dtype=torch.float64)
    a[d // 2:] = 0  # rank-deficient, as with fewer samples than feature dimensions
    b[:5] = 0
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    # commuting covariances: the distance is |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    expected = float((mu ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = frechet_distance(mu, q @ torch.diag(a) @ q.T, torch.zeros(d), q @ torch.diag(b) @ q.T)
    # (a zero eigenvalue computed as ~1e-17 contributes its square root, ~3e-9: still 1e-8 relative)
    assert got == pytest.approx(expected, rel=1e-8)
    # 27 zero eigenvalues: their rounding (~1e-17 each, square roots ~3e-9) is what remains
    s = _random_cov(d, g, rank=3)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-5
    assert frechet_distance(mu, s, mu + 1, s) == pytest.approx(d, abs=1e-5)  # pure mean shift
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu, s, mu[:3], s)
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu, s, mu, s[:3])


def test_feature_stats_streaming_equals_numpy_cov():
    g = torch.Generator().manual_seed(2)
    # features far from zero (the shift keeps the covariance's digits), float32 input
    feats = (torch.randn(103, 16, generator=g) * 0.05 + 1000).float()
    stats = FeatureStats(16)
    for lo, hi in ((0, 1), (1, 40), (40, 40), (40, 103)):  # uneven batches, one empty
        stats.update(feats[lo:hi])
    ref = feats.double().numpy()
    assert stats.n == 103
    np.testing.assert_allclose(stats.mean.numpy(), ref.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-12)


def test_feature_stats_refuse_bad_input():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match="no features added"):
        stats.mean
    with pytest.raises(ValueError, match=r"expected \(N, 4\) features, got \(2, 5\)"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="floating tensor"):
        stats.update(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.update(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    stats.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples, have 1"):
        stats.cov
    with pytest.raises(ValueError, match="dim must be positive"):
        FeatureStats(0)


def test_feature_stats_save_load_and_npz(tmp_path):
    g = torch.Generator().manual_seed(3)
    stats = FeatureStats(8)
    stats.update(torch.randn(20, 8, generator=g))
    stats.save(tmp_path / "s.safetensors")
    back = FeatureStats.load(tmp_path / "s.safetensors")
    assert back.n == 20 and torch.equal(back.mean, stats.mean) and torch.equal(back.cov, stats.cov)
    with pytest.raises(RuntimeError, match="loaded from a file"):
        back.update(torch.zeros(1, 8))
    # pytorch-fid's --save-stats format, read and written; the format is told by the file's bytes
    np.savez(tmp_path / "s.npz", mu=stats.mean.numpy(), sigma=stats.cov.numpy())
    npz = FeatureStats.load(tmp_path / "s.npz")
    assert torch.equal(npz.mean, stats.mean) and torch.equal(npz.cov, stats.cov)
    stats.save(tmp_path / "ours.npz")
    with np.load(tmp_path / "ours.npz") as data:
        assert np.array_equal(data["mu"], stats.mean.numpy()) and np.array_equal(data["sigma"], stats.cov.numpy())
    (tmp_path / "s.safetensors").rename(tmp_path / "s.stats")
    assert torch.equal(FeatureStats.load(tmp_path / "s.stats").cov, stats.cov)
    np.savez(tmp_path / "bad.npz", mu=stats.mean.numpy())
    with pytest.raises(ValueError, match="missing array sigma"):
        FeatureStats.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=stats.mean.numpy(), sigma=stats.cov.numpy()[:3])
    with pytest.raises(ValueError, match=r"expected mu \(d,\) and sigma \(d, d\)"):
        FeatureStats.load(tmp_path / "shape.npz")
    # a matrix that is no covariance (another file's sigma) is refused: sigma = -I had given a plausible FID
    for sigma, match in ((-np.eye(8), "not positive semi-definite: smallest eigenvalue -1"),
                         (np.triu(np.ones((8, 8))), "not symmetric")):
        np.savez(tmp_path / "nocov.npz", mu=stats.mean.numpy(), sigma=sigma)
        with pytest.raises(ValueError, match=f"sigma is not a covariance matrix \\({match}"):
            FeatureStats.load(tmp_path / "nocov.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file of tensors")
    with pytest.raises(ValueError, match="cannot be read"):
        FeatureStats.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        FeatureStats.load(tmp_path / "missing.safetensors")


def test_inception_layout():
    net = InceptionFeatures()
    # torchvision documents inception_v3 at 27,161,264 parameters, with the auxiliary classifier
    # (768*128 + 2*128 + 128*768*25 + 2*768 + 768*1000 + 1000 = 3,326,696) and the 1000-way
    # classifier (2048*1000 + 1000); the rest is the feature network
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 - 2_049_000
    shapes = {}
    for name in ("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 48) * 2 - 1)  # any input size: resized to 299x299
    assert out.shape == (2, FID_DIM) and out.dtype == torch.float32
    assert shapes == {"Conv2d_4a_3x3": (2, 192, 71, 71), "Mixed_5d": (2, 288, 35, 35),
                      "Mixed_6e": (2, 768, 17, 17), "Mixed_7c": (2, 2048, 8, 8)}
    assert not net.training and (out >= 0).all()  # pooled ReLU outputs
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        net(torch.zeros(1, 1, 32, 32))


def test_inception_pools_exclude_padding_and_last_block_pools_by_max():
    net = InceptionFeatures()
    seen = {}
    for name in ("Mixed_7b", "Mixed_7c"):
        block = getattr(net, name)
        block.branch_pool.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0]))
    x = torch.randn(1, 1280, 8, 8)
    with torch.no_grad():
        y = net.Mixed_7b(x)
        net.Mixed_7c(y)
    # corner of a 3x3 average over in-image pixels only: 4 of them
    assert torch.allclose(seen["Mixed_7b"][0, :, 0, 0], x[0, :, :2, :2].mean((1, 2)), atol=1e-6)
    assert torch.equal(seen["Mixed_7c"][0, :, 0, 0], y[0, :, :2, :2].amax((1, 2)))


def test_inception_from_file(tmp_path):
    torch.manual_seed(0)
    net = InceptionFeatures()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = dict(net.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # pytorch-fid's file has one
    torch.save(state, tmp_path / "w.pth")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = net(x)
        assert torch.equal(InceptionFeatures.from_file(tmp_path / "w.pth")(x), expected)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
        assert torch.equal(InceptionFeatures.from_file(tmp_path / "w.safetensors")(x), expected)
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"do not match the FID Inception-v3: .*Mixed_5b.branch1x1.conv.weight"):
        InceptionFeatures.from_file(tmp_path / "bad.pth")
    # torchvision's ImageNet Inception: the same layer names, another network (refused, not loaded)
    for extra in ({"AuxLogits.fc.weight": torch.zeros(1000, 768)}, {"fc.weight": torch.zeros(1000, 2048)}):
        torch.save({**net.state_dict(), **extra}, tmp_path / "imagenet.pth")
        with pytest.raises(ValueError, match="not the FID network's .*pt_inception-2015-12-05"):
            InceptionFeatures.from_file(tmp_path / "imagenet.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # an object, not tensors: not unpickled
    with pytest.raises(ValueError, match="cannot be read"):
        InceptionFeatures.from_file(tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        InceptionFeatures.from_file(tmp_path / "missing.pth")
