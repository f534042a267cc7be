"""Latent datasets: what ``dito-fast train-dit`` trains a DiT on.

Two forms of one set:

- **a folder** written by ``dito-fast encode``: one ``.safetensors`` file per image, key
  ``latent``, shape (1, c, h, w) (files holding several latents, as ``encode --flip`` writes,
  give one sample each),
  searched recursively (symlinked folders followed, each real folder once); with
  ``class_folders`` each latent's label is its top-level subfolder
  (folders sorted by name -> 0..K-1, as ``encode`` mirrors an image folder's class folders).
  Reading it opens every file (6,000-10,000 files/s here: minutes for ImageNet-1k's 1.28 M) and
  holds the latents in the process's own memory (16 KiB per 4x32x32 latent: ~21 GB).
- **a pack** (:func:`pack_latents`, ``dito-fast pack-latents``): the folder's readable latents in
  one safetensors file (tensors ``latents`` (N, c, h, w) float32, ``labels`` (N,) int32 when
  packed with class folders, ``names`` the files' relative paths NUL-separated, as the file
  system's bytes (:func:`os.fsencode`: UTF-8 where a name is, any other bytes kept; read back
  with ``surrogateescape``); metadata ``format``, ``classes``, ``tokenizer``; ``skipped``, the
  unreadable files left out, as JSON). Opening it reads the names and labels; the latents are
  memory-mapped, so the processes of a torchrun job on one machine share one copy in the page
  cache, and a restart does not read the files again. The pack is written read-only: it is read
  during a run, and one written over in place (``cp``, ``rsync --inplace``) would change or cut
  the latents under the run (a read past the new end kills the process with SIGBUS); replace it
  by renaming a new file onto it (``pack-latents --overwrite``, ``mv``), which the runs that
  have the old one open do not see.

Either loads as a :class:`LatentSet` whose :meth:`LatentSet.describe` is the same for a folder and
its pack (a run started on one resumes on the other). Unreadable or corrupt files (bad header,
missing ``latent``, non-finite values) are skipped and counted; latents of another shape or from
another tokenizer (the fingerprint ``encode`` stores) are refused, naming a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PACK_FORMAT = "dito_fast.latent_pack"
PACK_VERSION = "1"
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # safetensors' names
# other safetensors dtypes, by torch's names (in messages)
_OTHER_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
                 "F4": "float4_e2m1fn_x2", "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16",
                 "I16": "int16", "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64"}
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's length
PACK_INSIDE = "a latent pack (dito-fast pack-latents) inside the folder; give the pack itself as --data"


@dataclass
class LatentSet:
    """Latents and their labels, held or memory-mapped.

    ``latents`` (M, c, h, w) float32 and ``labels`` (M,) int64 (None: unconditional) are the
    storage; ``rows`` (N,) int64 the storage rows this set holds, in order (None: all M), so a
    subset shares the storage instead of copying it. ``names`` (M) each stored latent's file
    (relative to the folder); ``classes`` the class folders' names (label k: ``classes[k]``; []
    unconditional); ``tokenizer`` what ``encode`` recorded of the model ({"model",
    "model_fingerprint"}; {} when the files say nothing); ``skipped`` the (file, reason) pairs of
    unreadable files."""

    latents: torch.Tensor
    labels: torch.Tensor | None
    names: list[str]
    classes: list[str] = field(default_factory=list)
    tokenizer: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0] if self.rows is None else self.rows.numel()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(c, h, w) of one latent."""
        return tuple(self.latents.shape[1:])

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents (n, c, h, w) float32, labels (n,) int64 or None) of the set's members ``idx``
        (n,) int64: a copy, also of a memory-mapped set."""
        rows = idx if self.rows is None else self.rows[idx]
        return self.latents[rows], None if self.labels is None else self.labels[rows]

    def set_labels(self) -> torch.Tensor | None:
        """(N,) int64 labels of the set's members in order, or None."""
        if self.labels is None:
            return None
        return self.labels if self.rows is None else self.labels[self.rows]

    def set_names(self) -> list[str]:
        return self.names if self.rows is None else [self.names[i] for i in self.rows.tolist()]

    def subset(self, indices: list[int]) -> "LatentSet":
        """The members ``indices`` (of this set), sharing the storage."""
        idx = torch.tensor(indices, dtype=torch.long)
        rows = idx if self.rows is None else self.rows[idx]
        return LatentSet(self.latents, self.labels, self.names, list(self.classes), dict(self.tokenizer), [], rows)

    def describe(self) -> dict:
        """What a model trained on these latents is told (``latents.json``): the classes, the
        tokenizer, the latent shape, the number of latents and a digest of their files in order."""
        digest = hashlib.sha256("\n".join(self.set_names()).encode("utf-8", "backslashreplace")).hexdigest()[:16]
        return {"classes": list(self.classes), "tokenizer": dict(self.tokenizer),
                "latent_shape": list(self.shape), "num_latents": len(self), "files_digest": digest}


