"""Reconstruction quality of a tokenizer over an image set: PSNR, SSIM, LPIPS and rFID.

Each image is encoded and decoded (``fast_decode``, any sampler), and original and reconstruction
are compared as 8-bit images (both rounded to 8 bits first, as when the reconstructions are saved
as PNG files and compared with the originals' crops: the usual protocol of tokenizer papers).
PSNR, SSIM and LPIPS are averaged over images; rFID compares the reconstructions' Inception
features with the originals' (or with reference statistics given, e.g. a training set's).

The decode noise of image ``i`` (its 0-based index in the set: a folder's sorted file list) is
seeded with ``seed + i``, so the figures depend neither on the batch size nor on the number of
processes (up to float rounding in other batch shapes, which can move a pixel across an 8-bit
level: ~1e-6 of a PSNR): under torchrun each rank evaluates every world_size-th image and the
ranks' results are gathered (per-image figures, exact float64 feature statistics).
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
from .fid import FID_DIM, FeatureStats, InceptionFeatures, frechet_distance
from .lpips import LPIPS
from .metrics import SSIM_WINDOW, check_unit_range, psnr, ssim
from .report import to_uint8

logger = logging.getLogger(__name__)

NAMED_SOURCE_IMAGES = 64  # images of "builtin" / "synthetic" without a limit


@dataclass
class ReconstructionReport:
    """What :func:`evaluate_reconstruction` measured.

    psnr / ssim / lpips: means over the images (dB; SSIM None when images are smaller than its
    11x11 window, LPIPS None without its network); an exact reconstruction has an infinite PSNR,
    and so then has the mean (null in JSON): ``exact_images`` counts them. rfid: None without the
    FID network. ``per_image``: {"index", "psnr", "ssim", "lpips"} of each image, by index.
    ``skipped``: files that could not be read (skipped and counted, not fatal)."""

    num_images: int
    psnr: float
    ssim: float | None
    rfid: float | None
    lpips: float | None
    seconds: float
    exact_images: int
    settings: dict
    per_image: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Files(Dataset):
    """Image files as (index, (3, size, size) in [-1, 1] or None, error text): an unreadable
    file is reported by the batch, not raised, so that it is skipped and counted once."""

    def __init__(self, files: list[str], size: int, root: str):
        self.files, self.transform, self.root = files, ImageTransform(size, crop="center"), root

    def name(self, i: int) -> str:
        """The file's path below the folder, without its ending."""
        return os.path.splitext(os.path.relpath(self.files[i], self.root))[0]

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

    def name(self, i: int) -> str:
        return f"{i:06d}"


def _keep_all(items):
    return items


def image_batches(source: str | os.PathLike, size: int, batch_size: int, *, limit: int | None = None,
                  workers: int = 0, skipped: list | None = None, rank: int = 0, world_size: int = 1
                  ) -> "ImageBatches":
    """(indices, images (b, 3, size, size) float32 in [-1, 1]) batches of an evaluation set, each
    image once, in a fixed order (``rank`` of ``world_size`` processes: images rank, rank +
    world_size, ...): a folder's image files (recursive, sorted; resized so the shorter side is
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
        dataset: Dataset = _Files(files[:limit] if limit else files, size, os.fspath(source))
    elif source == "builtin":  # the held-out photographs' crops and unseen synthetic images
        dataset = _Named(builtin_split(size, 1, num_val=limit or NAMED_SOURCE_IMAGES)[1])
    elif source == "synthetic":
        dataset = _Named(SyntheticImages(limit or NAMED_SOURCE_IMAGES, size, seed=1))
    else:
        raise ValueError(f"image source {source!r} is neither a folder nor 'builtin' or 'synthetic'")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return ImageBatches(dataset, batch_size, workers, range(rank, len(dataset), world_size), skipped)


class ImageBatches:
    """What :func:`image_batches` returns: iterating gives (indices, images) batches;
    ``len()`` is the number of images this rank reads (unreadable files included). ``progress``:
    a progress bar (tqdm) whose ``total`` started at ``len()``; each unreadable image lowers it
    by one, so that the bar ends full (it had stopped short by the skipped files)."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, share: range, skipped: list | None):
        self.dataset, self.share, self.skipped = dataset, share, skipped
        self.progress = None
        self.loader = DataLoader(torch.utils.data.Subset(dataset, share), batch_size=batch_size, shuffle=False,
                                 num_workers=workers, collate_fn=_keep_all)

    def __len__(self) -> int:
        return len(self.share)

    def source(self, i: int) -> str:
        """Where image i comes from, for messages: its file, or "image i"."""
        files = getattr(self.dataset, "files", None)
        return files[i] if files else f"image {i}"

    def names(self) -> dict[int, str]:
        """{index: name} of every image of the set (every rank's): a folder's files by their path
        below it, without the ending; a named source's as 000000, 000001, ..."""
        return {i: self.dataset.name(i) for i in range(len(self.dataset))}

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor]]:
        for items in self.loader:
            good = [(i, x) for i, x, _ in items if x is not None]
            for i, x, error in items:
                if x is None:
                    logger.warning("skipping unreadable image %s (%s)", self.dataset.files[i], error)
                    if self.skipped is not None:
                        self.skipped.append(self.dataset.files[i])
                    if self.progress is not None and self.progress.total:
                        self.progress.total -= 1
                        self.progress.refresh()
            if good:
                yield [i for i, _ in good], torch.stack([x for _, x in good])


