"""The training loop: flow-matching training of encoder and decoder together (paper §3), on one
process or data-parallel under torchrun (DDP, or FSDP2 for the large presets; see parallel.py).
What is trained is a :class:`TrainTask` (model, loss module, data, validation, export): a DiTo
tokenizer's by default, the downstream DiT's in :mod:`dito_fast.train.dit`.

Determinism and exact resume: the images of step k are fixed by (seed, k) through the loader of
:func:`dito_fast.data.make_loader` (an epoch permutation seeded by (seed, epoch), each global
batch split across ranks) and per-item augmentations seeded by (seed, epoch, index); the
diffusion noise and times of sample i of step k come from a generator seeded by (seed, k, i),
i its index in the global batch. Nothing depends on how many steps ran in this process, on the
world size or on the micro-batching, so a run stopped at step k and resumed from its checkpoint
follows the uninterrupted run exactly, and runs with the same global batch on 1 or N processes
follow the same trajectory up to floating-point summation order.

Under torchrun: rank 0 alone writes logs, images, checkpoints and the exported model; decisions
all ranks must share (skip a non-finite step, stop for ``max_minutes``) come from all-reduced
values. After a worker failure, ``torchrun --max-restarts=K`` restarts every worker; they resume
from the latest complete checkpoint (with ``--resume``, or automatically on a restart of the
same torchrun job).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import data
from ..config import RunConfig, to_dict, validate_run_config
from ..data.sampler import StepBatchSampler, mix_seed  # noqa: F401  (StepBatchSampler: re-exported)
from ..eval.metrics import psnr
from ..eval.report import make_grid, save_image
from ..models.dito import DiTo, check_images
from . import checkpoint as ckpt
from . import distributed
from .distributed import DistContext
from .parallel import ParallelModel, TrainStep, find_micro_batch, flat_dict, plan_batches, sample_seeds, save_dcp

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# data

# The step order lives in dito_fast.data.sampler (shared by both loaders); re-exported here.
_mix_seed = mix_seed


def build_datasets(cfg: RunConfig) -> tuple[Dataset | data.Source, torch.Tensor]:
    """Training data (a Dataset or a data Source) and a fixed batch of held-out validation
    images (V, 3, S, S).

    ``synthetic``: validation images are rendered from a different seed. ``builtin``: synthetic
    images plus crops of the bundled photographs, holding out whole photographs for validation
    (see :func:`dito_fast.data.builtin_split`). A folder, file list or tar shards: the source is
    screened (``data.check_files``), ``val_images`` evenly spaced samples (center crops) are held
    out and the rest is trained on.
    """
    d, t = cfg.data, cfg.train
    size, n_val = d.image_size, t.val_images
    val_seed = _mix_seed(t.seed, 0xA11CE) % 2**31
    if d.source == "synthetic":
        train_ds = data.SyntheticImages(d.num_synthetic_images, size, seed=t.seed)
        val = [data.SyntheticImages(max(n_val, 1), size, seed=val_seed)[i] for i in range(n_val)]
    elif d.source == "builtin":
        train_ds, val_ds = data.builtin_split(size, d.num_synthetic_images, seed=t.seed, val_seed=val_seed,
                                         num_val=n_val, hflip=d.hflip)
        val = [val_ds[i] for i in range(len(val_ds))]
    else:
        source = data.check_source(data.resolve_source(d, seed=t.seed), d.check_files, formats=data.DALI_FORMATS)
        n = len(source)
        n_val = min(n_val, n // 5)
        val_idx = sorted({round(i * (n - 1) / max(n_val - 1, 1)) for i in range(n_val)})
        val, unreadable = [], []
        for i in val_idx:
            try:
                arr = data.resize_crop_flip(source.decode(i), size)  # center crop
            except (ValueError, OSError) as e:
                logger.warning("validation image %s unreadable (%s); left out", source.name(i), e)
                unreadable.append((source.name(i), str(e)))
                continue
            val.append(data.uint8_batch_to_float(torch.from_numpy(arr)[None])[0])
        held = set(val_idx)
        train_ds = source.subset([i for i in range(n) if i not in held]) if held else source
        train_ds.skipped += unreadable  # counted with the files the check removed (skipped_files)
    val_batch = torch.stack(val) if val else torch.empty(0, 3, size, size)
    return train_ds, val_batch


# --------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a model's parameters and buffers.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) with n the number of updates,
    so short runs are not dominated by the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model`` (same structure; under FSDP sharded the same way,
        so each rank updates its own shards)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = [_local(p) for p in self.model.parameters()]
        src_p = [_local(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            _local(b_ema).copy_(_local(b))


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (shares its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# --------------------------------------------------------------------------------------------
# logging sinks


class _MetricsLog:
    """JSON lines always; TensorBoard when the ``tensorboard`` package is installed."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():  # drop lines past the checkpoint we resume from
            kept = []
            for lineno, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash (its step is past the checkpoint's)
                    logger.warning("%s:%d is not a complete JSON record; dropped", self.path, lineno)
                    continue
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            ckpt.atomic_write_text("".join(l + "\n" for l in kept), self.path)
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard drops the events after the checkpoint a resume starts from
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except Exception:  # tensorboard not installed: JSON lines only
            logger.debug("tensorboard not available; logging JSON lines only")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:  # strict JSON lines: a NaN loss or an inf PSNR as null
            f.write(json.dumps(ckpt.finite_json(record), allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------
# the loop


# Set by request_stop (a signal handler, another thread); cleared when a run's training loop ends.
# One per process: it stops whichever run is training (runs in parallel threads would share it).
_STOP_REQUESTED = threading.Event()


def request_stop() -> None:
    """Ask the running :func:`train` (or, if it is still setting up or not started yet, the next
    one) to stop after its current step: it writes a checkpoint and exports the model (no final
    validation), as when ``train.max_minutes`` is spent, and returns normally
    (``TrainResult.stopped_early``). Safe to call from a signal handler or another thread;
    ``dito-fast train`` calls it on SIGTERM (a scheduler's preemption notice). Under torchrun every
    rank stops at the same step once any rank was asked."""
    _STOP_REQUESTED.set()


@dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module  # the exported model (EMA weights when EMA is on), unsharded, on every rank
    step: int
    # (step, global mean loss) of every good step of this run
    losses: list[tuple[int, float]] = field(default_factory=list)
    skipped_steps: int = 0
    last_val: dict = field(default_factory=dict)
    images_seen: int = 0  # samples consumed over the whole run (steps x global batch), resumes included
    rank: int = 0
    world_size: int = 1
    raw_model: torch.nn.Module | None = None  # the trained (not averaged) weights; sharded in place under FSDP
    stopped_early: str | None = None  # "max_minutes" or "requested" (request_stop) when it stopped before train.steps
    skipped_files: int = 0  # unreadable data files skipped (all ranks, resumes included)


def lr_factor(step: int, t_cfg) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then constant or a cosine decay reaching ``lr_min_ratio`` at ``steps``."""
    warm = max(t_cfg.warmup_steps, 0)
    if warm and step < warm:
        return (step + 1) / warm
    if t_cfg.lr_decay == "cosine":
        progress = min(1.0, (step - warm) / max(t_cfg.steps - warm, 1))
        return t_cfg.lr_min_ratio + (1 - t_cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def validate(model: DiTo, images: torch.Tensor, steps: int, seed: int, sampler: str = "euler") -> tuple[dict, torch.Tensor]:
    """Reconstruction PSNR (dB) of held-out ``images`` with a fixed decoding seed.
    Returns ({"val_psnr": ...}, reconstructions)."""
    was_training = model.training
    model.eval()
    recon = model.reconstruct(images, steps=steps, sampler=sampler, seed=seed)
    model.train(was_training)
    return {"val_psnr": float(psnr(recon, images).mean())}, recon


# --------------------------------------------------------------------------------------------
# what the loop trains


class TrainTask:
    """The parts of a run that depend on what is trained; the loop (:func:`train`) is the rest.
    This class trains a DiTo tokenizer on images; :class:`dito_fast.train.dit.DiTTask` a DiT on
    latents. ``cfg``: the run's config (a dataclass with ``model``, ``data`` and ``train``)."""

    def validate_config(self, cfg) -> None:
        validate_run_config(cfg)

    def resolve_config(self, cfg, device: torch.device):
        """``cfg`` with settings that depend on the device made concrete."""
        return resolve_memory_format(cfg, device)

    def build_model(self, cfg) -> torch.nn.Module:
        return DiTo(cfg.model)

    def step_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """A module whose forward(*inputs, seeds) gives the per-sample losses (B,)."""
        return TrainStep(model)

    def datasets(self, cfg, resume_from: Path | None, train_dataset=None, val_data=None):
        """(training data, validation data) for :meth:`make_loader` and :meth:`validate`;
        ``train_dataset`` / ``val_data`` given by the caller replace the built ones;
        ``resume_from``: the checkpoint the run resumes from, or None. Every rank calls this,
        before the run's files are written."""
        if train_dataset is None or val_data is None:
            try:
                built_train, built_val = build_datasets(cfg)
            except Exception as e:
                _same_data_on_every_rank(None, failed=e)  # (told to the others, not left waiting)
                raise
            train_dataset = train_dataset if train_dataset is not None else built_train
            val_data = val_data if val_data is not None else built_val
        _same_data_on_every_rank(train_dataset)
        return train_dataset, val_data

    def make_loader(self, cfg, rank: int, world_size: int, start_step: int, num_steps: int, source,
                    device: torch.device):
        """This rank's batches of steps start_step.. (a :class:`dito_fast.data.BatchLoader`)."""
        return data.make_loader(cfg, rank, world_size, start_step=start_step, num_steps=num_steps, source=source,
                                device=device)

    def inputs(self, batch, model: torch.nn.Module, device: torch.device, first: bool) -> tuple[torch.Tensor, ...]:
        """The step module's tensor inputs from a loader batch (checked on the ``first`` step)."""
        x = batch["image"].to(device, non_blocking=True)
        if first:
            check_images(x, model.downsample_factor, name="training images")
        return (x,)

    def probe_inputs(self, cfg, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Inputs of ``n`` samples of the run's shapes (the automatic micro-batch's probe)."""
        size = cfg.data.image_size
        return (torch.rand(n, 3, size, size, device=device) * 2 - 1,)

    def validate(self, model: torch.nn.Module, val_data, cfg, step: int, run_dir: Path) -> dict:
        """Figures of ``model`` (the EMA weights when EMA is on) on the validation data (not
        empty), written where they belong. Rank 0 only."""
        images = val_data.to(next(model.parameters()).device)
        res, recon = validate(model, images, cfg.train.val_sample_steps, seed=cfg.train.seed)
        save_image(make_grid([images.cpu(), recon.cpu()]), run_dir / "samples" / f"recon_{step:08d}.png")
        logger.info("step %d: validation PSNR %.2f dB", step, res["val_psnr"])
        return res

    def checkpoint_files(self) -> dict:
        """Files every checkpoint holds besides the loop's own ({name: content}, as
        :func:`dito_fast.train.checkpoint.write_files` takes them)."""
        return {}

    def export(self, model: torch.nn.Module, directory: Path) -> None:
        """Write the trained model as a ``from_pretrained`` directory (rank 0 only)."""
        model.save_pretrained(directory)


TOKENIZER = TrainTask()


# --------------------------------------------------------------------------------------------
# helpers of the loop


class _PhaseTimer:
    """Seconds spent per phase of the step (data wait, forward, backward, optimizer) since the
    last :meth:`reset`. On CUDA the compute phases are timed with CUDA events (no
    synchronisation until :meth:`read`); the data wait is host time either way."""

    PHASES = ("data_wait", "forward", "backward", "optimizer")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self._events: list = []

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def read(self) -> dict:
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.totals[name] += start.elapsed_time(end) / 1000.0
            self._events = []
        return dict(self.totals)


def _rng_state(device: torch.device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


# Settings each node may resolve its own way (its GPUs, cores, loader and file checks); every other
# setting must be the same on every rank (_check_same_settings). The samples the file checks leave
# must be the same too (_same_data_on_every_rank).
HOST_LOCAL_SETTINGS = ("train.device", "train.threads", "train.micro_batch_size", "train.dist_timeout_minutes",
                       "data.workers", "data.loader", "data.check_files")


def _check_same_settings(cfg: RunConfig, ctx: DistContext) -> None:
    """Raise on every rank, naming the settings, when the ranks resolved different configs (a node
    given another --seed, batch size or config file had trained on without a word: other data, a
    diverging replica, or a collective left waiting). HOST_LOCAL_SETTINGS may differ."""
    if not ctx.distributed:
        return
    mine = {k: v for k, v in flat_dict(to_dict(cfg)).items() if k not in HOST_LOCAL_SETTINGS}
    every = distributed.all_gather_object(mine, ctx)
    keys = sorted({k for other in every for k in other} | set(every[0]))
    differ = [k for k in keys if any(other.get(k) != every[0].get(k) for other in every)]
    if differ:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {other.get(k)!r}" for r, other in enumerate(every))
                           for k in differ[:5])
        raise ValueError(f"the ranks resolved different settings ({detail}{'; ...' if len(differ) > 5 else ''}): "
                         f"start every rank with the same command line and config (only "
                         f"{', '.join(HOST_LOCAL_SETTINGS)} may differ)")


def _restore_rng(state: dict, ctx: DistContext, device: torch.device, seed: int, step: int) -> None:
    """This rank's saved RNG states when the world size is unchanged; otherwise a fresh seed
    from (seed, rank, step). (Training draws no numbers from these generators: the noise comes
    from per-sample generators; this keeps any other use of torch's RNG resumable.)"""
    ranks = state.get("rank_rng")
    mine = None
    if ranks is not None and len(ranks) == ctx.world_size:
        mine = ranks[ctx.rank]
    elif ctx.world_size == 1 and "cpu_rng" in state:
        mine = {"cpu": state["cpu_rng"]}
    if mine is None:
        torch.manual_seed(mix_seed(seed, ctx.rank, step))
        logger.info("world size changed since the checkpoint: RNG reseeded from (seed, rank, step)")
        return
    torch.set_rng_state(mine["cpu"])
    if device.type == "cuda" and mine.get("cuda") is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)


_JOB_MARKER = ".torchrun_job"


def _read_job_marker(marker: Path) -> dict | None:
    """The marker a torchrun job's accepted first attempt wrote (run id, start checkpoint, the
    checkpoints the folder held then), or None (absent or unreadable)."""
    try:
        mine = json.loads(marker.read_text())
        return mine if isinstance(mine, dict) and isinstance(mine.get("run_id"), str) else None
    except (OSError, ValueError):
        return None


def _data_description(dataset) -> dict | None:
    """{"samples": count, "digest": hash of every sample's name and label} of a training source
    that names its samples (a folder, a file list, tar shards), names relative to their common
    folder (a data set moved to another mount is the same data); None for other data (synthetic,
    builtin, a caller's Dataset: made from the seed, or unknown). Stored in checkpoints, so that a
    resume on data that gained, lost or relabelled samples says so (its batches then differ
    from an uninterrupted run's). 0.55 s for ImageNet-1k's 1.28 M names on the 2-core development CPU."""
    import hashlib

    if not isinstance(dataset, data.Source) or not isinstance(getattr(dataset, "labels", None), np.ndarray):
        return None
    names = [dataset.name(i) for i in range(len(dataset))]
    if not names:
        return None
    prefix = os.path.commonprefix(names)  # (as strings: the folder they share, and more)
    cut = prefix.rfind(os.sep) + 1  # names from the shared folder on
    text = "".join(f"{name[cut:]}\0{label}\n" for name, label in zip(names, dataset.labels.tolist()))
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return {"samples": len(names), "digest": digest}


def _same_data_on_every_rank(dataset, failed: Exception | None = None) -> None:
    """Under torchrun, check that every rank found the same training samples: each lists and
    screens ``data.source`` itself, and a node's copy of the data with a file more, or another
    ``data.check_files`` (GIFs are kept with "none" only), gave the ranks sample lists of other
    lengths, hence other shuffles and duplicated samples, without a word. Every rank's
    :func:`_data_description` is all-gathered; where they differ, or a rank ``failed`` to build its
    data, every rank raises (ValueError naming the ranks; the rank that failed, its own error). A
    single process, or data that names no samples (synthetic, builtin): nothing to compare."""
    every = distributed.every_rank_description(
        None if failed is not None else _data_description(dataset), failed,
        "rank {rank} could not build its training data ({error}); every rank must read the same data")
    if every is None or all(d == every[0] for d in every):
        return
    said = "; ".join(f"rank {r}: " + (f"{d['samples']} samples (digest {d['digest']})" if d else "unnamed samples")
                     for r, d in enumerate(every))
    raise ValueError(f"the ranks found different training samples ({said}): every rank must see the same files, "
                     "screened alike (is a node's copy of the data different, or data.check_files set differently?)")


def _run_inside_data(run_dir: Path, source) -> tuple[str, str] | None:
    """("ValueError", why) when the run's folder lies inside the data folder (its sample grids and
    checkpoints would become training data, and the set change between a run and its resume);
    None otherwise."""
    folder = Path(str(source))
    if not folder.is_dir() or not run_dir.resolve().is_relative_to(folder.resolve()):
        return None
    return "ValueError", (f"the output directory {run_dir} is inside the data folder {folder}: the run's images and "
                          "files would be read as training data; write the run elsewhere")


def _resume_point(run_dir: Path, resume, ctx: DistContext):
    """Rank 0's decision: ("ok", checkpoint path or None) or (exception class name, message).

    A torchrun restart (attempt > 0) of a job whose first attempt was accepted in ``run_dir`` (the
    marker holds its run id) resumes from the newest checkpoint the job itself wrote there (one
    the folder did not hold when the job started), whatever ``resume`` says; before the job has
    written one it starts where the first attempt did. A first attempt whose run id is the
    marker's (a new launch reusing ``--rdzv-id``, or "none" for a static rendezvous) clears it, so
    if it is refused (the folder holds another run's checkpoints) its restarts stay refused
    instead of taking that run over; another job's marker is left alone. Resuming from a given
    checkpoint into a folder that holds newer ones is refused: they would be taken for this run's
    (by ``--resume`` and by pruning)."""
    marker = run_dir / _JOB_MARKER
    mine = _read_job_marker(marker) if ctx.run_id else None
    if mine is not None and mine["run_id"] == ctx.run_id:
        if ctx.restart_count > 0:
            held = set(mine.get("held", []))
            own = [c for c in ckpt.list_checkpoints(run_dir) if c.name not in held]
            start = own[-1] if own else (Path(mine["start"]) if mine.get("start") else None)
            logger.warning("torchrun restart %d of job %s: resuming from %s", ctx.restart_count, ctx.run_id,
                           start if start is not None else "the start (no checkpoint written yet)")
            return "ok", start
        marker.unlink(missing_ok=True)
    if resume is True:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            logger.warning("resume: no checkpoint in %s; starting at step 0", run_dir)
        return "ok", latest
    if resume:
        path = Path(resume)
        if not (path / "COMPLETE").is_file():
            return "FileNotFoundError", f"not a complete checkpoint directory: {path}"
        step = ckpt.checkpoint_step(path)
        newer = [c for c in ckpt.list_checkpoints(run_dir) if step is not None and ckpt.checkpoint_step(c) > step]
        if newer:
            return "FileExistsError", (f"{run_dir} holds checkpoints newer than {path} ({newer[-1].name}): they "
                                       "would be taken for this run's; choose another output directory (--out) or "
                                       "move them away")
        return "ok", path
    if ckpt.latest_checkpoint(run_dir) is not None:
        return "FileExistsError", (f"{run_dir} already holds checkpoints; pass resume=True (--resume) to continue "
                                   "or choose another output directory")
    return "ok", None


def _resume_changes(cfg: RunConfig, resume_from: Path) -> list[str]:
    """The settings of ``cfg`` that differ from those the checkpoint was written with, as
    "key old -> new" lines. Raises ValueError if a model setting differs, its name too: those
    define what the weights are, and one that keeps the tensors' shapes (the flow objective, noise
    synchronisation, ...) would otherwise go on training the weights for something else (a
    renamed run would label them as another preset's)."""
    path = resume_from / "config.json"
    if not path.is_file():
        return []
    try:
        saved = flat_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:  # (JSON and UTF-8 errors are ValueErrors)
        raise ValueError(f"cannot read the checkpoint's config {path}: {e}") from None
    now = flat_dict(json.loads(json.dumps(to_dict(cfg))))  # tuples as the JSON file has them: lists
    changed = [(k, saved.get(k, "<absent>"), now.get(k, "<absent>")) for k in sorted(set(saved) | set(now))
               if saved.get(k, "<absent>") != now.get(k, "<absent>")]
    # a key one side lacks is a setting an older or newer version did not have: not compared
    model = [f"{k} {a!r} -> {b!r}" for k, a, b in changed if k.startswith("model.") and k in saved and k in now]
    if model:
        raise ValueError(f"{resume_from} holds a model trained with other settings than this run's: "
                         f"{'; '.join(model[:6])}{' ...' if len(model) > 6 else ''}. Resume with the checkpoint's "
                         f"model settings (its config.json), or start a new run")
    return [f"{k} {a!r} -> {b!r}" for k, a, b in changed if not k.startswith("model.")]


def _state_entry(state: dict, key: str, resume_from: Path):
    if key not in state:
        raise ValueError(f"{resume_from / 'state.pt'} has no {key!r} entry: not a complete dito_fast checkpoint")
    return state[key]


def _plain_model(task: TrainTask, cfg, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """An unsharded model holding ``state`` (built on the meta device: no random init)."""
    with torch.device("meta"):
        net = task.build_model(cfg)
    net.load_state_dict(state, assign=True)
    return net.to(device)


def _auto_micro_batch(task: TrainTask, model: torch.nn.Module, cfg, device: torch.device, n: int) -> int:
    """The largest micro-batch (n, halving) whose forward + backward fits in GPU memory next to
    the optimizer state still to be allocated (AdamW: two tensors per parameter)."""
    step_module = task.step_module(model)
    state_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())

    def try_step(m: int) -> None:
        reserve = torch.empty(state_bytes, dtype=torch.uint8, device=device)  # noqa: F841 (held while probing)
        inputs = task.probe_inputs(cfg, m, device)
        with _autocast(device, cfg.train.precision):
            loss = step_module(*inputs, list(range(m))).float().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        return find_micro_batch(try_step, n)
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# the loop


def train(cfg: RunConfig, out_dir, resume: bool | str = False, train_dataset: Dataset | None = None,
          val_images: torch.Tensor | None = None, progress: bool | None = None, *,
          task: TrainTask = TOKENIZER) -> TrainResult:
    """Train a DiTo tokenizer as configured; write logs, checkpoints and the final model.

    out_dir/config.json        the resolved RunConfig
    out_dir/metrics.jsonl      one JSON record per log/validation event (loss, throughput, step-time split)
    out_dir/events.jsonl       start / resume / checkpoint / stop events, with attempt and world size
    out_dir/checkpoints/       step_<N>/ (model, EMA, optimizer, RNG, counters), ``latest``
    out_dir/samples/           reconstruction grids (top: input, bottom: reconstruction)
    out_dir/model/             the exported model (config.json + model.safetensors; EMA weights)

    ``resume``: False (start fresh; an existing checkpoint in out_dir is an error, except on a
    torchrun restart of the job that wrote it), True (resume from the latest complete checkpoint
    in out_dir if there is one) or a checkpoint directory.
    ``train_dataset`` / ``val_images`` replace the datasets built from ``cfg.data``.

    Launched by torchrun (or with a process group already initialised), the run is
    data-parallel: ``train.batch_size`` is the global batch, ``train.parallel`` picks DDP or
    FSDP, and only rank 0 writes files (see the module docstring of dito_fast.train.parallel).

    ``task``: what is trained (default: a DiTo tokenizer; :func:`dito_fast.train.dit.train_dit`
    passes a DiT's); ``val_images`` is then that task's validation data.
    """
    task.validate_config(cfg)
    t_cfg = cfg.train
    if t_cfg.threads > 0:
        torch.set_num_threads(t_cfg.threads)
    ctx, device = distributed.setup(t_cfg.dist_backend, t_cfg.device, t_cfg.dist_timeout_minutes or None)
    cfg = task.resolve_config(cfg, device)
    ok, lock = False, None
    try:
        lock, busy = _lock_run(Path(out_dir)) if ctx.is_main else (None, None)
        result = _train(task, cfg, Path(out_dir), resume, train_dataset, val_images, progress, ctx, device, busy)
        ok = True
        return result
    except BaseException as e:
        if ctx.distributed:  # the tracebacks' frames hold the DDP wrapper: free it before the group (see teardown)
            _clear_frames(e)
        raise
    finally:
        if lock is not None:
            with contextlib.suppress(ValueError):
                _HELD_LOCKS.remove(lock)
            lock.close()  # (releases it)
        distributed.teardown(ctx, ok)


_LOCK_FILE = ".lock"
_HELD_LOCKS: list = []  # the open lock files of this process's runs


def _close_inherited_locks() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file: its copy would keep the
    # run locked after the trainer dies (until the orphan notices); closing it leaves the parent's.
    for f in _HELD_LOCKS:
        with contextlib.suppress(OSError, ValueError):
            f.close()
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _lock_run(run_dir: Path):
    """(the open lock file of ``run_dir``, None), or (None, (exception class name, why the run
    cannot start)). The lock is an exclusive ``flock`` on ``run_dir/.lock``, held by rank 0 for
    the whole run, so that a second training process on the same folder (a job relaunched while
    the first still runs) is refused instead of writing the same checkpoints, metrics and model
    (it had deleted the first one's half-written checkpoint and rewritten its metrics). The lock
    dies with the process (forked children close their copy), so a killed run leaves nothing to
    clear. Where the file system has no locks: a warning, and no lock."""
    import fcntl
    import socket

    if run_dir.exists() and not run_dir.is_dir():
        return None, ("NotADirectoryError", f"the output directory {run_dir} is a file; give a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / _LOCK_FILE, "a+")
    except OSError as e:
        return None, ("OSError", f"cannot create the output directory {run_dir} or its lock file: {e}")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return None, ("BlockingIOError", f"{run_dir} is in use by another training process ({holder}); wait for it "
                      "to end, stop it, or choose another output directory")
    except OSError as e:  # (no locks on this file system, e.g. some network mounts)
        logger.warning("could not lock %s (%s): nothing stops a second training process on this folder", run_dir, e)
        return f, None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD_LOCKS.append(f)
    return f, None


def _clear_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames in ``exc``'s traceback and in those of the
    exceptions it chains to (``__cause__``, ``__context__``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def resolve_memory_format(cfg: RunConfig, device: torch.device) -> RunConfig:
    """``cfg`` with ``data.memory_format="auto"`` made concrete: channels_last batches on the CPU
    (the models convert NCHW input to channels_last there anyway, for the Winograd convolutions and
    fused norms, which work NHWC), contiguous on other devices. Only the batches' layout: the
    parameters stay in the default layout (see _train)."""
    if cfg.data.memory_format != "auto":
        return cfg
    fmt = data.resolve_memory_format("auto", device)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, memory_format=fmt))


def _train(task: TrainTask, cfg, run_dir: Path, resume, train_dataset, val_data, progress, ctx: DistContext,
           device: torch.device, busy: tuple[str, str] | None = None) -> TrainResult:
    """The run (see :func:`train`); ``busy``: rank 0's reason the run folder cannot be used
    (:func:`_lock_run`), told to every rank with the resume point."""
    t_cfg = cfg.train
    is_main, G, W = ctx.is_main, t_cfg.batch_size, ctx.world_size
    events_path = run_dir / "events.jsonl"

    def event(kind: str, **fields) -> None:
        if is_main:
            with open(events_path, "a") as f:
                f.write(json.dumps(ckpt.finite_json({"event": kind, "time": time.time(), "attempt": ctx.restart_count,
                                                     "world_size": W, **fields}), allow_nan=False) + "\n")

    # -- resume point: decided by rank 0, the same on every rank
    decision = None
    if is_main:
        decision = busy
        if decision is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            decision = _run_inside_data(run_dir, cfg.data.source) or _resume_point(run_dir, resume, ctx)
    status, detail = distributed.broadcast_object(decision, ctx)
    if status != "ok":
        raise {"FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError, "ValueError": ValueError,
               "BlockingIOError": BlockingIOError, "NotADirectoryError": NotADirectoryError,
               "OSError": OSError}[status](detail)
    resume_from = Path(detail) if detail is not None else None
    _check_same_settings(cfg, ctx)
    if is_main and ctx.run_id and ctx.distributed and ctx.restart_count == 0:
        # at once: a first attempt that fails later in its set-up still marks the job, so that its
        # restarts resume by themselves (from the job's own checkpoints) whatever --resume said
        ckpt.atomic_write_json({"run_id": ctx.run_id, "start": None if resume_from is None else str(resume_from),
                                "held": [c.name for c in ckpt.list_checkpoints(run_dir)]}, run_dir / _JOB_MARKER)

    # -- model, EMA (built identically on every rank), checkpoint weights in the full format
    torch.manual_seed(t_cfg.seed)  # weight init
    # The parameters stay in the default layout whatever the batches' layout: the models run their
    # activations channels_last on the CPU by themselves (ops.conv_activation_format), and torch's
    # fused AdamW copies every channels_last parameter, gradient and moment to a contiguous tensor
    # and back on each step (dito-S: 31.8 ms against 23.0 ms per step on the 2-core development
    # machine, 2026-12-03; benchmarks/bench_model.py::test_optimizer_step_layout).
    model = task.build_model(cfg)
    ema = EMA(model, t_cfg.ema_decay) if t_cfg.ema_decay > 0 else None
    # Then each rank its own stream of torch's global RNG (training's noise and data do not draw
    # from it: per-sample generators), replaced by the checkpoint's when resuming.
    torch.manual_seed(mix_seed(t_cfg.seed, ctx.rank, 0))
    out_format = "dcp" if t_cfg.parallel == "fsdp" else "safetensors"
    state, in_format = None, None
    changes: list[str] = []
    if resume_from is not None:
        changes = _resume_changes(cfg, resume_from)
        in_format = ckpt.checkpoint_format(resume_from)
        try:
            state = ckpt.load_torch(resume_from / "state.pt")
            if in_format == "safetensors":
                model.load_state_dict(ckpt.load_weights(resume_from / "model.safetensors"))
                if ema is not None:
                    if not (resume_from / "ema.safetensors").is_file() and (resume_from / "model.safetensors").is_file():
                        raise ValueError(f"{resume_from} holds no EMA weights (written by a run with "
                                         "train.ema_decay=0): resume with train.ema_decay=0")
                    ema.model.load_state_dict(ckpt.load_weights(resume_from / "ema.safetensors"))
        except (ValueError, FileNotFoundError) as e:  # a damaged file: name the complete checkpoint before it
            step = ckpt.checkpoint_step(resume_from)
            earlier = [c for c in ckpt.list_checkpoints(resume_from.parent.parent)
                       if step is not None and (ckpt.checkpoint_step(c) or 0) < step]
            if not earlier or "EMA weights" in str(e):
                raise
            raise type(e)(f"{e}; the checkpoint before it, {earlier[-1]}, is complete: move {resume_from} out of "
                          f"{resume_from.parent} and --resume again, or --resume {earlier[-1]} --out <another "
                          "folder>") from None

    # -- how this rank processes its share of the global batch
    mode = t_cfg.parallel if ctx.distributed else "single"
    micro = t_cfg.micro_batch_size
    if mode != "fsdp":
        model.to(device)
    if micro == 0 and t_cfg.grad_accum_steps == 1 and device.type == "cuda" and mode != "fsdp":
        share = plan_batches(G, ctx.rank, W).share
        micro = _auto_micro_batch(task, model, cfg, device, share)
        m = torch.tensor([micro], device=device)
        distributed.all_reduce_(m, ctx, torch.distributed.ReduceOp.MIN if ctx.distributed else None)
        micro = int(m.item())
        if micro < share:
            logger.info("auto micro-batch: %d samples per pass (%d per rank did not fit)", micro, share)
    plan = plan_batches(G, ctx.rank, W, micro, t_cfg.grad_accum_steps, equal_passes=mode == "fsdp")

    n_params = sum(p.numel() for p in model.parameters())
    pm = ParallelModel(model, ema.model if ema is not None else None, mode, ctx, device, task.step_module(model))
    opt_kwargs = dict(lr=t_cfg.lr, betas=tuple(t_cfg.betas), weight_decay=t_cfg.weight_decay)
    # The fused AdamW kernel exists for CPU and CUDA (2.7x faster than foreach for dito-S on this CPU).
    if device.type in ("cpu", "cuda"):
        opt_kwargs["fused"] = True
    else:
        opt_kwargs["foreach"] = True
    optimizer = torch.optim.AdamW(model.parameters(), **opt_kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t_cfg))

    start_step, skipped_total = 0, 0
    if resume_from is not None:
        def need(key):
            return _state_entry(state, key, resume_from)
        if in_format == "safetensors":
            pm.load_full_optimizer_state(optimizer, need("optimizer"))
        else:
            pm.load_sharded(resume_from / "dcp", optimizer, need("optimizer_param_groups"))
        sched.load_state_dict(need("scheduler"))
        start_step, skipped_total = int(need("step")), int(need("skipped_steps"))
        _restore_rng(state, ctx, device, t_cfg.seed, start_step)
        if ema is not None:
            ema.updates = int(need("ema_updates"))
        if changes:
            logger.warning("resuming from %s with settings changed since it was written (the new values apply from "
                           "here on): %s", resume_from, "; ".join(changes))
        if any(c.split(" ", 1)[0] in ("train.lr", "train.betas", "train.weight_decay") for c in changes):
            # the optimizer and scheduler states restore the old hyperparameters: this run's replace them
            sched.base_lrs = [t_cfg.lr] * len(optimizer.param_groups)
            for group in optimizer.param_groups:
                group.update(initial_lr=t_cfg.lr, betas=tuple(t_cfg.betas), weight_decay=t_cfg.weight_decay)
        # The next step's rate from this run's schedule: the restored one is the old schedule's (a
        # run extended with more train.steps had taken its first resumed step at the old end's rate).
        # Unchanged settings give the very value the scheduler stored.
        for group, base in zip(optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * lr_factor(sched.last_epoch, t_cfg)
        sched._last_lr = [group["lr"] for group in optimizer.param_groups]
        if int(state.get("global_batch", G)) != G:
            logger.warning("the global batch changed from %s to %d: the data position is recomputed as step x batch",
                           state.get("global_batch"), G)
        logger.info("resumed from %s at step %d (saved by world size %s, now %d)", resume_from, start_step,
                    state.get("world_size", 1), W)
    images_seen = int(state.get("images_seen", start_step * G)) if state is not None else 0
    window = [float(v) for v in state.get("loss_window", [])] if state is not None else []
    last_saved = start_step if resume_from is not None else -1
    if start_step > t_cfg.steps:
        raise ValueError(f"{resume_from} is at step {start_step}, past train.steps={t_cfg.steps}: nothing to train. "
                         "Give more steps, or write that checkpoint's model with dito_fast.train.export_checkpoint "
                         "(dito-fast export)")

    # -- data (built before the run's files are written: a bad data source leaves the folder as it was)
    train_dataset, val_data = task.datasets(cfg, resume_from, train_dataset, val_data)
    data_said = _data_description(train_dataset) if is_main else None
    if is_main and state is not None and state.get("data") and data_said and state["data"] != data_said:
        then, now = state["data"]["samples"], data_said["samples"]
        logger.warning("the training data changed since %s was written (%d samples then, %d now%s): the batches from "
                       "step %d on differ from those of an uninterrupted run", resume_from, then, now,
                       "; other files or labels" if then == now else "", start_step)
        event("data_changed", step=start_step, samples_then=then, samples_now=now)
    if is_main:
        ckpt.atomic_write_json(to_dict(cfg), run_dir / "config.json")
    event("resume" if resume_from is not None else "start", step=start_step,
          checkpoint=resume_from.name if resume_from is not None else None, parallel=mode,
          micro_batches=list(plan.micro))
    n_remaining = max(t_cfg.steps - start_step, 0)
    loader = task.make_loader(cfg, ctx.rank, W, start_step, n_remaining, train_dataset, device)
    if state is not None:
        loader.mark_unreadable([tuple(f) for f in state.get("unreadable_files", [])])

    metrics = _MetricsLog(run_dir, start_step) if is_main else None
    logger.info("training %s (%.2f M params) on %s, %d threads, steps %d..%d, global batch %d over %d rank(s) "
                "(%s; %d per rank in micro-batches %s)", cfg.model.name, n_params / 1e6, device,
                torch.get_num_threads(), start_step, t_cfg.steps, G, W, mode, plan.share, list(plan.micro))

    def save(step: int) -> Path | None:
        # every rank takes part: RNG states are gathered, DCP shards written by each rank
        nonlocal last_saved
        last_saved = step
        st = {"scheduler": sched.state_dict(), "step": step, "skipped_steps": skipped_total, "bad_streak": bad_streak,
              "ema_updates": ema.updates if ema is not None else 0, "images_seen": images_seen,
              "loss_window": list(window),  # the losses since the last log line: a resume's first line averages them too
              "global_batch": G, "world_size": W, "parallel": mode, "format": out_format, "data": data_said}
        rng = distributed.all_gather_object(_rng_state(device), ctx)
        st["cpu_rng"], st["rank_rng"] = rng[0]["cpu"], rng
        # files the ranks found unreadable while reading: a resume skips and counts them from its start
        found = distributed.all_gather_object(loader.unreadable_reasons(), ctx)
        st["unreadable_files"] = sorted({tuple(f) for rank_files in found for f in rank_files})
        path, tmp = None, None
        try:  # a failed write (a full disk, say) removes its half-written folder; the previous checkpoint stays
            if out_format == "dcp":
                tmp = distributed.broadcast_object(str(ckpt.begin_checkpoint(run_dir, step)) if is_main else None, ctx)
                tensors, st["optimizer_param_groups"] = pm.sharded_state(optimizer)
                save_dcp(tensors, Path(tmp) / "dcp")  # returns once every rank's shards and the metadata are written
                if is_main:
                    ckpt.write_files(tmp, {"config.json": to_dict(cfg), "state.pt": st, **task.checkpoint_files()})
                    distributed.fault_point("checkpoint_write", step, ctx)
                    path = ckpt.commit_checkpoint(run_dir, step, tmp)
            elif is_main:
                st["optimizer"] = optimizer.state_dict()
                files = {"model.safetensors": model.state_dict(), "config.json": to_dict(cfg), "state.pt": st,
                         **task.checkpoint_files()}
                if ema is not None:
                    files["ema.safetensors"] = ema.model.state_dict()
                tmp = ckpt.begin_checkpoint(run_dir, step)
                ckpt.write_files(tmp, files)
                distributed.fault_point("checkpoint_write", step, ctx)
                path = ckpt.commit_checkpoint(run_dir, step, tmp)
        except BaseException:
            if is_main and tmp is not None and Path(tmp).exists():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        distributed.barrier(ctx)  # rank 0 has committed before any rank goes on
        if is_main:
            ckpt.prune_checkpoints(run_dir, t_cfg.keep_checkpoints)
            event("checkpoint", step=step, checkpoint=path.name, images_seen=images_seen)
            logger.info("checkpoint written: %s", path)
        return path

    def run_validation(step: int) -> dict:
        # every rank calls this; under FSDP the EMA weights are gathered to rank 0 first
        if len(val_data) == 0:
            return {}
        if pm.sharded:
            full = pm.full_state_dict("ema" if ema is not None else "model")
            if not is_main:
                return {}
            net = _plain_model(task, cfg, full, device)
        else:
            if not is_main:
                return {}
            net = ema.model if ema is not None else model
        res = task.validate(net, val_data, cfg, step, run_dir)
        if res:
            metrics.write({"step": step, **res})
        return res

    def files_skipped() -> int:
        # every rank calls this: the up-front check's files (the same in every process) and the
        # union of those the ranks found unreadable while reading (each rank reads its own share)
        found = distributed.all_gather_object(loader.found_unreadable, ctx)
        return len(loader.source.skipped) + len(set().union(*found))

    result = TrainResult(run_dir=run_dir, model=model, step=start_step, skipped_steps=skipped_total,
                         rank=ctx.rank, world_size=W, raw_model=model)
    model.train()
    timer = _PhaseTimer(device)
    bad_streak = int(state.get("bad_streak", 0)) if state is not None else 0  # a streak goes on across a resume
    steps_since_log, last_validated = 0, -1
    show_bar = (sys.stderr.isatty() if progress is None else progress) and is_main
    bar = None
    if show_bar:
        from tqdm.auto import tqdm
        bar = tqdm(total=t_cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    weights = None
    if plan.slots > plan.share:  # FSDP with uneven shares: zero-weight padding keeps the passes equal
        weights = torch.ones(plan.slots, device=device)
        weights[plan.share:] = 0
    step = start_step
    t_start = t_last = t_fetch = time.perf_counter()
    try:
        for batch in loader:
            inputs = task.inputs(batch, model, device, first=step == start_step)
            timer.add("data_wait", time.perf_counter() - t_fetch)
            if inputs[0].shape[0] != plan.share:
                raise RuntimeError(f"the loader gave {inputs[0].shape[0]} samples, expected this rank's share "
                                   f"{plan.share}")
            seeds = sample_seeds(t_cfg.seed, step, plan.start, plan.stop)
            if plan.slots > plan.share:
                pad = plan.slots - plan.share
                inputs = tuple(torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for v in inputs)
                seeds += seeds[-1:] * pad

            # forward + backward over the micro-batches; the gradient is that of the global mean loss
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            lo = 0
            for j, m in enumerate(plan.micro):
                with pm.micro_batch_context(last=j == len(plan.micro) - 1):
                    with timer.phase("forward"), _autocast(device, t_cfg.precision):
                        per = pm.step_module(*(v[lo:lo + m] for v in inputs), seeds[lo:lo + m]).float()  # (m,)
                        if weights is not None:
                            per = per * weights[lo:lo + m]
                    with timer.phase("backward"):
                        (per.sum() * plan.scale).backward()
                loss_sum += per.detach().sum().double()
                lo += m

            # what every rank must agree on: the global loss (finite?), the time budget, a stop request
            over = t_cfg.max_minutes > 0 and time.perf_counter() - t_start > 60 * t_cfg.max_minutes
            agreed = torch.tensor([0.0, float(over), float(_STOP_REQUESTED.is_set())], dtype=torch.float64,
                                  device=device)
            agreed[0] = loss_sum
            total_loss, n_over, n_requested = distributed.all_reduce_(agreed, ctx).tolist()
            loss_v = total_loss / G
            stop = "requested" if n_requested > 0 else "max_minutes" if n_over > 0 else None
            images_seen += G
            steps_since_log += 1

            with timer.phase("optimizer"):
                bad = None if math.isfinite(loss_v) else "loss"
                grad_norm = torch.tensor(0.0)
                if bad is None:
                    # the global norm (the same on every rank), also without clipping (max_norm inf):
                    # a finite loss can come with a non-finite gradient
                    grad_norm = pm.clip_grad_norm(t_cfg.max_grad_norm if t_cfg.max_grad_norm > 0 else math.inf)
                    bad = None if torch.isfinite(grad_norm) else "gradient norm"
                step_lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler then sets the next one's)
                if bad is None:
                    optimizer.step()
                    sched.step()
                    if ema is not None:
                        ema.update(model)
            step += 1
            if bad is not None:  # skip the update, count it, stop after too many in a row
                bad_streak += 1
                skipped_total += 1
                optimizer.zero_grad(set_to_none=True)
                logger.warning("step %d: non-finite %s, skipped (%d in a row)", step, bad, bad_streak)
                if bad_streak >= t_cfg.max_bad_steps:
                    event("diverged", step=step)
                    last = ckpt.latest_checkpoint(run_dir)
                    raise TrainingDivergedError(
                        f"{bad_streak} consecutive steps with a non-finite {bad} at step {step}; stopping. The "
                        f"weights are step {step - bad_streak}'s (skipped steps leave them); "
                        + (f"the latest checkpoint is {last}" if last is not None else "no checkpoint was written")
                        + " (lower train.lr or check the data)")
            else:
                bad_streak = 0
                result.losses.append((step, loss_v))
                window.append(loss_v)
                distributed.fault_point("after_step", step, ctx)
            if bar is not None:
                bar.update(1)
                if bad is None:
                    bar.set_postfix(loss=f"{loss_v:.4f}")

            # The periodic work, after skipped steps too (their weights are the last good ones)
            if step % t_cfg.log_every_steps == 0 or step == t_cfg.steps:
                now = time.perf_counter()
                spent = timer.read()
                n, dt = steps_since_log, now - t_last
                mine = [n * plan.share / dt] + [spent[k] / n for k in _PhaseTimer.PHASES]
                rows = distributed.all_gather_rows(mine, ctx, device)  # every rank's throughput and split
                skipped_files = files_skipped()
                if is_main:
                    # loss: the mean over the good steps since the last record (None: all skipped)
                    rec = {"step": step, "loss": sum(window) / len(window) if window else None, "lr": step_lr,
                           "grad_norm": float(grad_norm), "images_per_s": n * G / dt,
                           "images_per_s_rank": mine[0], "step_time_s": dt / n,
                           **{f"{k}_s": v for k, v in zip(_PhaseTimer.PHASES, mine[1:])},
                           "skipped_steps": skipped_total, "images_seen": images_seen,
                           "threads": torch.get_num_threads(), "world_size": W,
                           "skipped_files": skipped_files}
                    if W > 1:
                        rec["images_per_s_per_rank"] = [r[0] for r in rows]
                        rec["step_time_split_per_rank"] = [r[1:] for r in rows]
                    metrics.write(rec)
                    logger.info("step %d/%d loss %s  %.1f img/s (%d rank(s))", step, t_cfg.steps,
                                "n/a (skipped)" if rec["loss"] is None else f"{rec['loss']:.4f}",
                                rec["images_per_s"], W)
                window, t_last, steps_since_log = [], now, 0
                timer.reset()
            t_book = time.perf_counter()
            booked = False
            if t_cfg.val_every_steps > 0 and step % t_cfg.val_every_steps == 0 and step != t_cfg.steps:
                result.last_val = run_validation(step) or result.last_val
                last_validated, booked = step, True
            if t_cfg.checkpoint_every_steps > 0 and step % t_cfg.checkpoint_every_steps == 0 \
                    and step != t_cfg.steps:
                save(step)
                booked = True
            if booked and not stop:  # a SIGTERM during the validation or checkpoint: stop now, not a step later
                asked = torch.tensor([float(_STOP_REQUESTED.is_set())], dtype=torch.float64, device=device)
                stop = "requested" if distributed.all_reduce_(asked, ctx).item() > 0 else None
            t_last += time.perf_counter() - t_book  # throughput counts training steps only
            if stop and step < t_cfg.steps:  # (on the last step: the run has simply ended)
                logger.warning("stopping at step %d: %s", step, "a stop was requested (request_stop, SIGTERM)"
                               if stop == "requested" else f"the {t_cfg.max_minutes:.1f}-minute budget is spent")
                event("stop", step=step, reason=stop)
                result.stopped_early = stop
                break
            t_fetch = time.perf_counter()
    except BaseException as e:  # a diverged run, a data error, Ctrl-C: release the loader and the logs too
        if not isinstance(e, TrainingDivergedError):  # (that one has its own "diverged" event)
            event("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", step=step,
                  error=f"{type(e).__name__}: {e}"[:500])
        loader.close()
        if metrics is not None:
            metrics.close()
        raise
    finally:
        # the request, if any, was for this run (made before it or during it): the next run starts without it
        _STOP_REQUESTED.clear()
        if bar is not None:
            bar.close()

    result.step, result.skipped_steps, result.images_seen = step, skipped_total, images_seen
    loader.close()
    skipped_files = result.skipped_files = files_skipped()
    if skipped_files and is_main:
        logger.warning("%d unreadable data files were skipped%s", skipped_files, " (all ranks)" if W > 1 else "")
    if step > start_step or resume_from is None:
        if step != last_saved:  # a time-budget stop at a checkpoint step has saved it already
            save(step)
        # nor validate twice at a validation step, nor when asked to stop (a preemption's grace
        # period is for the checkpoint and the export)
        if step != last_validated and result.stopped_early != "requested":
            result.last_val = run_validation(step) or result.last_val
    if metrics is not None:
        metrics.close()
    if mode == "ddp" and not distributed.replicas_agree(model, ctx):
        logger.error("the model replicas differ across ranks after training (DDP should keep them identical)")
        event("replicas_differ", step=step)
    if pm.sharded:
        exported = _plain_model(task, cfg, pm.full_state_dict("ema" if ema is not None else "model", all_ranks=True),
                                torch.device("cpu"))
    else:
        exported = ema.model if ema is not None else model
    if is_main:
        task.export(exported, run_dir / "model")
        event("done", step=step, images_seen=images_seen)
    distributed.barrier(ctx)
    result.model = exported
    logger.info("done: %d steps, %d skipped; model saved to %s", step, skipped_total, run_dir / "model")
    return result
