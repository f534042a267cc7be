"""Batches for training and evaluation: one interface, two loaders (PyTorch and NVIDIA DALI).

:func:`make_loader` returns an iterable of batches, each a dict

- ``"image"``: float32 (B, 3, S, S) in [-1, 1] (uint8 v -> v / 127.5 - 1), NCHW-contiguous or
  channels_last (``DataConfig.memory_format``); on the GPU for DALI's GPU pipeline, else CPU;
- ``"label"``: int64 (B,), the class label or -1;
- ``"index"``: int64 (B,), the source sample each image was read from.

Which samples: training batches follow :class:`~dito_fast.data.sampler.StepBatchSampler`
(epoch orders seeded by (seed, epoch), each global batch split across ranks, exact resume by
``start_step``); per-sample crop position and flip are a hash of (seed, epoch, index)
(:func:`~dito_fast.data.transforms.crop_params_array`). Both loaders compute the same resize
size, crop window and flip, so they yield the same samples with the same geometry; pixels differ
only by the decoders'/resamplers' rounding. Evaluation (``train=False``): one pass over the
source in order, rank r reading the contiguous block ``eval_shard(n, r, W)``, center crops.

Unreadable files: :func:`~dito_fast.data.sources.check_source` removes the files that fail a
cheap header check before the first batch (``DataConfig.check_files``); a file that still fails
to decode is skipped when met: the sample at index i is replaced by the next readable index
(i+1, i+2, ... cyclically; crop and flip still keyed by i), a warning names it, and the loader's
``num_skipped`` / ``skipped_files`` count every file skipped either way.

Where the two loaders' samples part: a file one decoder reads and the other does not. DALI
cannot decode some files PIL reads (lossless WebP with EXIF data, 1-bit and 32-bit integer
TIFF): the DALI loader skips those, the PyTorch loader trains on them. With
``check_files="none"`` the PyTorch loader also reads formats DALI lacks (GIF), which the up-front
check removes otherwise. Pixels: 16-bit RGB images are truncated to 8 bits by PIL (v >> 8) and
rounded by DALI (at most one grey level apart); LAB, palette and YCbCr TIFF differ by a few levels.

Evaluation passes that meet unreadable files: a file found while reading is replaced by the next
readable one, so that sample appears twice in the pass (at the end, the wrap goes back to index
0); ranks' blocks differ in size by at most one sample, so their batch counts can differ by one.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .sampler import StepBatchSampler, eval_shard, mix_seed, rank_slice
from .sources import DALI_FORMATS, DatasetSource, Source, _EncodedSource, check_source, resolve_source
from .transforms import crop_params_array, resize_crop_flip, uint8_batch_to_float

logger = logging.getLogger(__name__)

__all__ = ["LOADERS", "BatchLoader", "DALIUnavailableError", "TorchLoader", "dali_status", "make_loader",
           "select_loader"]

LOADERS = ("auto", "dali", "torch")
MEMORY_FORMATS = ("contiguous", "channels_last")
DALI_PIP_PACKAGE = "nvidia-dali-cuda130"


class DALIUnavailableError(RuntimeError):
    """The DALI loader was requested but cannot run here (not installed, or no such source)."""


def dali_status() -> Tuple[bool, str]:
    """(installed, reason): whether ``nvidia.dali`` can be imported (cheap: no import)."""
    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return False, (f"NVIDIA DALI is not installed; install it with `pip install {DALI_PIP_PACKAGE}` "
                       "(Linux x86_64; the same wheel runs CPU-only pipelines without a GPU)")
    return True, "installed"


def resolve_memory_format(memory_format: str, device: Optional[torch.device] = None) -> str:
    """``memory_format`` with "auto" made concrete for ``device`` (default: CUDA if available):
    channels_last on the CPU, where dito_fast's Winograd convolutions work NHWC, else contiguous."""
    if memory_format != "auto":
        return memory_format
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "channels_last" if torch.device(device).type == "cpu" else "contiguous"


