"""Fréchet Inception Distance (FID, Heusel et al. 2017): the Fréchet distance between Gaussians
fitted to Inception-v3 pool features of two image sets. Tokenizer papers (DiTo among them) report
rFID: the reconstructions of a validation set against the set itself.

Three parts, each usable alone:
- :class:`FeatureStats` accumulates the mean and covariance of feature vectors in float64, one
  batch at a time, and saves/loads them (safetensors; pytorch-fid's ``.npz`` read as well);
- :func:`frechet_distance` of two (mean, covariance) pairs, exact for singular covariances;
- :class:`InceptionFeatures`, the Inception-v3 network of the FID convention (TensorFlow's 2015
  graph as pytorch-fid ports it: average pools that exclude padding, a max pool in the last
  block), giving the 2048 pool features of images in [-1, 1].

No weights ship with the package and nothing is downloaded: :meth:`InceptionFeatures.from_file`
loads pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read with ``weights_only=True``) or
a safetensors copy of it. FID values are comparable only between runs that use the same network,
weights, image size and resizing; ours follow pytorch-fid (bilinear resize to 299x299).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import check_unit_range

logger = logging.getLogger(__name__)

FID_DIM = 2048  # pool features of Inception-v3
FID_INPUT_SIZE = 299  # images are resized (bilinear) to this side before the network


# --------------------------------------------------------------------------------------------
# statistics and distance


class FeatureStats:
    """Running mean and covariance of feature vectors of dimension ``dim``, in float64.

    ``update(features)`` takes (N, dim) batches of any floating dtype and device. Sums are kept
    around a shift (the first batch's mean), so the covariance does not lose digits to the
    squared mean. ``cov`` is the unbiased estimate (divisor n - 1, as ``numpy.cov``), which FID
    implementations use. ``info`` ({str: str}) says how the features were made (the commands
    record the network's fingerprint and the image size there); saved with them in safetensors
    files (pytorch-fid's ``.npz`` has no place for it).
    """

    def __init__(self, dim: int = FID_DIM):
        if int(dim) < 1:
            raise ValueError(f"FeatureStats: dim must be positive, got {dim}")
        self.dim = int(dim)
        self.n = 0
        self._shift: torch.Tensor | None = None
        self._sum = torch.zeros(self.dim, dtype=torch.float64)
        self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # loaded (mean, cov)
        self.info: dict[str, str] = {}

    def update(self, features: torch.Tensor) -> None:
        """Add the rows of ``features`` (N, dim), floating and finite."""
        if self._fixed is not None:
            raise RuntimeError("FeatureStats: these statistics were loaded from a file and cannot be updated")
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(f"FeatureStats.update: expected a floating tensor (N, {self.dim}), got "
                            f"{getattr(features, 'dtype', type(features).__name__)}")
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: expected (N, {self.dim}) features, got {tuple(features.shape)}")
        f = features.detach().to("cpu", torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("FeatureStats.update: features contain NaN or inf")
        if f.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = f.mean(0)
        f = f - self._shift
        self.n += f.shape[0]
        self._sum += f.sum(0)
        self._outer += f.T @ f

    def all_reduce(self, ctx, device: torch.device) -> None:
        """Make these the statistics of every rank's features together (``ctx``: a
        :class:`~dito_fast.train.distributed.DistContext`; ``device``: where this rank's
        collectives run, its GPU under NCCL). Exact: each rank's scatter matrix is moved to the
        common mean before the sum. A rank with no features takes part with none."""
        from ..train.distributed import all_reduce_

        if not ctx.distributed:
            return
        if self._fixed is not None:
            raise RuntimeError("FeatureStats: these statistics were loaded from a file and cannot be reduced")
        n = all_reduce_(torch.tensor([float(self.n)], dtype=torch.float64, device=device), ctx)
        total = int(n.item())
        if total == 0:
            return
        local_mean = self.mean if self.n else torch.zeros(self.dim, dtype=torch.float64)
        mean = all_reduce_((self.n * local_mean).to(device), ctx).cpu() / total
        scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        if self.n:
            d = self._sum / self.n  # this rank's mean around its shift
            gap = local_mean - mean
            scatter = self._outer - self.n * torch.outer(d, d) + self.n * torch.outer(gap, gap)
        scatter = all_reduce_(scatter.to(device), ctx).cpu()
        self.n, self._shift = total, mean
        self._sum = torch.zeros(self.dim, dtype=torch.float64)
        self._outer = scatter

    @property
    def mean(self) -> torch.Tensor:
        """(dim,) float64."""
        if self._fixed is not None:
            return self._fixed[0]
        if self.n == 0:
            raise ValueError("FeatureStats: no features added")
        return self._shift + self._sum / self.n

    @property
    def cov(self) -> torch.Tensor:
        """(dim, dim) float64, unbiased; needs at least 2 samples."""
        if self._fixed is not None:
            return self._fixed[1]
        if self.n < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 samples, have {self.n}")
        m = self._sum / self.n
        return (self._outer - self.n * torch.outer(m, m)) / (self.n - 1)

    def save(self, path: str | os.PathLike) -> None:
        """Write mean (mu), covariance (sigma) and count, atomically: as ``.npz`` when the name
        ends so (pytorch-fid's format, without the count), otherwise as safetensors."""
        from ..train.checkpoint import _atomic, save_safetensors

        path = Path(path)
        mu, sigma = self.mean.contiguous(), self.cov.contiguous()
        if path.suffix == ".npz":
            def write(tmp):
                with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                    np.savez(f, mu=mu.numpy(), sigma=sigma.numpy())
            _atomic(path, write)
        else:
            meta = {"n": str(self.n), "kind": "dito_fast.FeatureStats",
                    **{f"info.{k}": str(v) for k, v in self.info.items()}}
            save_safetensors({"mu": mu, "sigma": sigma}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Statistics saved by :meth:`save`: safetensors, or an ``.npz`` archive with arrays
        ``mu`` and ``sigma`` (pytorch-fid's ``--save-stats``; told apart by their first bytes),
        read without unpickling."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics {path}: no such file")
        try:
            with open(path, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04"
            if is_zip:
                with np.load(path, allow_pickle=False) as data:
                    arrays = {k: torch.from_numpy(data[k]) for k in ("mu", "sigma") if k in data.files}
                n, meta = 0, {}
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    arrays = {k: f.get_tensor(k) for k in ("mu", "sigma") if k in f.keys()}
                    meta = f.metadata() or {}
                    n = int(meta.get("n", 0))
        except Exception as e:  # neither format, truncated, an object array (not unpickled), ...
            raise ValueError(f"feature statistics {path}: cannot be read ({e})") from None
        missing = [k for k in ("mu", "sigma") if k not in arrays]
        if missing:
            raise ValueError(f"feature statistics {path}: missing array {', '.join(missing)} (expected mu and sigma)")
        mu, sigma = arrays["mu"], arrays["sigma"]
        if mu.dim() != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"feature statistics {path}: expected mu (d,) and sigma (d, d), got "
                             f"{tuple(mu.shape)} and {tuple(sigma.shape)}")
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
            raise ValueError(f"feature statistics {path}: mu or sigma holds NaN or inf")
        problem = _covariance_problem(sigma.double())
        if problem:
            raise ValueError(f"feature statistics {path}: sigma is not a covariance matrix ({problem})")
        stats = cls(mu.shape[0])
        stats.n = n
        stats._fixed = (mu.double(), sigma.double())
        stats.info = {k[len("info."):]: v for k, v in meta.items() if k.startswith("info.")}
        return stats


def comparability(a: dict, b: dict, names: tuple[str, str] = ("a", "b")) -> tuple[list, list]:
    """(errors, warnings) for comparing two sets of statistics by what their ``info`` dicts
    record: features of different networks are not comparable (an error); images of different
    sizes were preprocessed differently (a warning). What one side does not record is not compared."""
    errors, warnings = [], []
    for key, out, what in (("network", errors, "Inception weights"), ("size", warnings, "image sizes (--size)")):
        va, vb = a.get(key), b.get(key)
        if va is not None and vb is not None and va != vb:
            out.append(f"{names[0]} and {names[1]} were made with different {what} ({key} {va} and {vb})")
    return errors, warnings


def _covariance_problem(sigma: torch.Tensor) -> str:
    """Why the float64 matrix ``sigma`` is not a covariance (symmetric positive semi-definite, up
    to float32 rounding at its scale), or "": another file's matrix (sigma = -I had given a
    plausible FID)."""
    scale = float(sigma.diagonal().abs().max()) if sigma.numel() else 0.0
    tol = 1e-5 * max(scale, 1e-30)
    asym = float((sigma - sigma.T).abs().max()) if sigma.numel() else 0.0
    if asym > tol:
        return f"not symmetric: entries differ from their transposes by up to {asym:.3g}"
    lowest = float(torch.linalg.eigvalsh((sigma + sigma.T) / 2)[0]) if sigma.numel() else 0.0
    if lowest < -1e-4 * max(float(sigma.diagonal().sum()), 1e-30) or (scale == 0 and lowest < 0):
        return f"not positive semi-definite: smallest eigenvalue {lowest:.3g}"
    return ""


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative rounding-level
    eigenvalues set to 0)."""
    e, u = torch.linalg.eigh((a + a.T) / 2)
    return (u * e.clamp_min(0).sqrt()) @ u.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein) distance squared between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.

    The trace of the matrix square root is taken as the sum of the square roots of the
    eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2) (similar to sigma1 sigma2, and symmetric), so
    it is exact also for singular covariances (fewer samples than dimensions), where a general
    matrix square root needs an offset on the diagonal. Covariances must be symmetric PSD.
    """
    mu1, mu2 = torch.as_tensor(mu1).double().cpu(), torch.as_tensor(mu2).double().cpu()
    sigma1, sigma2 = torch.as_tensor(sigma1).double().cpu(), torch.as_tensor(sigma2).double().cpu()
    d = mu1.shape[0] if mu1.dim() == 1 else -1
    for name, m in (("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if d < 0 or m.shape != ((d,) if name == "mu2" else (d, d)):
            raise ValueError(f"frechet_distance: shapes do not match: mu1 {tuple(mu1.shape)}, mu2 "
                             f"{tuple(mu2.shape)}, sigma1 {tuple(sigma1.shape)}, sigma2 {tuple(sigma2.shape)}")
    r = _sqrt_psd(sigma1)
    middle = torch.linalg.eigvalsh((r @ sigma2 @ r + (r @ sigma2 @ r).T) / 2)
    tr_sqrt = middle.clamp_min(0).sqrt().sum()
    dist = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt
    return float(dist.clamp_min(0))


# --------------------------------------------------------------------------------------------
# the network: Inception-v3 as the FID convention runs it (Szegedy et al. 2016)


class _ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # 3x3 average over the window's in-image pixels only
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _ReductionB(nn.Module):  # 35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # 17x17, factorised 7x7: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | pool-1x1
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _ReductionD(nn.Module):  # 17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    """8x8, expanded filter bank: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1. The FID
    network's first E block pools by average (padding excluded), its second by max."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class InceptionFeatures(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> Inception-v3 pool features (B, 2048), float32.

    Images of any size are resized to 299x299 (bilinear, as pytorch-fid; the network's inputs
    are images in [-1, 1], so ours need no other scaling). Module names follow the torchvision /
    pytorch-fid state dict, so their weight file loads as it is (its 1008-way classifier ``fc.*``
    is not used). Built with random weights: use :meth:`from_file` for FID.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)  # -> 256
        self.Mixed_5c = _BlockA(256, pool_features=64)  # -> 288
        self.Mixed_5d = _BlockA(288, pool_features=64)  # -> 288
        self.Mixed_6a = _ReductionB(288)  # -> 768, 17x17
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _ReductionD(768)  # -> 1280, 8x8
        self.Mixed_7b = _BlockE(1280, max_pool=False)  # -> 2048
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionFeatures: expected images (B, 3, H, W), got {tuple(x.shape)}")
        check_unit_range("InceptionFeatures", "x", x)
        x = x.to(self.Conv2d_1a_3x3.conv.weight.device, torch.float32)
        x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # 35x35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean((2, 3))

    @classmethod
    def from_file(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "InceptionFeatures":
        """The FID network with the weights in ``path``: pytorch-fid's
        ``pt_inception-2015-12-05-6726825d.pth`` (a state dict, read with ``weights_only=True``:
        nothing is unpickled) or a ``.safetensors`` file with the same names. Names and shapes are
        checked; the file's 1008-way classifier (``fc.*``) and BatchNorm's ``num_batches_tracked``
        are ignored. torchvision's ImageNet Inception weights (same layer names, another network)
        are refused."""
        from ..models._pretrained import state_mismatch
        from ._weights import read_state_dict

        state = read_state_dict(path, "Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
        fc = state.get("fc.weight")
        if any(k.startswith("AuxLogits.") for k in state) or (fc is not None and tuple(fc.shape) != (1008, 2048)):
            # torchvision's ImageNet Inception has the same layer names, but another network and
            # input scaling: its features give FID values comparable with nothing published
            raise ValueError(f"Inception weights {path}: these are not the FID network's (an auxiliary classifier "
                             f"or a {tuple(fc.shape) if fc is not None else '?'} classifier: torchvision's ImageNet "
                             "Inception?); use pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
        state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        model = cls()
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        problem = state_mismatch(expected, state)
        if problem:
            raise ValueError(f"Inception weights {path} do not match the FID Inception-v3: {problem}")
        model.load_state_dict(state, strict=False)
        logger.info("InceptionFeatures: loaded %s", path)
        return model.to(map_location).eval()

    def fingerprint(self) -> str:
        """A short hash of every weight (what the statistics' ``info["network"]`` records)."""
        import hashlib

        h = hashlib.sha256()
        with torch.no_grad():
            for name, t in self.state_dict().items():
                h.update(f"{name}{tuple(t.shape)}".encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