# --------------------------------------------------------------------------------------------
# folders


def safetensors_files(folder: str | Path) -> list[Path]:
    """The ``.safetensors`` files under the folder ``folder``, as ``folder / relative path``,
    sorted as paths: recursive, symlinked folders followed, each real folder entered once (so a
    link back up the tree is no loop; see :func:`dito_fast.data.folder.list_image_files`)."""
    from .folder import list_image_files

    root = Path(folder)
    base = os.path.abspath(root)
    found = (root / os.path.relpath(f, base) for f in list_image_files(root, (".safetensors",))
             if f.endswith(".safetensors"))  # (that matches endings in any case)
    return sorted(f for f in found if f.is_file())  # (not a dangling link)


def latent_files(folder: str | Path, class_folders: bool) -> tuple[list[Path], list[str]]:
    """(the ``.safetensors`` files under ``folder`` (:func:`safetensors_files`), sorted; the class
    folders' names, sorted, or []). Raises FileNotFoundError (``folder`` missing, or no
    ``.safetensors`` file under it), NotADirectoryError (``folder`` is a file), ValueError (with
    ``class_folders``, a file outside any class folder)."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"latent folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder of latents: {root} (write one with dito-fast encode MODEL IMAGES --out "
                                "LATENTS)")
    files = safetensors_files(root)
    if not files:
        raise FileNotFoundError(f"no .safetensors latents in {root} (write them with dito-fast encode MODEL IMAGES "
                                "--out LATENTS)")
    if not class_folders:
        return files, []
    loose = [f for f in files if len(f.relative_to(root).parts) < 2]
    if loose:
        raise ValueError(f"with class folders (--class-folders), every latent must be in one: {loose[0]} is not "
                         f"({len(loose)} such files); put each class's latents in a subfolder of {root}, or go "
                         "without class folders (unconditional)")
    classes = sorted({f.relative_to(root).parts[0] for f in files})
    return files, classes


def _read_header(fh) -> tuple[dict, bytes]:
    """(the JSON header, the bytes read: its 8-byte length and the header) of the safetensors file
    ``fh``, open in binary at its start; ValueError if it has none. Reads nothing past the header."""
    head = fh.read(8)
    if len(head) < 8:
        raise ValueError(f"{len(head)} bytes: too short for a safetensors file")
    n = int.from_bytes(head, "little")
    if not 2 <= n <= _MAX_HEADER:
        raise ValueError(f"header length {n} is not that of a safetensors file")
    raw = fh.read(n)
    if len(raw) < n:
        raise ValueError(f"the file ends inside its {n}-byte header (truncated)")
    header = json.loads(raw)  # (bad UTF-8 or JSON: ValueErrors)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, head + raw


def is_latent_pack(path: str | Path) -> bool:
    """Whether the file ``path`` is a latent pack, by its header alone (False for anything else,
    an unreadable file too)."""
    try:
        with open(path, "rb") as fh:
            meta = _read_header(fh)[0].get("__metadata__")
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == PACK_FORMAT


def _read(path: Path) -> tuple[torch.Tensor, dict]:
    """(latent, metadata) of one file; ValueError, OSError or SafetensorError if it cannot serve.
    The header is read first: a file without a floating 'latent' tensor (a pack, a model's
    weights) is refused from it, unread. Read as bytes (safetensors opens only paths that are
    valid UTF-8; encode writes any name)."""
    from safetensors.torch import load

    with open(path, "rb") as fh:
        header, head = _read_header(fh)
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("the header's __metadata__ is not a JSON object")
        entry = header.get("latent")
        if not isinstance(entry, dict):
            raise ValueError(PACK_INSIDE if meta.get("format") == PACK_FORMAT else "no 'latent' tensor")
        dtype = entry.get("dtype")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"latent of dtype {_OTHER_DTYPES.get(dtype, dtype)} not supported; latents must be "
                             f"{'/'.join(FLOAT_DTYPES.values())}")
        data = head + fh.read()
    try:
        tensors = load(data)  # (checks the whole file)
    except (KeyError, TypeError, NotImplementedError) as e:  # a dtype torch has no type for (F4, F8_E8M0, ...)
        raise ValueError(f"a tensor of a dtype torch cannot read ({type(e).__name__}: {e})") from None
    z = tensors["latent"]
    if z.dim() != 4 or z.shape[0] < 1 or not z.is_floating_point():
        raise ValueError(f"latent {z.dtype} {tuple(z.shape)}, expected floating (n, c, h, w)")
    if not torch.isfinite(z).all():
        raise ValueError("non-finite values")
    return z, meta


class _InterruptAfterRead:
    """Ctrl-C (SIGINT), and SIGTERM where a Python handler takes it (the command line's), while
    files are read act between files, never inside a read: torch turns a KeyboardInterrupt
    raised inside its tensor constructors into a ValueError, which would count a good file as
    unreadable and go on. The signal is noted and its handler called at ``check()`` (after each
    file); a second one of a kind calls it at once (a read that hangs stays interruptible). Only
    in the main thread, over handlers that are Python callables."""

    def __enter__(self):
        self.pending, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(sig)
                if callable(handler):
                    self.previous[sig] = handler
                    signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        if any(s == signum for s, _ in self.pending):
            self.previous[signum](signum, frame)
        self.pending.append((signum, frame))

    def check(self) -> None:
        if self.pending:
            signum, frame = self.pending.pop(0)
            self.previous[signum](signum, frame)

    def __exit__(self, kind, value, traceback):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if kind is None:
            self.check()


def _unreadable_errors() -> tuple:
    """What reading a bad file raises (safetensors' own error is no OSError or ValueError)."""
    from safetensors import SafetensorError

    return OSError, ValueError, RuntimeError, SafetensorError


class _FolderReader:
    """The readable latents of a folder's files, in order: iterating yields (z (n, c, h, w)
    float32, file relative to the folder, label or None); unreadable files are logged and
    collected in ``skipped``; another shape or a second tokenizer raises ValueError naming a
    file. After the loop, ``tokenizer`` is what the files recorded ({} if nothing)."""

    def __init__(self, root: Path, class_folders: bool, progress: bool | None):
        self.root = root
        self.files, self.classes = latent_files(root, class_folders)
        self.class_folders = class_folders
        self.show = sys.stderr.isatty() if progress is None else progress
        self.skipped: list[tuple[str, str]] = []
        self.shape: tuple | None = None
        self.first: str | None = None
        self._tokenizers: dict = {}

    def __iter__(self):
        from tqdm.auto import tqdm

        index = {name: k for k, name in enumerate(self.classes)}
        with _InterruptAfterRead() as interrupt:
            for f in tqdm(self.files, desc="latents", unit="file", disable=not self.show or len(self.files) < 2):
                rel = str(f.relative_to(self.root))
                try:
                    z, meta = _read(f)
                except _unreadable_errors() as e:
                    interrupt.check()
                    logger.warning("latent file %s unreadable (%s); skipped", f, e)
                    self.skipped.append((rel, str(e)))
                    continue
                interrupt.check()
                yield self._checked(z, meta, f, rel, index)

    def _checked(self, z, meta, f: Path, rel: str, index: dict):
        """(z, rel, label) of a readable file, its shape and tokenizer checked against the others'."""
        if self.shape is None:
            self.shape, self.first = tuple(z.shape[1:]), rel
        elif tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"{f}: latent of shape {tuple(z.shape[1:])}, but {self.root / self.first}'s is "
                             f"{self.shape}: every latent must have one shape (encode the images with one --size)")
        if "model_fingerprint" in meta:
            self._tokenizers.setdefault(meta["model_fingerprint"], (meta.get("model", "?"), rel))
            if len(self._tokenizers) > 1:
                (fa, (ma, a)), (fb, (mb, b)) = list(self._tokenizers.items())[:2]
                raise ValueError(f"the latents come from two tokenizers: {a} from {ma} ({fa}), {b} from {mb} "
                                 f"({fb}); a DiT learns one tokenizer's latent space")
        return z.float(), rel, index[f.relative_to(self.root).parts[0]] if self.class_folders else None

    def finish(self) -> None:
        """Raise if nothing was readable; log the count of skipped files."""
        if self.shape is None:
            raise ValueError(f"none of the {len(self.files)} latent files in {self.root} could be read (first: "
                             f"{self.skipped[0][0]}: {self.skipped[0][1]})")
        if self.skipped:
            logger.warning("%d of %d latent files unreadable, skipped", len(self.skipped), len(self.files))

    @property
    def tokenizer(self) -> dict:
        if not self._tokenizers:
            return {}
        fingerprint, (model, _) = next(iter(self._tokenizers.items()))
        return {"model": model, "model_fingerprint": fingerprint}


def _load_folder(root: Path, class_folders: bool, progress: bool | None) -> LatentSet:
    """The folder's latents in one tensor, filled as the files are read: room for as many latents
    per file as the first readable file holds (grown by doubling if later files hold more), so
    that the set takes its own size in memory, not twice that (as chunks then joined would)."""
    reader = _FolderReader(root, class_folders, progress)
    store, n, labels, names = None, 0, [], []
    for z, rel, label in reader:
        k = z.shape[0]
        if store is None:
            store = torch.empty(len(reader.files) * k, *z.shape[1:])
        elif n + k > store.shape[0]:
            store = torch.cat([store, torch.empty(max(store.shape[0], k), *z.shape[1:])])
        store[n:n + k] = z
        n += k
        names += [rel] * k
        labels += [label] * k
    reader.finish()
    return LatentSet(store[:n], torch.tensor(labels, dtype=torch.long) if class_folders else None, names,
                     reader.classes, reader.tokenizer, reader.skipped)


# --------------------------------------------------------------------------------------------
# packs

_HEADER_SLACK = 4096  # bytes of header room beyond what the first readable file tells (a later file's tokenizer)


def pack_latents(folder: str | Path, out: str | Path, class_folders: bool = False,
                 progress: bool | None = None, overwrite: bool = True) -> LatentSet:
    """Write the readable latents under ``folder`` (a folder ``encode`` wrote) into the pack
    ``out`` (see the module docstring), streaming: the latents pass through memory one file at a
    time. Written atomically and read-only (a temporary file, made read-only, renamed onto
    ``out``). ``out`` a folder: IsADirectoryError; ``overwrite=False``: FileExistsError if ``out``
    exists, before anything is read, or by the time it is written. A write error (a full disk)
    raises OSError naming ``out``, nothing left behind. Returns the pack, opened; its
    ``skipped``, the files left out, are also in the pack."""
    from ..train.checkpoint import atomic_write

    root, out = Path(folder), Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"the pack {out} is a folder; a pack is one file (e.g. {out / 'latents.safetensors'})")
    if not overwrite and os.path.lexists(out):
        raise FileExistsError(f"the pack {out} exists (overwrite=True replaces it)")
    reader = _FolderReader(root, class_folders, progress)  # (raises before anything is written)
    if out.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"the pack {out} would be inside the folder it packs ({root}): write it elsewhere")
    if not _utf8(out):
        raise ValueError(f"the pack's path {_shown(out)} is not valid "
                         "UTF-8, which safetensors needs to open it: choose another name")
    labels: list[int] = []
    names = bytearray()

    def header(n: int, names_bytes: int, skipped_bytes: int, tokenizer: dict) -> bytes:
        c, h, w = reader.shape
        a = 4 * n * c * h * w
        b = a + (4 * n if class_folders else 0)
        tensors = {"latents": {"dtype": "F32", "shape": [n, c, h, w], "data_offsets": [0, a]}}
        if class_folders:
            tensors["labels"] = {"dtype": "I32", "shape": [n], "data_offsets": [a, b]}
        tensors["names"] = {"dtype": "U8", "shape": [names_bytes], "data_offsets": [b, b + names_bytes]}
        b += names_bytes
        tensors["skipped"] = {"dtype": "U8", "shape": [skipped_bytes], "data_offsets": [b, b + skipped_bytes]}
        meta = {"format": PACK_FORMAT, "version": PACK_VERSION, "classes": json.dumps(reader.classes),
                "tokenizer": json.dumps(tokenizer)}
        return json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()

    def write(f):
        n, reserved = 0, None
        for z, rel, label in reader:
            if reserved is None:  # room for the final header: counts of 20 digits, and slack
                reserved = len(header(10**19, 10**19, 10**19, reader.tokenizer)) + _HEADER_SLACK
                reserved += -reserved % 8  # (the data starts 8-byte aligned)
                f.write(b"\0" * (8 + reserved))
            f.write(z.contiguous().numpy().tobytes())
            n += z.shape[0]
            labels.extend([label] * z.shape[0])
            names.extend(("\0".join([rel] * z.shape[0]) + "\0").encode("utf-8", "surrogateescape"))
        reader.finish()
        if class_folders:
            f.write(torch.tensor(labels, dtype=torch.int32).numpy().tobytes())
        f.write(names)
        skipped = json.dumps(reader.skipped, ensure_ascii=False).encode("utf-8", "surrogateescape")
        f.write(skipped)
        head = header(n, len(names), len(skipped), reader.tokenizer)
        if len(head) > reserved:
            raise ValueError(f"the pack's header ({len(head)} bytes) outgrew its room ({reserved}): the files' "
                             f"tokenizer metadata is too long ({str(reader.tokenizer)[:200]}...)")
        f.seek(0)
        f.write(struct.pack("<Q", reserved) + head + b" " * (reserved - len(head)))  # (JSON may end in spaces)

    try:
        # read-only: a pack is read during the runs that map it, and cp over it (refused for users
        # other than root) would change the latents under them
        atomic_write(out, lambda tmp: _write_file(tmp, write), replace=overwrite, mode=0o444)
    except OSError as e:
        if isinstance(e, FileExistsError) and e.errno is None:  # (appeared meanwhile: the message names it)
            raise
        error = type(e)(f"cannot write the pack {out} ({e.strerror or e}); nothing was written")
        error.errno = e.errno
        raise error from None
    logger.info("packed %d latents from %d files of %s into %s (%d unreadable files left out)", len(labels),
                len(reader.files) - len(reader.skipped), root, out, len(reader.skipped))
    return _load_pack(out, class_folders)


