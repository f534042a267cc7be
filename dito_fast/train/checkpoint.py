"""Checkpoint I/O: safetensors weights, optimizer/RNG state via weights-only torch.load, all
written atomically (temporary name + fsync + rename), so a crash never leaves a half-written
checkpoint where a reader would pick it up.

A training checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding ``config.json``,
``state.pt`` (step, counters, RNG states, scheduler; weights-only loadable) and either

- ``model.safetensors``, ``ema.safetensors`` (when EMA is on) and the optimizer state in
  ``state.pt`` (single process and DDP: full tensors, written by rank 0), or
- ``dcp/``: model, optimizer state and EMA as a torch.distributed.checkpoint directory, each
  rank writing its shards (FSDP; loadable at any world size).

It is assembled under a hidden temporary name (:func:`begin_checkpoint`), gets its ``COMPLETE``
marker last and is renamed into place only then (:func:`commit_checkpoint`); ``latest`` points
at the newest one. A process killed at any point leaves either no new checkpoint or a complete
one; :func:`list_checkpoints` ignores everything else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The process's umask, read once at import (reading it means setting it): files written through a
# temporary file get the mode a plain open() would give them, not mkstemp's 0600 (a model on a
# shared filesystem must be readable by the other users a umask of 022 admits).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic(path: Path, write, replace: bool = True, mode: int = 0o666) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (``mode`` less the
    umask: 0666 as open() gives). ``replace=False``: FileExistsError if ``path`` exists by then
    (say, written meanwhile by another process), which is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name carries the final one where it is valid UTF-8 (writers such as
    # safetensors' take str paths and refuse other names)
    named = os.fsencode(path.name).decode("utf-8", "replace") == path.name
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}." if named else ".tmp.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_UMASK)
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _link_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (a hard link fails on an existing name;
    where the file system has none, the check and the rename are two steps)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists (written meanwhile by another process?); it was kept") from None
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists (written meanwhile by another process?); it was kept") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def finite_json(obj):
    """obj with every non-finite float (a PSNR of identical images is +inf; a diverged loss NaN)
    as None: JSON has no Infinity or NaN, and strict parsers (jq, JavaScript) refuse them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def atomic_write_json(obj, path) -> None:
    """obj as strict JSON (non-finite floats written as null), written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(finite_json(obj), f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
    _atomic(Path(path), write)


def atomic_write(path, write, replace: bool = True, mode: int = 0o666) -> None:
    """``write(tmp_path)`` into a temporary file next to ``path`` (``.NAME.XXXXXXXX.tmp``), then
    renamed onto it with ``mode`` less the umask: readers see the old file or the whole new one,
    never a partial one (``replace=False``: FileExistsError if ``path`` exists by then). An error
    removes the temporary file."""
    _atomic(Path(path), write, replace, mode)


def atomic_write_text(text: str, path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic(Path(path), write)


def save_safetensors(state: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors (made contiguous, on CPU) as safetensors, atomically. safetensors writes its
    own temporary file (``.tmpXXXXXX``) next to the name it is given: it is given one inside a
    folder named after ``path`` (``.NAME.XXXXXXXX.tmpdir``), so that a process killed meanwhile
    leaves only names :func:`remove_stale_temporaries` knows as this file's."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def write(tmp):
        folder = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent)
        try:
            inner = os.path.join(folder, "tensors")
            save_file(tensors, inner, metadata=metadata)
            os.replace(inner, tmp)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    _atomic(path, write)


def remove_stale_temporaries(folder, names) -> None:
    """Remove what writers of the files ``names`` in ``folder`` killed before they finished left
    there: ``.NAME.XXXXXXXX.tmp`` files and ``.NAME.XXXXXXXX.tmpdir`` folders (see :func:`_atomic`,
    :func:`save_safetensors`; a dito-XL model's weights are 2.5 GB). For a folder only one writer
    uses at a time (an exported model's)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    patterns = [re.compile(re.escape(f".{name}.") + r"[A-Za-z0-9_]+\.tmp(dir)?") for name in names]
    for entry in os.scandir(folder):
        if any(p.fullmatch(entry.name) for p in patterns):
            logger.info("removing %s, left by a write that did not finish", entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def save_torch(obj, path) -> None:
    """torch.save atomically (for optimizer/RNG state: tensors and plain containers only, so it
    loads back with ``weights_only=True``)."""
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def load_torch(path):
    """Load a file written by :func:`save_torch` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint state {path}: {e}") from None


def load_weights(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read weights {path}: {e}") from None


def begin_checkpoint(run_dir, step: int) -> Path:
    """Create and return the hidden temporary directory a checkpoint of ``step`` is written into."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.", suffix=".tmp", dir=ckpt_root))


def write_files(directory, files: dict) -> None:
    """Write ``files`` into ``directory``: ``*.safetensors`` -> dict of tensors, ``*.json`` ->
    JSON-able object, ``*.pt`` -> object for :func:`save_torch`."""
    directory = Path(directory)
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_safetensors(content, directory / name)
        elif name.endswith(".json"):
            atomic_write_json(content, directory / name)
        elif name.endswith(".pt"):
            save_torch(content, directory / name)
        else:
            raise ValueError(f"unsupported checkpoint file type: {name}")


def _set_aside(path: Path) -> Path:
    """Move a checkpoint directory to a hidden temporary name (atomic; ``list_checkpoints`` ignores
    it, ``prune_checkpoints`` removes leftovers) and return that, to be deleted: deleted in place,
    a crash could leave a ``step_<N>`` with COMPLETE but without its weights, taken for the latest."""
    hidden = Path(tempfile.mkdtemp(prefix=f".{path.name}.discarded.", suffix=".tmp", dir=path.parent))
    os.replace(path, hidden / path.name)
    _fsync_dir(path.parent)
    return hidden


def commit_checkpoint(run_dir, step: int, tmp) -> Path:
    """Mark the temporary directory ``tmp`` complete, rename it to ``step_<N>`` and point
    ``latest`` at it. Returns the final path."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:08d}"
    tmp = Path(tmp)
    atomic_write_text("complete\n", tmp / "COMPLETE")
    old = _set_aside(final) if final.exists() else None  # re-saving a step: the old one aside, whole
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(final.name + "\n", ckpt_root / "latest")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(run_dir, step: int, files: dict) -> Path:
    """Write a complete checkpoint directory for ``step`` and point ``latest`` at it.

    ``files`` maps file names to contents (see :func:`write_files`).
    """
    tmp = begin_checkpoint(run_dir, step)
    try:
        write_files(tmp, files)
        return commit_checkpoint(run_dir, step, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_format(path) -> str:
    """"dcp" (sharded, ``dcp/``) or "safetensors" (full tensors) for a checkpoint directory."""
    return "dcp" if (Path(path) / "dcp").is_dir() else "safetensors"


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (incomplete ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "COMPLETE").is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path) -> int | None:
    """The step of a checkpoint directory named ``step_N``, else None."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def latest_checkpoint(run_dir) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints and stale temporary folders."""
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(_set_aside(p), ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for p in root.glob(".*.tmp"):  # folders (and `latest`'s file) a crash left half written or set aside
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
