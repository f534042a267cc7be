"""Reconstruction quality of a tokenizer over an image set: PSNR, SSIM and rFID.

Each image is encoded and decoded (``fast_decode``, any sampler), and original and reconstruction
are compared as 8-bit images (both rounded to 8 bits first, as when the reconstructions are saved
as PNG files and compared with the originals' crops: the usual protocol of tokenizer papers).
PSNR and SSIM are averaged over images; rFID compares the reconstructions' Inception features
with the originals' (or with reference statistics given, e.g. a training set's).

The decode noise of image ``i`` (0-based, in reading order) is seeded with ``seed + i``, so the
figures do not depend on the batch size.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import ImageTransform, SyntheticImages, builtin_split, list_image_files, load_image
from ..data.transforms import unreadable_file_error
from .fid import FeatureStats, InceptionFeatures, frechet_distance
from .metrics import SSIM_WINDOW, psnr, ssim
from .report import to_uint8

logger = logging.getLogger(__name__)

NAMED_SOURCE_IMAGES = 64  # images of "builtin" / "synthetic" without a limit


@dataclass
class ReconstructionReport:
    """What :func:`evaluate_reconstruction` measured.

    psnr / ssim: means over the images (dB; SSIM None when images are smaller than its 11x11
    window); psnr is +inf only if every reconstruction is exact. rfid: None without a feature
    network. ``psnr_per_image`` in reading order. ``skipped``: files that could not be read
    (skipped and counted, not fatal)."""

    num_images: int
    psnr: float
    ssim: float | None
    rfid: float | None
    seconds: float
    settings: dict
    psnr_per_image: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Files(Dataset):
    """Image files as (index, (3, size, size) in [-1, 1] or None, error text): an unreadable
    file is reported by the batch, not raised, so that it is skipped and counted once."""

    def __init__(self, files: list[str], size: int):
        self.files, self.transform = files, ImageTransform(size, crop="center")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.files[i])), ""
        except Exception as e:
            if not unreadable_file_error(e):
                raise
            return i, None, str(e)


class _Named(Dataset):
    """A dataset that makes its images, its items as _Files gives them."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i], ""


def _keep_all(items):
    return items