def _write_file(path, write) -> None:
    with open(path, "wb") as f:
        write(f)


def _utf8(path: Path) -> bool:
    """Whether ``path`` is valid UTF-8 (safetensors opens no other path)."""
    return os.fsencode(path).decode("utf-8", "replace") == str(path)


def _shown(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_pack(path: str | Path) -> bool:
    """Whether ``path`` is a file (a pack, or meant as one) rather than a folder of latents."""
    return Path(path).is_file()


def _open_pack(path: Path, read):
    """``read(handle, metadata, keys)`` on the pack ``path``, its format checked; ValueError naming
    the file for anything that is not a readable pack of this version."""
    from safetensors import safe_open

    if not _utf8(path):
        raise ValueError(f"{_shown(path)}: the path is not valid UTF-8, and safetensors cannot open such a path: "
                         "rename the pack, or move it to a folder whose path is UTF-8")
    try:
        with safe_open(str(path), "pt") as h:
            meta, keys = h.metadata() or {}, set(h.keys())
            if meta.get("format") != PACK_FORMAT:
                what = "a latent file (a folder of them is what --data takes)" if "latent" in keys else "no latent pack"
                raise _NotAPack(f"{path} is {what}: write a pack with dito-fast pack-latents FOLDER --out "
                                "latents.safetensors")
            if meta.get("version") != PACK_VERSION:
                raise _NotAPack(f"{path}: latent pack version {meta.get('version')!r}; this dito_fast reads "
                                f"version {PACK_VERSION} (pack the folder again)")
            return read(h, meta, keys)
    except _NotAPack as e:
        raise ValueError(str(e)) from None
    except _unreadable_errors() + (KeyError,) as e:
        raise ValueError(f"{path} is not a readable latent pack ({type(e).__name__}: {e}); give a folder of "
                         "latents or a pack that dito-fast pack-latents wrote") from None


class _NotAPack(Exception):
    pass


def _pack_info(path: Path, class_folders: bool) -> tuple[tuple[int, int, int], list[str]]:
    """((c, h, w), classes ([] unless ``class_folders``)) from a pack's header alone."""
    def read(h, meta, keys):
        if class_folders and "labels" not in keys:
            raise _NotAPack(f"data.class_folders: the pack {path} holds no labels (it was packed without "
                            "--class-folders): pack the folder again with --class-folders, or train unconditionally")
        return tuple(h.get_slice("latents").get_shape()[1:]), json.loads(meta["classes"]) if class_folders else []
    return _open_pack(path, read)


def _load_pack(path: Path, class_folders: bool) -> LatentSet:
    _pack_info(path, class_folders)  # (the refusals)

    def read(h, meta, keys):
        labels = h.get_tensor("labels") if class_folders else None
        names = bytes(h.get_tensor("names").numpy()).decode("utf-8", "surrogateescape").split("\0")[:-1]
        skipped = json.loads(bytes(h.get_tensor("skipped").numpy()).decode("utf-8", "surrogateescape"))
        return (h.get_tensor("latents"),  # memory-mapped: nothing is read until used
                labels, names, json.loads(meta["classes"]), json.loads(meta["tokenizer"]),
                [(str(name), str(reason)) for name, reason in skipped])
    latents, labels, names, classes, tokenizer, skipped = _open_pack(path, read)
    n = latents.shape[0]
    if latents.dim() != 4 or latents.dtype != torch.float32 or len(names) != n or (
            labels is not None and labels.shape != (n,)) or not isinstance(classes, list):
        raise ValueError(f"{path}: inconsistent latent pack (latents {latents.dtype} {tuple(latents.shape)}, "
                         f"{len(names)} names, labels {None if labels is None else tuple(labels.shape)})")
    if labels is not None:
        labels = labels.long()
        if n and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(f"{path}: labels outside 0..{len(classes) - 1} (the pack's {len(classes)} classes)")
    if skipped:
        logger.warning("%d latent files were unreadable when the pack %s was written, and left out", len(skipped),
                       path)
    return LatentSet(latents, labels, names, classes if class_folders else [], tokenizer, skipped)


# --------------------------------------------------------------------------------------------
# either


def _existing(source: str | Path) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such latent folder or pack: {_shown(path)}")
    return path


def load_latents(source: str | Path, class_folders: bool = False, progress: bool | None = None) -> LatentSet:
    """The latents of ``source``: a folder ``encode`` wrote (read into memory) or a pack
    (memory-mapped); see the module docstring. FileNotFoundError if there is neither."""
    path = _existing(source)
    return _load_pack(path, class_folders) if is_pack(path) else _load_folder(path, class_folders, progress)


def latent_shape(source: str | Path) -> tuple[int, int, int]:
    """(c, h, w) of ``source``'s latents: a pack's, or a folder's first readable file's
    (unreadable ones are left to :func:`load_latents`, which skips and counts them)."""
    _existing(source)
    if is_pack(source):
        return _pack_info(Path(source), False)[0]
    files = latent_files(source, False)[0]
    with _InterruptAfterRead() as interrupt:
        for f in files:
            try:
                return tuple(_read(f)[0].shape[1:])
            except _unreadable_errors():
                interrupt.check()
    raise ValueError(f"none of the {len(files)} latent files in {source} could be read")


def latent_classes(source: str | Path, class_folders: bool) -> list[str]:
    """The class names ``source`` gives its latents ([] unless ``class_folders``)."""
    _existing(source)
    if is_pack(source):
        return _pack_info(Path(source), class_folders)[1]
    return latent_files(source, class_folders)[1]


__all__ = ["FLOAT_DTYPES", "LatentSet", "PACK_FORMAT", "is_latent_pack", "is_pack", "latent_classes", "latent_files",
           "latent_shape", "load_latents", "pack_latents", "safetensors_files"]