def _as_8bit(x: torch.Tensor) -> torch.Tensor:
    return to_uint8(x).float() / 127.5 - 1


class NoImagesError(ValueError):
    """The image set gave no image to evaluate (empty, or every file unreadable)."""


def evaluate_reconstruction(model, images: Iterable, *, features: InceptionFeatures | None = None,
                            reference: FeatureStats | None = None, lpips: LPIPS | None = None, seed: int = 0,
                            progress=None, ctx=None, on_batch=None, **decode_options) -> tuple[ReconstructionReport, FeatureStats | None]:
    """Reconstruction metrics of ``model`` over ``images``.

    Args:
        model: a :class:`~dito_fast.DiTo` (its device is used).
        images: batches (b, 3, H, W) in [-1, 1], H and W multiples of the model's downsampling
            factor, or (indices, batch) pairs as :func:`image_batches` gives them (plain batches
            are numbered 0, 1, ... in order; not with ``ctx``, where the indices must say which
            images each rank has).
        features: the FID network (:meth:`InceptionFeatures.from_file`); None: no rFID.
        reference: feature statistics to compare the reconstructions with (``FeatureStats.load``);
            None: the originals' own (the usual rFID).
        lpips: the LPIPS network (:meth:`~dito_fast.eval.lpips.LPIPS.from_files`); None: no LPIPS.
        seed: image i's decode noise is seeded with (seed + i) mod 2^64.
        progress: anything with ``update(n)``, called with each batch's image count.
        on_batch: called as ``on_batch(indices, originals, reconstructions)`` after each batch,
            the images (b, 3, H, W) float in [-1, 1] on 8-bit levels (e.g. to save them).
        ctx: a :class:`~dito_fast.train.distributed.DistContext` when several processes each
            evaluate a share of the set (:func:`image_batches`'s ``rank``/``world_size``): every
            rank returns the whole set's report and statistics.
        decode_options: passed to :func:`~dito_fast.fast_decode` (steps, sampler, schedule, dtype,
            max_batch, tile, ...).
    Returns:
        (report, the originals' feature statistics or None), the statistics to save as a
        reference for later runs.
    Raises:
        NoImagesError: no image in the whole set (on every rank).
    """
    from ..decode import fast_decode, resolve_settings
    from ..train.distributed import DistContext, all_gather_object

    ctx = ctx or DistContext()
    if reference is not None and features is None:
        raise ValueError("evaluate_reconstruction: reference statistics need the feature network (features=)")
    if reference is not None and reference.dim != FID_DIM:
        raise ValueError(f"evaluate_reconstruction: the reference statistics are of {reference.dim}-dimensional "
                         f"features, the FID network's are {FID_DIM}-dimensional")
    device = next(model.parameters()).device
    solver = resolve_settings(decode_options.pop("sampler", "auto"), decode_options.pop("steps", None),
                              decode_options.pop("schedule", None))  # errors before any work
    decode_options.update(sampler=solver.sampler, steps=solver.steps, schedule=solver.schedule)
    real = FeatureStats() if features is not None and reference is None else None
    fake = FeatureStats() if features is not None else None
    rows: list[dict] = []
    sizes: set = set()
    start = time.perf_counter()
    for batch in images:
        indices, x = batch if isinstance(batch, (tuple, list)) else (None, batch)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"evaluate_reconstruction: expected image batches (b, 3, H, W), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if indices is None and ctx.distributed:
            raise ValueError("evaluate_reconstruction: with several processes, give (indices, batch) pairs "
                             "(image_batches(..., rank=, world_size=)): plain batches would be numbered alike on "
                             "every rank")
        indices = list(range(len(rows), len(rows) + x.shape[0])) if indices is None else list(indices)
        check_unit_range("evaluate_reconstruction", "images", x)  # (before the 8-bit rounding clamps them)
        with torch.inference_mode():
            x = _as_8bit(x.to(device))
            recon = fast_decode(model, model.encode(x), seed=[(seed + i) % 2**64 for i in indices],
                                output="float", **decode_options)
            recon = _as_8bit(recon)
            none = [None] * len(indices)
            ssims = ssim(recon, x).tolist() if min(x.shape[-2:]) >= SSIM_WINDOW else none
            perceptual = lpips(recon, x).tolist() if lpips is not None else none
            psnrs = psnr(recon, x).tolist()
            feats = (features(recon), features(x) if real is not None else None) if fake is not None else None
        rows += [{"index": i, "psnr": p, "ssim": q, "lpips": d} for i, p, q, d in zip(indices, psnrs, ssims, perceptual)]
        if feats is not None:  # (outside inference mode: the statistics stay usable afterwards)
            fake.update(feats[0])
            if real is not None:
                real.update(feats[1])
        sizes.add(tuple(x.shape[-2:]))
        if on_batch is not None:
            on_batch(indices, x, recon)
        if progress is not None:
            progress.update(x.shape[0])
    seconds = time.perf_counter() - start
    if ctx.distributed:  # the whole set on every rank
        rows = [r for part in all_gather_object(rows, ctx) for r in part]
        sizes = set().union(*all_gather_object(sizes, ctx))
        seconds = max(all_gather_object(seconds, ctx))
        for stats in (real, fake):
            if stats is not None:
                stats.all_reduce(ctx, device)
    if not rows:
        raise NoImagesError("evaluate_reconstruction: no images")
    rows.sort(key=lambda r: r["index"])
    rfid = None
    if fake is not None:
        target = reference if reference is not None else real
        if fake.n < 2 or (reference is None and target.n < 2):
            if ctx.is_main:
                logger.warning("rFID needs at least 2 images; not computed")
        else:
            if fake.n < 2048 and ctx.is_main:
                logger.warning("rFID from %d images: fewer than the 2048 feature dimensions, the covariances "
                               "are singular and the value is biased high (papers use 50000)", fake.n)
            rfid = frechet_distance(fake.mean, fake.cov, target.mean, target.cov)

    def mean(key):
        values = [r[key] for r in rows if r[key] is not None]
        return float(torch.tensor(values, dtype=torch.float64).mean()) if values else None

    report = ReconstructionReport(
        num_images=len(rows), psnr=mean("psnr"), ssim=mean("ssim"), rfid=rfid, lpips=mean("lpips"), seconds=seconds,
        exact_images=sum(r["psnr"] == float("inf") for r in rows),
        settings={"model": model.config.name, "image_size": [list(s) for s in sorted(sizes)], "seed": seed,
                  "nfe": solver.nfe, "processes": ctx.world_size,
                  "rfid_against": None if fake is None else "reference" if reference is not None else "originals",
                  **{k: v if isinstance(v, (bool, int, float, str)) else str(v)
                     for k, v in decode_options.items() if v is not None}},
        per_image=rows)
    return report, real


def image_set_stats(images: Iterable, features: InceptionFeatures, *, progress=None, ctx=None) -> FeatureStats:
    """Feature statistics of an image set: ``images`` as :func:`image_batches` gives them
    ((indices, batch) pairs, or plain batches) in [-1, 1], ``features`` the FID network. With
    ``ctx`` (several processes, each with its share), every rank returns the whole set's."""
    from ..train.distributed import DistContext

    ctx = ctx or DistContext()
    device = next(features.parameters()).device
    stats = FeatureStats()
    for batch in images:
        x = batch[1] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"image_set_stats: expected image batches (b, 3, H, W), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        check_unit_range("image_set_stats", "images", x)  # (before the 8-bit rounding clamps them)
        with torch.inference_mode():
            feats = features(_as_8bit(x.to(device)))
        stats.update(feats)
        if progress is not None:
            progress.update(x.shape[0])
    stats.all_reduce(ctx, device)
    return stats
