"""Training the downstream DiT on a tokenizer's latents: :func:`train_dit` (``dito-fast train-dit``).

The data (:mod:`dito_fast.data.latents`) is a folder of latents written by ``dito-fast encode``
(one ``.safetensors`` file per image), read into memory, or its pack (``dito-fast pack-latents``:
one file, memory-mapped and shared by the processes of a torchrun job). With
``data.class_folders`` each latent's label is its top-level subfolder (folders sorted by name ->
0..K-1, as ``encode`` mirrors an image folder's class folders); without it the DiT is
unconditional. Unreadable or corrupt files are skipped and counted; latents of another shape or
from another tokenizer (the fingerprint ``encode`` stores) stop the run before it starts, as do,
under torchrun, ranks that loaded different sets (each rank reads ``data.source`` itself).

The loop is the tokenizer's (:func:`dito_fast.train.train` with a :class:`DiTTask`): the same
``train.*`` settings, checkpoints, exact resume, torchrun (DDP or FSDP), EMA, non-finite step
skipping and logs. What differs: the per-sample draws of the DiT's flow-matching loss (time,
noise, label drop) come from generators seeded by (seed, step, index in the global batch); the
validation figure is the EMA model's loss on the latents of ``train.val_images`` held-out files
(at most a fifth of them; a file's latents together) with fixed draws (``val_loss``); given the tokenizer (``data.tokenizer``, checked
against the latents' fingerprint), each validation also writes a grid of 8 samples (fixed
seeds, ``train.val_sample_steps`` Euler steps, one class after another) decoded by it.
Every checkpoint and the exported model's folder hold ``latents.json``: the class names, the
tokenizer the latents came from (which ``dito-fast sample-dit`` checks its ``--tokenizer``
against), the latent shape and count and a digest of the files' order. A resume refuses other
classes or another tokenizer (the labels or the latent space would change under the model) and
warns when the set changed otherwise (the data order then differs from an uninterrupted run's).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..config import PRESETS, TrainConfig, resolve_run_config, validate_train_config
from ..data.latents import LatentSet, load_latents
from ..data.sampler import StepBatchSampler, mix_seed, rank_slice
from ..models.dit import DIT_PRESETS, DiT, DiTConfig, validate_dit_config
from . import checkpoint as ckpt
from . import distributed
from .trainer import TrainResult, TrainTask, train

logger = logging.getLogger(__name__)

LATENTS_FILE = "latents.json"  # in every checkpoint and the exported model: classes, tokenizer, ...
_VAL_TAG = 0x7A1  # seeds of the validation draws: (seed, _VAL_TAG, index)


@dataclass
class LatentDataConfig:
    """The latents a DiT is trained on."""

    source: str = ""  # a folder of latents written by `dito-fast encode` (searched recursively), or its pack
    class_folders: bool = False  # label each latent by its top-level subfolder; False: unconditional
    # the DiTo model folder the latents came from (optional): checked against their fingerprint,
    # and each validation then also writes images of the EMA model's samples (samples/dit_<step>.png)
    tokenizer: str = ""


@dataclass
class DiTRunConfig:
    model: DiTConfig = field(default_factory=DiTConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def validate_dit_run_config(cfg: DiTRunConfig) -> None:
    """Raise ``ValueError`` naming the first inconsistent setting."""
    validate_dit_config(cfg.model)
    if cfg.model.name in PRESETS:
        raise ValueError(f"model.name={cfg.model.name} names a tokenizer preset (dito-fast train); a DiT's presets: "
                         f"{', '.join(DIT_PRESETS)}")
    validate_train_config(cfg.train)
    if not isinstance(cfg.data.source, str) or not cfg.data.source:
        raise ValueError("data.source must name a folder of latents (written by dito-fast encode) or a latent pack")


def resolve_dit_run_config(preset: str | None = None, config_file: str | None = None,
                           overrides: dict | None = None) -> DiTRunConfig:
    """Preset (``DiT-S/2`` ...) -> config file -> overrides, as :func:`dito_fast.config.resolve_run_config`."""
    return resolve_run_config(preset, config_file, overrides, run_class=DiTRunConfig, presets=DIT_PRESETS,
                              validate=validate_dit_run_config)


# --------------------------------------------------------------------------------------------
# the latents


class LatentLoader:
    """This rank's batches {"latent": (B, c, h, w), "label": (B,) int64} of steps start_step..
    from a :class:`LatentSet`, in the order of :class:`dito_fast.data.sampler.StepBatchSampler`
    (the tokenizer's loaders' order: exact resume, disjoint rank shares). The interface of
    :class:`dito_fast.data.BatchLoader` the loop uses. A folder's files were read before the run,
    so none becomes unreadable while it runs (``mark_unreadable`` has nothing to do); a pack is
    memory-mapped and read while the run goes on: one written over in place meanwhile (``cp``
    over it) changes the latents under the run, or kills the process with SIGBUS where it was
    cut short (``pack-latents`` writes packs read-only; replace one by a rename)."""

    def __init__(self, latents: LatentSet, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, num_steps: int | None = None):
        lo, hi = rank_slice(global_batch, rank, world_size)
        self.source = latents
        self.sampler = StepBatchSampler(len(latents), hi - lo, seed, start_step, num_steps, rank, world_size,
                                        global_batch_size=global_batch)
        self.found_unreadable: list[int] = []

    def __iter__(self):
        for keys in self.sampler:
            z, y = self.source.take(torch.tensor([i for i, _ in keys], dtype=torch.long))
            yield {"latent": z, "label": y if y is not None else torch.zeros(len(z), dtype=torch.long)}

    def __len__(self) -> int:
        return len(self.sampler)

    def unreadable_reasons(self) -> list[tuple[str, str]]:
        return []

    def mark_unreadable(self, files) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# the task


class DiTStep(nn.Module):
    """Per-sample flow-matching losses (B,) of a DiT as one module call (for DDP and FSDP):
    forward(z (B, c, h, w), y (B,) int64 (ignored by an unconditional model), seeds (B ints))."""

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, y: torch.Tensor, seeds) -> torch.Tensor:
        return self.model.loss(z, y if self.model.config.num_classes > 0 else None, seeds=list(seeds))


class DiTTask(TrainTask):
    """A DiT on latents (see the module docstring), for :func:`dito_fast.train.train`."""

    def __init__(self, progress: bool | None = None):
        self.progress = progress
        self.described: dict | None = None  # latents.json of the data, once read
        self.tokenizer = None  # the DiTo that decodes validation samples (data.tokenizer), on rank 0, on the CPU

    def validate_config(self, cfg: DiTRunConfig) -> None:
        validate_dit_run_config(cfg)

    def resolve_config(self, cfg, device):
        return cfg

    def build_model(self, cfg) -> nn.Module:
        return DiT(cfg.model)

    def step_module(self, model) -> nn.Module:
        return DiTStep(model)

    def datasets(self, cfg, resume_from, train_dataset=None, val_data=None):
        m, t = cfg.model, cfg.train
        if train_dataset is None:
            try:
                full = load_latents(cfg.data.source, cfg.data.class_folders, self.progress)
            except Exception as e:
                _same_on_every_rank(None, None, cfg.data.source, failed=e)  # (told to the others, not left waiting)
                raise
            held = _held_out(full, t.val_images if val_data is None else 0)
            train_dataset = full.subset([i for i in range(len(full)) if i not in held]) if held else full
            train_dataset.skipped = full.skipped
            if val_data is None:
                val_data = full.subset(sorted(held))
        if val_data is None:
            val_data = train_dataset.subset([])
        _same_on_every_rank(train_dataset, val_data, cfg.data.source)
        shape = train_dataset.shape
        want = (m.latent_channels, m.latent_size, m.latent_size)
        if shape != want:
            raise ValueError(f"the latents are {shape} (c, h, w), but model.latent_channels={m.latent_channels} and "
                             f"model.latent_size={m.latent_size} make {want}")
        k = len(train_dataset.classes)
        if k != m.num_classes:
            raise ValueError(f"the data has {k} classes ({'data.class_folders' if cfg.data.class_folders else 'no'} "
                             f"class folders) but model.num_classes={m.num_classes}")
        self.described = train_dataset.describe()
        if cfg.data.tokenizer:
            tokenizer = _load_tokenizer(cfg.data.tokenizer, self.described, shape)  # checked on every rank
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                self.tokenizer = tokenizer  # (rank 0 validates)
            if len(val_data) == 0:
                logger.warning("data.tokenizer: no sample images will be written, since they are made at validations, "
                               "which need held-out latents (train.val_images > 0 and at least 5 latent files)")
        if resume_from is not None:
            saved = read_latents_file(resume_from)
            if saved is None:
                logger.warning("%s holds no %s: whether its classes and tokenizer are the data's cannot be checked",
                               resume_from, LATENTS_FILE)
            else:
                _check_same_latents(saved, self.described, resume_from, cfg.data.source)
        logger.info("latents: %d for training, %d held out, shape %s, %s", len(train_dataset), len(val_data), shape,
                    f"{k} classes" if k else "unconditional")
        return train_dataset, val_data

    def make_loader(self, cfg, rank, world_size, start_step, num_steps, source, device):
        return LatentLoader(source, cfg.train.batch_size, cfg.train.seed, rank, world_size, start_step, num_steps)

    def inputs(self, batch, model, device, first):
        return batch["latent"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)

    def probe_inputs(self, cfg, n, device):
        m = cfg.model
        return (torch.randn(n, m.latent_channels, m.latent_size, m.latent_size, device=device),
                torch.zeros(n, dtype=torch.long, device=device))

    @torch.no_grad()
    def validate(self, model, val_data: LatentSet, cfg, step, run_dir):
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total, n = 0.0, len(val_data)
        for lo in range(0, n, 64):
            z, y = val_data.take(torch.arange(lo, min(lo + 64, n)))
            z, y = z.to(device), y.to(device) if y is not None else None
            seeds = [mix_seed(cfg.train.seed, _VAL_TAG, i) for i in range(lo, lo + z.shape[0])]
            total += float(model.loss(z, y, seeds=seeds).double().sum())
        res = {"val_loss": total / n}
        logger.info("step %d: validation loss %.4f (%d held-out latents)", step, res["val_loss"], n)
        if self.tokenizer is not None:
            self._write_samples(model, cfg, step, run_dir)
        model.train(was_training)
        return res

    def _write_samples(self, model, cfg, step: int, run_dir: Path) -> None:
        """8 samples of ``model`` (fixed seeds; labels 0, 1, ... cycling), decoded by the tokenizer."""
        from ..decode import fast_decode
        from ..eval.report import make_grid, save_image

        k = model.config.num_classes
        y = torch.arange(8, device=next(model.parameters()).device) % k if k else None
        seeds = [mix_seed(cfg.train.seed, _VAL_TAG, 1, i) for i in range(8)]
        z = model.sample(y, batch_size=None if k else 8, steps=cfg.train.val_sample_steps, seed=seeds)
        images = fast_decode(self.tokenizer.to(z.device), z, seed=[s ^ 1 for s in seeds], output="float")
        self.tokenizer.cpu()  # (off the accelerator between validations)
        save_image(make_grid([images.cpu()]), run_dir / "samples" / f"dit_{step:08d}.png")

    def checkpoint_files(self) -> dict:
        return {LATENTS_FILE: self.described} if self.described is not None else {}

    def export(self, model, directory: Path) -> None:
        model.save_pretrained(directory)
        if self.described is not None:
            ckpt.atomic_write_json(self.described, Path(directory) / LATENTS_FILE)


def _same_on_every_rank(train_set: LatentSet | None, val_set: LatentSet | None, source: str,
                        failed: Exception | None = None) -> None:
    """Under torchrun, check that every rank loaded the same latents: each reads ``data.source``
    itself, and a node's copy with one file more or one unreadable there would give the ranks
    other sets (other indices behind one batch) without a word. Every rank's description (count,
    digest of the files, held-out count and digest, shape, classes, tokenizer) is all-gathered;
    where they differ, or a rank ``failed`` to load, every rank raises (ValueError naming the
    ranks and what differs; the rank that failed, its own error). A single process: nothing."""
    mine = None if failed is not None else {**train_set.describe(), "held_out": len(val_set),
                                            "held_out_digest": val_set.describe()["files_digest"]}
    every = distributed.every_rank_description(
        mine, failed, f"rank {{rank}} could not load the latents of data.source {source} ({{error}}); every rank must "
                      "read the same set")
    if every is None or all(d == every[0] for d in every):
        return
    groups: dict[str, list[int]] = {}  # (ranks with one description, in rank order)
    for r, d in enumerate(every):
        groups.setdefault(json.dumps(d, sort_keys=True), []).append(r)

    def said(ranks: list[int]) -> str:
        d = every[ranks[0]]
        text = (f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {d['num_latents']} latents "
                f"(files digest {d['files_digest']}), {d['held_out']} held out, shape {tuple(d['latent_shape'])}, "
                f"{len(d['classes'])} classes")
        if ranks[0] != 0:
            text += f" (differ from rank 0 in {', '.join(k for k in d if d[k] != every[0].get(k))})"
        return text
    raise ValueError(f"the ranks loaded different latent sets from data.source {source}: "
                     f"{'; '.join(said(ranks) for ranks in groups.values())}. Each rank reads it itself: is one "
                     "node's copy different (a file more or less, one unreadable there), or a folder still being "
                     "written? Every rank must read the same files")


def _held_out(latents: LatentSet, count: int) -> set[int]:
    """Indices of the latents held out for validation: those of ``count`` files (at most a fifth
    of them) evenly spaced over the files, but never a class's last training file. A file's
    latents are held out together (an image's and its mirror image's, ``encode --flip``: one
    trained on would flatter the other's validation loss)."""
    names = latents.set_names()
    starts = [i for i in range(len(names)) if i == 0 or names[i] != names[i - 1]]  # each file's first row
    ends = starts[1:] + [len(names)]
    n = len(starts)
    n_val = min(count, n // 5)
    held = sorted({round(i * (n - 1) / max(n_val - 1, 1)) for i in range(n_val)})
    labels = latents.set_labels()
    if labels is not None:
        file_labels = labels[starts].tolist()
        left = torch.bincount(torch.tensor(file_labels, dtype=torch.long), minlength=len(latents.classes)).tolist()
        kept = []
        for f in held:
            if left[file_labels[f]] > 1:
                left[file_labels[f]] -= 1
                kept.append(f)
        held = kept
        empty = [latents.classes[k] for k, c in enumerate(left) if c == 0]
        if empty:  # every file of these classes was unreadable: their labels stay untrained
            logger.warning("%d class folders have no readable latents (%s): the model will not learn them",
                           len(empty), ", ".join(empty[:5]))
    return {i for f in held for i in range(starts[f], ends[f])}


def _load_tokenizer(folder: str, described: dict, shape: tuple) -> nn.Module:
    """The DiTo in ``folder``, refused unless it is the one the latents came from (by the
    fingerprint ``encode`` stored; latents without one: by the latent shape alone)."""
    from ..models._pretrained import model_fingerprint
    from ..models.dito import DiTo

    try:
        tokenizer = DiTo.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise type(e)(f"data.tokenizer (--tokenizer; a resumed run's comes from its config, --tokenizer replaces "
                      f"it): {e}") from None
    fingerprint = described["tokenizer"].get("model_fingerprint")
    if fingerprint is not None and model_fingerprint(tokenizer) != fingerprint:
        raise ValueError(f"data.tokenizer {folder} ({tokenizer.config.name}, fingerprint "
                         f"{model_fingerprint(tokenizer)}) is not the model the latents came from "
                         f"({described['tokenizer'].get('model')}, {fingerprint})")
    if tokenizer.latent_channels != shape[0]:
        raise ValueError(f"data.tokenizer {folder} makes {tokenizer.latent_channels}-channel latents, the data's "
                         f"have {shape[0]}")
    return tokenizer


def _check_same_latents(before: dict, now: dict, checkpoint, source) -> None:
    """A resume's latents against its checkpoint's: other classes or another tokenizer are
    refused (labels or latent space would change under the model); any other change is
    warned of (the data order from here on differs from an uninterrupted run's, and latents
    held out before may have been trained on)."""
    for key in ("classes", "tokenizer"):
        # (latents without the tokenizer's fingerprint, on either side, cannot be compared)
        if before.get(key, []) != now[key] and (key == "classes" or (before.get(key) and now[key])):
            raise ValueError(f"{checkpoint} was trained on latents with other {key} ({before.get(key)!r}) than "
                             f"{source}'s ({now[key]!r}): its labels or latent space would change under it; "
                             "train a new run (or restore the folder)")
    if (before.get("num_latents"), before.get("files_digest")) != (now["num_latents"], now["files_digest"]):
        logger.warning("the latents in %s changed since %s (%s -> %d training latents%s): the data order from here "
                       "on differs from an uninterrupted run's, and latents held out for validation before may have "
                       "been trained on", source, checkpoint, before.get("num_latents"), now["num_latents"],
                       ", from other files" if before.get("num_latents") == now["num_latents"] else "")


def train_dit(cfg: DiTRunConfig, out_dir, resume: bool | str = False, latents: LatentSet | None = None,
              val_latents: LatentSet | None = None, progress: bool | None = None) -> TrainResult:
    """Train a DiT as configured on ``cfg.data``'s latents (or ``latents``; ``val_latents``
    replaces the held-out ones); files as :func:`dito_fast.train.train` writes them, plus
    ``latents.json`` in the run folder and in ``model/``. ``resume``: as there."""
    return train(cfg, out_dir, resume, latents, val_latents, progress, task=DiTTask(progress))


def read_latents_file(model_dir: str | Path) -> dict | None:
    """The ``latents.json`` a trained DiT's folder holds ({"classes", "tokenizer",
    "latent_shape"}), or None (a model saved another way)."""
    path = Path(model_dir) / LATENTS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


__all__ = ["DiTRunConfig", "LatentDataConfig", "LatentLoader", "DiTStep", "DiTTask", "train_dit",
           "resolve_dit_run_config", "validate_dit_run_config", "read_latents_file"]