def image_batches(source: str | os.PathLike, size: int, batch_size: int, *, limit: int | None = None,
                  workers: int = 0, skipped: list | None = None) -> Iterator[torch.Tensor]:
    """Batches (b, 3, size, size) float32 in [-1, 1] of an evaluation set, each image once, in a
    fixed order: a folder's image files (recursive, sorted; resized so the shorter side is
    ``size``, center-cropped), "builtin" (the validation split of
    :func:`~dito_fast.data.builtin_split`: crops of the photographs training never sees, then
    unseen synthetic images) or "synthetic" (synthetic images of seed 1). At most ``limit``
    images (a named source makes ``limit`` of them, :data:`NAMED_SOURCE_IMAGES` by default).
    Unreadable files are logged, appended to ``skipped`` and left out. The source is checked
    here; the images are read as the batches are taken."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if os.path.isdir(source):
        files = list_image_files(source)
        if not files:
            raise ValueError(f"no image files under {source}")
        dataset: Dataset = _Files(files[:limit] if limit else files, size)
    elif source == "builtin":  # the held-out photographs' crops and unseen synthetic images
        dataset = _Named(builtin_split(size, 1, num_val=limit or NAMED_SOURCE_IMAGES)[1])
    elif source == "synthetic":
        dataset = _Named(SyntheticImages(limit or NAMED_SOURCE_IMAGES, size, seed=1))
    else:
        raise ValueError(f"data {source!r} is neither a folder nor 'builtin' or 'synthetic'")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_keep_all)
    return _good_batches(loader, dataset, skipped)


def _good_batches(loader: DataLoader, dataset: Dataset, skipped: list | None) -> Iterator[torch.Tensor]:
    for items in loader:
        good = []
        for i, x, error in items:
            if x is None:
                name = dataset.files[i]
                logger.warning("skipping unreadable image %s (%s)", name, error)
                if skipped is not None:
                    skipped.append(name)
            else:
                good.append(x)
        if good:
            yield torch.stack(good)


def _as_8bit(x: torch.Tensor) -> torch.Tensor:
    return to_uint8(x).float() / 127.5 - 1


@torch.inference_mode()
def evaluate_reconstruction(model, images: Iterable[torch.Tensor], *, features: InceptionFeatures | None = None,
                            reference: FeatureStats | None = None, seed: int = 0, progress=None,
                            **decode_options) -> tuple[ReconstructionReport, FeatureStats | None]:
    """Reconstruction metrics of ``model`` over ``images``.

    Args:
        model: a :class:`~dito_fast.DiTo` (its device is used).
        images: batches (b, 3, H, W) in [-1, 1], H and W multiples of the model's downsampling
            factor (e.g. :func:`image_batches`).
        features: the FID network (:meth:`InceptionFeatures.from_file`); None: no rFID.
        reference: feature statistics to compare the reconstructions with (``FeatureStats.load``);
            None: the originals' own (the usual rFID).
        seed: image i's decode noise is seeded with seed + i.
        progress: anything with ``update(n)``, called with each batch's image count.
        decode_options: passed to :func:`~dito_fast.fast_decode` (steps, sampler, schedule, dtype,
            max_batch, tile, ...).
    Returns:
        (report, the originals' feature statistics or None), the statistics to save as a
        reference for later runs.
    """
    from ..decode import fast_decode, resolve_settings

    device = next(model.parameters()).device
    solver = resolve_settings(decode_options.pop("sampler", "auto"), decode_options.pop("steps", None),
                              decode_options.pop("schedule", None))  # errors before any work
    decode_options.update(sampler=solver.sampler, steps=solver.steps, schedule=solver.schedule)
    real = FeatureStats() if features is not None and reference is None else None
    fake = FeatureStats() if features is not None else None
    psnrs: list[float] = []
    ssims: list[float] = []
    start = time.perf_counter()
    n = 0
    for x in images:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"evaluate_reconstruction: expected image batches (b, 3, H, W), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        x = _as_8bit(x.to(device))
        z = model.encode(x)
        recon = fast_decode(model, z, seed=list(range(seed + n, seed + n + x.shape[0])), output="float",
                            **decode_options)
        recon = _as_8bit(recon)
        psnrs += psnr(recon, x).tolist()
        if min(x.shape[-2:]) >= SSIM_WINDOW:
            ssims += ssim(recon, x).tolist()
        if fake is not None:
            fake.update(features(recon))
            if real is not None:
                real.update(features(x))
        n += x.shape[0]
        image_size = tuple(x.shape[-2:])
        if progress is not None:
            progress.update(x.shape[0])
    if n == 0:
        raise ValueError("evaluate_reconstruction: no images")
    rfid = None
    if fake is not None:
        target = reference if reference is not None else real
        if fake.n < 2 or (reference is None and real.n < 2):
            logger.warning("rFID needs at least 2 images; not computed")
        else:
            if fake.n < 2048 or (reference is None and real.n < 2048):
                logger.warning("rFID from %d images: fewer than the 2048 feature dimensions, the covariances "
                               "are singular and the value is biased high (papers use 50000)", n)
            rfid = frechet_distance(fake.mean, fake.cov, target.mean, target.cov)
    report = ReconstructionReport(
        num_images=n, psnr=float(torch.tensor(psnrs, dtype=torch.float64).mean()),
        ssim=float(sum(ssims) / len(ssims)) if ssims else None, rfid=rfid, seconds=time.perf_counter() - start,
        settings={"model": model.config.name, "image_size": list(image_size), "seed": seed, "nfe": solver.nfe,
                  **{k: v if isinstance(v, (bool, int, float, str)) else str(v)
                     for k, v in decode_options.items() if v is not None}},
        psnr_per_image=psnrs)
    return report, real
