"""Export a training checkpoint as a model directory that ``DiTo.from_pretrained`` (or, for a
``train-dit`` run, ``DiT.from_pretrained``) loads.

A run exports its final model to ``<run>/model/`` by itself; this takes any complete checkpoint
(an earlier step, a run stopped by a crash or a preemption, one written under FSDP in DCP shards)
without resuming the run: ``dito_fast.train.export_checkpoint(src, out)`` or ``dito-fast export``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..config import ModelConfig, from_dict, validate_model_config
from ..models._pretrained import CONFIG_NAME, WEIGHTS_NAME, model_kind, state_mismatch
from ..models.dit import DiT, DiTConfig, validate_dit_config
from ..models.dito import DiTo
from . import checkpoint as ckpt
from .dit import LATENTS_FILE
from .parallel import load_dcp

logger = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "model")


def find_checkpoint(source: str | Path) -> Path:
    """The checkpoint directory ``source`` names: a complete ``step_N`` directory itself, or the
    newest complete checkpoint of a run directory (``dito-fast train --out``) or of its
    ``checkpoints/`` folder. Raises FileNotFoundError naming what was looked for."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {source}")
    if not source.is_dir():
        raise NotADirectoryError(f"{source} is a file; give a checkpoint directory (step_N) or a run directory")
    if (source / "COMPLETE").is_file():
        return source
    if ckpt.checkpoint_step(source) is not None:
        raise FileNotFoundError(f"{source} is an incomplete checkpoint (no COMPLETE marker: its write was "
                                "interrupted); export an earlier one")
    run_dir = source.parent if source.name == "checkpoints" else source
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'}")
    return latest


def export_checkpoint(source: str | Path, out_dir: str | Path, weights: str = "auto",
                      overwrite: bool = False) -> Path:
    """Write the model of a training checkpoint to ``out_dir`` (config.json + model.safetensors,
    as ``DiTo.save_pretrained``) and return the checkpoint directory it came from.

    ``source``: a checkpoint directory or a run directory (its newest complete checkpoint; see
    :func:`find_checkpoint`). ``weights``: "ema" (the EMA weights, what the trainer exports),
    "model" (the raw trained weights), or "auto" (EMA when the checkpoint holds them). Both
    checkpoint formats are read: safetensors (single process, DDP) and DCP shards (FSDP, any world
    size), in one process. ``out_dir`` must not already hold a model unless ``overwrite``. The
    exported weights are bit for bit those the checkpoint holds. A DiT's checkpoint (``train-dit``)
    gives a DiT's directory, with the checkpoint's ``latents.json`` (its classes and tokenizer)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    path = find_checkpoint(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} is a file; give a directory to write the model into")
    if out_dir.exists() and (out_dir.resolve() in (path.resolve(), Path(source).resolve())
                             or _holds_run_config(out_dir / CONFIG_NAME)):
        # --overwrite would put a model's config.json over the run's or the checkpoint's
        raise ValueError(f"{out_dir} is a training run or a checkpoint: export into another directory")
    if not overwrite and any(os.path.lexists(out_dir / n) for n in (CONFIG_NAME, WEIGHTS_NAME)):
        raise FileExistsError(f"{out_dir} already holds a model; choose another directory or overwrite it "
                              "(overwrite=True, --overwrite)")
    model_class, config = _model_config(path)
    fmt = ckpt.checkpoint_format(path)
    has_ema = (path / "ema.safetensors").is_file() if fmt == "safetensors" else _dcp_has(path, "ema")
    which = ("ema" if has_ema else "model") if weights == "auto" else weights
    if which == "ema" and not has_ema:
        raise ValueError(f"{path} holds no EMA weights (written by a run with train.ema_decay=0): export "
                         "weights='model'")
    with torch.device("meta"):  # no random init: every value comes from the checkpoint
        model = model_class(config)
    if fmt == "safetensors":
        state = ckpt.load_weights(path / f"{which}.safetensors")
    else:
        state = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
        load_dcp({which: state}, path / "dcp")
    problem = state_mismatch(model, state)
    if problem:
        raise ValueError(f"{path}: the {which} weights do not match its config.json: {problem}")
    model.load_state_dict(state, assign=True)
    model.save_pretrained(out_dir)
    latents = path / LATENTS_FILE  # a DiT's checkpoint: its classes and tokenizer go with the model
    if model_class is DiT and latents.is_file():
        ckpt.atomic_write_text(latents.read_text(), out_dir / LATENTS_FILE)
    else:  # (an --overwrite's earlier model may have left one: it would describe another run)
        (out_dir / LATENTS_FILE).unlink(missing_ok=True)
    logger.info("exported the %s weights of %s (step %s) to %s", which, path, ckpt.checkpoint_step(path), out_dir)
    return path


def _holds_run_config(cfg_path: Path) -> bool:
    """Whether ``cfg_path`` is a training run's (or a checkpoint's) config.json."""
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "train" in data


def _model_config(path: Path) -> tuple[type, ModelConfig | DiTConfig]:
    """(DiTo or DiT, its config) from a checkpoint's run config (a DiT's model section has
    ``patch_size``, a tokenizer's ``encoder``)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"missing config.json in checkpoint {path}")
    try:
        data = json.loads(cfg_path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise TypeError("expected a run config with a \"model\" section")
        if model_kind(data["model"]) == "dit":
            model_class, config = DiT, from_dict(DiTConfig, data["model"])
            validate_dit_config(config)
        else:
            model_class, config = DiTo, from_dict(ModelConfig, data["model"])
            validate_model_config(config)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid checkpoint config {cfg_path}: {e}") from None
    return model_class, config


def _dcp_has(path: Path, group: str) -> bool:
    """Whether the DCP checkpoint at ``path`` holds tensors under ``group`` (read from its metadata,
    through the same restricted unpickler as loading)."""
    import pickle

    from .parallel import _safe_reader

    if not (path / "dcp" / ".metadata").is_file():
        raise FileNotFoundError(f"not a DCP checkpoint (no .metadata): {path / 'dcp'}")
    try:
        metadata = _safe_reader(path / "dcp").read_metadata()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"refusing DCP checkpoint {path / 'dcp'}: {e}") from None
    return any(k.startswith(group + ".") for k in metadata.state_dict_metadata)