def select_loader(requested: str, source: Source, device: Optional[torch.device] = None) -> str:
    """"dali" or "torch" for ``requested`` in LOADERS.

    auto: DALI when it is installed, a CUDA GPU is present (and ``device`` is not a CPU) and the
    source holds encoded images; otherwise the PyTorch loader. Forcing "dali" where it cannot
    run raises :class:`DALIUnavailableError` with the reason (e.g. the pip package to install).
    """
    if requested not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    encoded = isinstance(source, _EncodedSource)
    installed, why = dali_status()
    if requested == "auto":
        gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        return "dali" if installed and gpu and encoded else "torch"
    if not installed:
        raise DALIUnavailableError(f"loader 'dali' requested but {why}")
    if not encoded:
        raise DALIUnavailableError(f"loader 'dali' decodes image files; source {source.description!r} is "
                                   "generated in Python: use loader 'torch' (or 'auto')")
    return "dali"


# --------------------------------------------------------------------------------------------
# common interface


class BatchLoader:
    """What :func:`make_loader` returns. Iterating yields ``len(self)`` batches (see the module
    docstring) starting at ``start_step``; iterating again starts over at ``start_step``.

    Attributes: ``kind`` ("torch" or "dali"), ``source`` (the screened Source), ``batch_size``
    (this rank's share), ``global_batch_size``, ``rank``, ``world_size``, ``start_step``,
    ``num_steps``, ``train``.
    """

    kind = "?"

    def __init__(self, source: Source, *, image_size: int, batch_size: int, seed: int, train: bool, hflip: bool,
                 memory_format: str, rank: int, world_size: int, start_step: int, num_steps: Optional[int],
                 global_batch_size: Optional[int] = None):
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
        self.source = source
        self.image_size, self.batch_size, self.seed = int(image_size), int(batch_size), int(seed)
        self.train, self.hflip, self.memory_format = bool(train), bool(hflip), memory_format
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_step, self.num_steps = int(start_step), num_steps
        self.global_batch_size = (self.batch_size * self.world_size if global_batch_size is None
                                  else int(global_batch_size))
        self._bad: Dict[int, str] = {}  # source index -> reason, found while reading

    # -- which samples

    def step_sampler(self, start_step: int, num_steps: Optional[int]) -> StepBatchSampler:
        src = self.source
        return StepBatchSampler(len(src), self.batch_size, self.seed, start_step, num_steps, self.rank,
                                self.world_size, order=lambda epoch: src.epoch_order(self.seed, epoch),
                                global_batch_size=self.global_batch_size)

    def eval_batches(self) -> List[List[Tuple[int, int]]]:
        """(index, 0) keys of this rank's evaluation batches, from ``start_step`` on."""
        shard = list(eval_shard(len(self.source), self.rank, self.world_size))
        B = self.batch_size
        batches = [[(i, 0) for i in shard[b:b + B]] for b in range(0, len(shard), B)]
        end = None if self.num_steps is None else self.start_step + self.num_steps
        return batches[self.start_step:end]

    def __len__(self) -> int:
        if self.train:
            return self.num_steps if self.num_steps is not None else 2 ** 62
        return len(self.eval_batches())

    def _key_params(self, keys: Sequence[Tuple[int, int]]):
        """(u_x, u_y, flip) arrays for ``keys``; eval keys get NaN positions (= center) and no flip."""
        idx = np.array([k[0] for k in keys], np.int64)
        ep = np.array([k[1] for k in keys], np.int64)
        if not self.train:
            nan = np.full(len(keys), np.nan, np.float32)
            return nan, nan.copy(), np.zeros(len(keys), bool)
        return crop_params_array(self.seed, ep, idx, self.hflip)

    # -- unreadable files

    def _mark_bad(self, index: int, reason: str) -> None:
        if index not in self._bad:
            self._bad[index] = reason
            logger.warning("skipping unreadable image %s (%s)", self.source.name(index), reason)

    def resolve(self, index: int) -> int:
        """``index``, or the next index (cyclically) not known to be unreadable."""
        n = len(self.source)
        for k in range(n):
            j = (index + k) % n
            if j not in self._bad:
                return j
        raise RuntimeError(f"none of the {n} images of {self.source.description} could be read "
                           f"({self.num_skipped} files skipped); see the warnings above")

    @property
    def skipped_files(self) -> List[str]:
        """Names of every file skipped: removed by the up-front check, then found while reading."""
        return [name for name, _ in self.source.skipped] + [self.source.name(i) for i in self._bad]

    @property
    def num_skipped(self) -> int:
        return len(self.source.skipped) + len(self._bad)

    @property
    def found_unreadable(self) -> List[int]:
        """Source indices of the files this process found unreadable while reading (sorted; the
        up-front check's are in ``source.skipped``, the same in every process)."""
        return sorted(self._bad)

    def unreadable_reasons(self) -> List[Tuple[str, str]]:
        """(name, reason) of the files this process found unreadable while reading, by index."""
        return [(self.source.name(i), self._bad[i]) for i in sorted(self._bad)]

    def mark_unreadable(self, files: Sequence[Tuple[str, str]]) -> None:
        """Skip (and count) files found unreadable earlier, e.g. by the run a training run resumes:
        ``(name, reason)`` pairs as :meth:`unreadable_reasons` gives them; names this source does
        not hold are ignored. Call before iterating."""
        if not files:
            return
        index = {self.source.name(i): i for i in range(len(self.source))}
        for name, reason in files:
            if name in index:
                self._bad.setdefault(index[name], str(reason))

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (worker processes end with each pass anyway)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, batch_size={self.batch_size}, rank={self.rank}/"
                f"{self.world_size}, train={self.train}, start_step={self.start_step}, num_steps={self.num_steps})")


# --------------------------------------------------------------------------------------------
# PyTorch DataLoader


class _KeyedItems(Dataset):
    """Map-style dataset over ``(index, epoch)`` keys (what the batch sampler yields); runs in
    DataLoader workers. Returns dicts; ``bad`` lists (index, reason) of files that failed."""

    def __init__(self, source: Source, image_size: int, seed: int, train: bool, hflip: bool, known_bad: Set[int]):
        self.source, self.size, self.seed, self.train, self.hflip = source, image_size, seed, train, hflip
        self.known_bad = set(known_bad)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, epoch = key
        if isinstance(self.source, DatasetSource):
            x, label = self.source.item_and_label(index, epoch, self.size)
            return {"image": x, "label": label, "index": index, "bad": ()}
        params = None
        if self.train:
            u_x, u_y, flip = crop_params_array(self.seed, [epoch], [index], self.hflip)
            params = (float(u_x[0]), float(u_y[0]), bool(flip[0]))
        n = len(self.source)
        bad = []
        for k in range(n):
            j = (index + k) % n
            if j in self.known_bad:
                continue
            try:
                # ValueError: an unusable file (decode lets the process's own errors through), or
                # one too thin to resize
                arr = resize_crop_flip(self.source.decode(j), self.size, params)
            except ValueError as e:
                self.known_bad.add(j)
                bad.append((j, str(e)))
                continue
            except Exception as e:  # the process's (MemoryError, EMFILE): not the file's fault, but named
                if hasattr(e, "add_note"):  # Python 3.11+
                    e.add_note(f"(while reading {self.source.name(j)})")
                raise
            return {"image": torch.from_numpy(arr), "label": self.source.label(j), "index": j, "bad": bad}
        raise RuntimeError(f"none of the {n} images of {self.source.description} could be read; "
                           f"e.g. {bad[0][1] if bad else '?'}")


def _collate(items: List[dict]) -> dict:
    """Stack items: uint8 (B, S, S, 3) images from files (converted in the main process, so
    workers send 4x fewer bytes), or float (B, 3, S, S) from a DatasetSource."""
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "bad": [b for it in items for b in it["bad"]]}


class TorchLoader(BatchLoader):
    """PIL decoding in ``workers`` DataLoader worker processes (0 = in this process)."""

    kind = "torch"

    def __init__(self, source: Source, *, workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2,
                 **kw):
        super().__init__(source, **kw)
        self.workers, self.pin_memory, self.prefetch_factor = int(workers), bool(pin_memory), int(prefetch_factor)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if self.train:
            batches = self.step_sampler(self.start_step, self.num_steps)
        else:
            batches = self.eval_batches()
        items = _KeyedItems(self.source, self.image_size, self.seed, self.train, self.hflip, set(self._bad))
        extra = {"prefetch_factor": self.prefetch_factor} if self.workers > 0 else {}
        # the workers' seeds from this loader's own generator, not from torch's global RNG: iterating
        # a loader then draws nothing from it (a resumed run's restored RNG stays as saved)
        seeds = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, self.start_step, int(self.train)))
        dl = DataLoader(items, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
                        pin_memory=self.pin_memory, persistent_workers=False, generator=seeds, **extra)
        for batch in dl:
            for j, reason in batch.pop("bad"):
                self._mark_bad(j, reason)
            x = batch["image"]
            if x.dtype == torch.uint8:
                batch["image"] = uint8_batch_to_float(x, self.memory_format)
            elif self.memory_format == "channels_last":
                batch["image"] = x.contiguous(memory_format=torch.channels_last)
            yield batch


# --------------------------------------------------------------------------------------------
# the entry point


def make_loader(cfg, rank: int = 0, world_size: int = 1, start_step: int = 0, num_steps: Optional[int] = None, *,
                train: bool = True, source: Union[Source, Dataset, str, None] = None, batch_size: Optional[int] = None,
                seed: Optional[int] = None, loader: Optional[str] = None, workers: Optional[int] = None,
                device: Union[str, torch.device, None] = None) -> BatchLoader:
    """Build the training (or evaluation) loader described by ``cfg``.

    Args:
        cfg: a RunConfig (data settings, ``train.batch_size`` and ``train.seed``) or a DataConfig.
        rank, world_size: data-parallel position; each rank gets its share
            ``rank_slice(batch_size, rank, world_size)`` of every global batch (``batch_size //
            world_size`` samples when that divides), disjoint from the other ranks'.
        start_step: first step to produce (resume: the batches an uninterrupted run would have
            read from this step on). For ``train=False``, the first evaluation batch.
        num_steps: number of batches; None = endless (train) or the whole pass (eval).
        train: random crop + flip and the step order (True), or center crops in source order.
        source: overrides ``cfg.data.source``: a Source, a torch Dataset of image tensors, or a
            source string (see :func:`~dito_fast.data.sources.resolve_source`).
        batch_size: the global batch size; default ``cfg.train.batch_size`` (required with a DataConfig).
        seed: default ``cfg.train.seed`` (0 with a DataConfig).
        loader, workers: override ``cfg.data.loader`` / ``cfg.data.workers`` (DALI: CPU threads).
        device: where the model runs; DALI decodes on that GPU ("mixed" decoder) when it is a
            CUDA device, or on the CPU otherwise. Default: CUDA if available.
    Returns:
        a :class:`BatchLoader` (``TorchLoader`` or ``DALILoader``) with ``num_skipped``.
    Raises:
        DALIUnavailableError: ``loader="dali"`` where DALI cannot run (message says why).
        ValueError / FileNotFoundError: a bad setting, an empty or unreadable source.
    """
    from ..config import DataConfig, RunConfig

    if isinstance(cfg, RunConfig):
        data = cfg.data
        batch_size = cfg.train.batch_size if batch_size is None else batch_size
        seed = cfg.train.seed if seed is None else seed
    elif isinstance(cfg, DataConfig):
        data = cfg
        seed = 0 if seed is None else seed
        if batch_size is None:
            raise ValueError("make_loader(DataConfig, ...) needs batch_size=")
    else:
        raise TypeError(f"cfg must be a RunConfig or DataConfig, got {type(cfg).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    lo, hi = rank_slice(batch_size, rank, world_size)  # raises when batch_size < world_size
    workers = data.workers if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")

    src = resolve_source(data if source is None else source, image_size=data.image_size,
                         num_synthetic=data.num_synthetic_images, seed=seed, train=train, hflip=data.hflip)
    kind = select_loader(data.loader if loader is None else loader, src, device)
    # Both loaders accept the formats DALI decodes, so they see the same samples (GIF is not one).
    src = check_source(src, data.check_files, formats=DALI_FORMATS)
    common = dict(image_size=data.image_size, batch_size=hi - lo, seed=seed, train=train,
                  hflip=data.hflip, memory_format=resolve_memory_format(data.memory_format, device),
                  rank=rank, world_size=world_size,
                  start_step=start_step, num_steps=num_steps, global_batch_size=batch_size)
    if kind == "dali":
        from .dali import DALILoader

        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gpu_id = None
        if dev.type == "cuda":
            gpu_id = dev.index if dev.index is not None else torch.cuda.current_device()
        out: BatchLoader = DALILoader(src, threads=max(1, workers), device_id=gpu_id, **common)
        where = f"GPU {gpu_id} (mixed decoder)" if gpu_id is not None else "CPU"
        logger.info("data: %s, %d samples, %d skipped; DALI loader on %s, %d threads", src.description, len(src),
                    len(src.skipped), where, max(1, workers))
    else:
        pin = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        out = TorchLoader(src, workers=workers, pin_memory=pin, **common)
        logger.info("data: %s, %d samples, %d skipped; PyTorch loader, %d worker processes", src.description,
                    len(src), len(src.skipped), workers)
    return out
