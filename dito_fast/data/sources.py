"""Where training images come from: folders, file lists, tar shards, procedural datasets.

A *source* is an indexed collection of samples with optional integer labels (-1 = none). It does
no decoding policy of its own: the loaders (dito_fast/data/loader.py, dali.py) decide how samples
are read, decoded and cropped. :func:`resolve_source` turns a ``data.source`` string into one:

================================  ==========================================================
``"synthetic"``, ``"builtin"``    :class:`DatasetSource` over the procedural datasets
a directory                       :class:`FileSource`, recursive; images inside a top-level
                                  subfolder get that class's label (sorted class names)
a text file (not .tar)            :class:`FileSource` from a file list: one ``path``,
                                  ``path<TAB>label`` or ``path label`` per line
``x.tar``, ``s-{000..009}.tar``,  :class:`TarSource`: webdataset layout, ``key.jpg`` (or png,
``dir/*.tar``                     webp, bmp, tif) plus an optional ``key.cls`` label
================================  ==========================================================

:func:`check_source` screens the files once before training (format header and end-of-stream
marker, decoding the files whose marker is missing; optionally a full decode of every file) so
that neither loader meets most unreadable files mid-run.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import glob
import io
import logging
import os
import re
import tarfile
import threading
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from .folder import IMAGE_EXTENSIONS, _normalize_extensions, list_image_files
from .sampler import mix_seed, random_order
from .transforms import aspect_ratio_problem, decode_image, unreadable_file_error

logger = logging.getLogger(__name__)

__all__ = ["CHECK_MODES", "DALI_FORMATS", "DatasetSource", "FileSource", "Source", "TarSource",
           "check_source", "expand_braces", "parse_file_list", "resolve_source"]

# Formats NVIDIA DALI's image decoder reads (PIL's names; MPO is a multi-picture JPEG). GIF is not one.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
CHECK_MODES = ("header", "decode", "none")
# Image members of a webdataset sample, in order of preference when a key has several.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
_TAIL_BYTES = 4096  # how far from the end a JPEG's EOI / a PNG's IEND marker is looked for
# Shard files a TarSource keeps open per process, the least recently used closed first: one
# descriptor per shard would exhaust a process's limit (often 1024) on large datasets.
MAX_OPEN_SHARDS = 64


class Source:
    """Base class: ``len(source)`` samples, ``labels`` (int64 array, -1 = none), ``name(i)``.

    ``epoch_order(seed, epoch)`` is the permutation the step sampler walks in epoch ``epoch``.
    ``skipped`` lists (name, reason) of files :func:`check_source` removed.
    """

    kind = "base"
    description = "?"

    def __init__(self, labels: np.ndarray, classes: Optional[List[str]] = None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.skipped: List[Tuple[str, str]] = []
        self._checked: Dict[tuple, "Source"] = {}  # check key -> screened source
        self._clean: set = set()  # check keys this source is known to pass

    def _derived(self, other: "Source") -> "Source":
        """``other`` (a subset of self) inherits what the checks found."""
        other.skipped = list(self.skipped)
        other._clean = set(self._clean)
        return other

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {len(self)} samples)"

    def name(self, i: int) -> str:
        raise NotImplementedError

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        return random_order(len(self), seed, epoch)

    def subset(self, indices: Sequence[int]) -> "Source":
        raise NotImplementedError


class _EncodedSource(Source):
    """A source of encoded image files: ``read_bytes(i)``, ``open(i)`` (a binary stream)."""

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def open(self, i: int):
        raise NotImplementedError

    def size(self, i: int) -> int:
        raise NotImplementedError

    def decode(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB PIL image. Raises ValueError naming the file if it is unusable
        (unreadable, not an image, corrupt: ``unreadable_file_error``); errors about the process
        (out of descriptors or memory) propagate."""
        try:
            data = self.read_bytes(i)
        except OSError as e:
            if not unreadable_file_error(e):
                raise
            raise ValueError(f"cannot read image file {self.name(i)}: {e}") from e
        return decode_image(data, self.name(i))


# --------------------------------------------------------------------------------------------
# image files: folders and file lists


class FileSource(_EncodedSource):
    """Image files given by path, with optional integer labels (-1 = none).

    Build with :meth:`from_folder` or :meth:`from_list`, or directly from paths.
    """

    kind = "files"

    def __init__(self, files: Sequence[str], labels: Optional[Sequence[int]] = None,
                 classes: Optional[List[str]] = None, description: str = "files"):
        self.files = [os.fspath(f) for f in files]
        if labels is None:
            labels = np.full(len(self.files), -1, np.int64)
        if len(labels) != len(self.files):
            raise ValueError(f"{len(labels)} labels for {len(self.files)} files")
        super().__init__(np.asarray(labels, np.int64), classes)
        self.description = description

    @classmethod
    def from_folder(cls, root: Union[str, "os.PathLike[str]"],
                    extensions: Iterable[str] = IMAGE_EXTENSIONS) -> "FileSource":
        """Every image under ``root`` (recursive, sorted). An image inside a top-level subfolder
        ``root/<class>/...`` gets label = index of ``<class>`` among the sorted top-level
        subfolders that hold images; images directly in ``root`` get -1.

        Raises: FileNotFoundError / NotADirectoryError (bad root), ValueError (no image files).
        """
        root = os.path.abspath(os.fspath(root))
        exts = _normalize_extensions(extensions)
        files = list_image_files(root, exts)
        if not files:
            raise ValueError(f"no image files with extensions {', '.join(exts)} found under {root}")
        tops = [os.path.relpath(f, root).replace(os.sep, "/").split("/") for f in files]
        classes = sorted({parts[0] for parts in tops if len(parts) > 1})
        class_index = {c: i for i, c in enumerate(classes)}
        labels = [class_index[parts[0]] if len(parts) > 1 else -1 for parts in tops]
        return cls(files, labels, classes or None, description=root)

    @classmethod
    def from_list(cls, path: Union[str, "os.PathLike[str]"]) -> "FileSource":
        """Files named in a text file (see :func:`parse_file_list`). Raises ValueError if it
        names no file."""
        path = os.path.abspath(os.fspath(path))
        files, labels = parse_file_list(path)
        if not files:
            raise ValueError(f"file list {path} names no image file")
        return cls(files, labels, None, description=path)

    def name(self, i: int) -> str:
        return self.files[i]

    def read_bytes(self, i: int) -> bytes:
        with open(self.files[i], "rb") as f:
            return f.read()

    def open(self, i: int):
        return open(self.files[i], "rb")

    def size(self, i: int) -> int:
        return os.path.getsize(self.files[i])

    def subset(self, indices: Sequence[int]) -> "FileSource":
        idx = [int(i) for i in indices]
        return self._derived(FileSource([self.files[i] for i in idx], self.labels[idx], self.classes,
                                        self.description))


def parse_file_list(path: str) -> Tuple[List[str], List[int]]:
    """Read a file list: one image per line, ``path``, ``path<TAB>label`` or ``path label``.

    - blank lines and lines starting with ``#`` are ignored;
    - with a TAB the text after the last TAB is the label (an integer);
    - otherwise, if the last whitespace-separated token is an integer, it is the label and the
      rest is the path; else the whole line is the path (so paths may contain spaces);
    - relative paths are relative to the list file's folder; no label means -1.

    Raises: FileNotFoundError (no such list), ValueError (a TAB label that is not an integer,
    or a file that is not text).
    """
    base = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file list not found: {path}")
    files: List[str] = []
    labels: List[int] = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # (-sig: a byte order mark, as Windows editors write, is dropped)
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is neither a directory, a .tar file nor a text file list of images") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label = -1
        if "\t" in line:
            name, _, tail = line.rpartition("\t")
            try:
                label = int(tail.strip())
            except ValueError:
                raise ValueError(f"{path}:{lineno}: label {tail.strip()!r} after the TAB is not an integer") from None
        else:
            parts = line.rsplit(None, 1)
            name = line
            if len(parts) == 2 and re.fullmatch(r"[+-]?\d+", parts[1]):
                name, label = parts[0], int(parts[1])
        name = os.path.expanduser(name.strip())
        files.append(os.path.normpath(os.path.join(base, name)))
        labels.append(label)
    return files, labels


# --------------------------------------------------------------------------------------------
# tar shards (webdataset layout)


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Exactly ``size`` bytes at ``offset`` (fewer only at end of file); thread-safe (no file position)."""
    chunks, got = [], 0
    while got < size:
        data = os.pread(fd, size - got, offset + got)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class _MemberFile(io.RawIOBase):
    """A read-only, seekable window [offset, offset + size) of shard ``shard`` of ``source``,
    whose file stays open (pinned in the source's table of open shards) until this is closed."""

    def __init__(self, source: "TarSource", shard: int, offset: int, size: int):
        super().__init__()
        self._source, self._shard, self._entry = source, shard, None
        self._entry = source._acquire(shard)
        self._fd, self._start, self._size, self._pos = self._entry[0], int(offset), int(size), 0

    def close(self) -> None:
        if self._entry is not None:
            entry, self._entry = self._entry, None
            self._source._release(self._shard, entry)
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + int(pos))
        return self._pos

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read from a closed tar member")
        n = max(0, min(len(b), self._size - self._pos))
        data = _pread(self._fd, n, self._start + self._pos) if n else b""
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)


class TarSource(_EncodedSource):
    """Samples of webdataset-style tar shards: members ``<key>.<ext>`` grouped by key (the
    member name up to the first dot of its base name); each key with an image member
    (jpg, jpeg, png, webp, bmp, tif, tiff) is a sample; ``<key>.cls`` (a decimal integer)
    is its label. Only uncompressed tars (random access by offset).

    Epoch order (``epoch_order``): the shards in a permutation seeded by (seed, epoch), each
    shard's samples in a permutation seeded by the same stream: consecutive samples come from
    one shard, so a reader streams shard by shard. Write shards from shuffled data (the
    webdataset convention), since a batch then mostly holds samples of one or two shards.
    """

    kind = "tar"

    def __init__(self, shards: Sequence[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 members: List[str], labels: np.ndarray, description: str = "tar"):
        super().__init__(labels)
        self.shards = [os.fspath(s) for s in shards]
        self.shard = np.asarray(shard, np.int64)
        self.offset = np.asarray(offset, np.int64)
        self.sizes = np.asarray(size, np.int64)
        self.members = list(members)
        self.description = description
        # shard -> [fd, readers]: at most MAX_OPEN_SHARDS idle ones, least recently used first
        self._fds: "OrderedDict[int, list]" = OrderedDict()
        self._lock = threading.Lock()
        # sample indices of each shard, shards in order of first appearance
        order = np.argsort(self.shard, kind="stable")
        ids, starts = np.unique(self.shard[order], return_index=True)
        self._groups = np.split(order, starts[1:]) if len(order) else []

    @classmethod
    def from_shards(cls, shards: Sequence[str], description: Optional[str] = None) -> "TarSource":
        """Index the given tar files (in this order). Raises ValueError if none holds an image."""
        shard_ids, offsets, sizes, members, labels = [], [], [], [], []
        for s, path in enumerate(shards):
            for member, off, size, label in _index_tar(path):
                shard_ids.append(s)
                offsets.append(off)
                sizes.append(size)
                members.append(member)
                labels.append(label)
        desc = description or (shards[0] if len(shards) == 1 else f"{len(shards)} tar shards ({shards[0]}, ...)")
        if not members:
            raise ValueError(f"no image samples (key.jpg/png/webp/bmp/tif) in {desc}")
        return cls(shards, np.array(shard_ids), np.array(offsets), np.array(sizes), members,
                   np.array(labels), description=desc)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        self.close()

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next read); a file a
        reader is still using closes when that read ends."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # partly constructed, or being unpickled
            return
        with lock:
            fds, self._fds = self._fds, OrderedDict()
            for fd, readers in fds.values():
                if readers == 0:
                    _close_quietly(fd)

    # Reads use pread (no shared file position), so threads and forked workers may share a
    # descriptor; each read pins its shard's entry (_acquire / _release), so that the table's
    # eviction never closes a descriptor in use (whose number the next open could reuse).
    def _acquire(self, s: int) -> list:
        with self._lock:
            entry = self._fds.get(s)
            if entry is not None:
                self._fds.move_to_end(s)
            else:
                idle = [k for k, (_, readers) in self._fds.items() if readers == 0]
                for k in idle[:max(0, len(idle) - (MAX_OPEN_SHARDS - 1))]:
                    _close_quietly(self._fds.pop(k)[0])
                entry = self._fds[s] = [os.open(self.shards[s], os.O_RDONLY), 0]
            entry[1] += 1
            return entry

    def _release(self, s: int, entry: list) -> None:
        with self._lock:
            entry[1] -= 1
            if entry[1] == 0 and self._fds.get(s) is not entry:  # closed (close()) while in use
                _close_quietly(entry[0])

    @contextlib.contextmanager
    def _shard_fd(self, s: int):
        entry = self._acquire(s)
        try:
            yield entry[0]
        finally:
            self._release(s, entry)

    def name(self, i: int) -> str:
        return f"{self.shards[self.shard[i]]}:{self.members[i]}"

    def read_bytes(self, i: int) -> bytes:
        with self._shard_fd(int(self.shard[i])) as fd:
            data = _pread(fd, int(self.sizes[i]), int(self.offset[i]))
        if len(data) != self.sizes[i]:
            raise OSError(f"{self.name(i)}: tar file ends inside the member")
        return data

    def open(self, i: int):
        return _MemberFile(self, int(self.shard[i]), self.offset[i], self.sizes[i])

    def size(self, i: int) -> int:
        return int(self.sizes[i])

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        parts = []
        for gi in torch.randperm(len(self._groups), generator=g).tolist():
            group = torch.from_numpy(self._groups[gi])
            parts.append(group[torch.randperm(len(group), generator=g)])
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def subset(self, indices: Sequence[int]) -> "TarSource":
        idx = np.asarray([int(i) for i in indices], np.int64)
        return self._derived(TarSource(self.shards, self.shard[idx], self.offset[idx], self.sizes[idx],
                                       [self.members[i] for i in idx], self.labels[idx], self.description))


def _index_tar(path: str) -> List[Tuple[str, int, int, int]]:
    """[(image member name, data offset, size, label)] of one webdataset tar, in archive order."""
    try:
        tf = tarfile.open(path, "r:")
    except FileNotFoundError:
        raise FileNotFoundError(f"tar shard not found: {path}") from None
    except tarfile.TarError as e:
        raise ValueError(f"{path} is not an uncompressed tar file ({e})") from None
    samples: Dict[str, Dict[str, tarfile.TarInfo]] = {}
    with tf:
        for m in tf:
            if not m.isfile():
                continue
            slash = m.name.rfind("/") + 1
            dot = m.name.find(".", slash)
            if dot <= slash or any(part.startswith(".") for part in m.name.split("/")[:-1]):
                continue  # no extension, a hidden file, or one in a hidden folder (as folders are listed)
            samples.setdefault(m.name[:dot], {})[m.name[dot + 1:].lower()] = m
        out = []
        for key, comps in samples.items():
            image = next((comps[e] for e in TAR_IMAGE_EXTENSIONS if e in comps), None)
            if image is None:
                continue
            label = -1
            if "cls" in comps:
                text = tf.extractfile(comps["cls"]).read().decode("utf-8", "replace").strip()
                try:
                    label = int(text)
                except ValueError:
                    logger.warning("%s: %s.cls holds %r, not an integer; label -1", path, key, text[:40])
            out.append((image.name, image.offset_data, image.size, label))
    return out


def expand_braces(pattern: str) -> List[str]:
    """Shell-style brace expansion: ``a{1,2}b`` -> [a1b, a2b]; ``s-{00..03}.tar`` -> s-00 .. s-03
    (zero-padded to the width of the first bound when it starts with 0). Nested groups work."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).lstrip("-").startswith("0") else 0
        step = 1 if b >= a else -1
        items = [str(v).zfill(width) for v in range(a, b + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _tar_paths(spec: str) -> Optional[List[str]]:
    """The tar files a brace/glob pattern names, or None if ``spec`` is no pattern."""
    if not any(c in spec for c in "{*?["):
        return None
    paths: List[str] = []
    for p in expand_braces(spec):
        if any(c in p for c in "*?["):
            paths += sorted(glob.glob(os.path.expanduser(p)))
        else:
            paths.append(os.path.expanduser(p))
    return paths


# --------------------------------------------------------------------------------------------
# procedural / in-memory datasets


def _item_at(dataset: Dataset, index: int, epoch: int):
    """Item ``index`` (>= 0) of ``dataset`` as epoch ``epoch`` gives it: a dataset's
    ``item_at(index, epoch)`` where it has one (the package's datasets: no shared state, so worker
    processes reading items of different epochs at once do not race), through plain Subset and
    ConcatDataset wrappers; else ``set_epoch(epoch)`` (on the dataset, or on what its wrappers
    hold) and then the item, by the dataset's own ``__getitem__``."""
    if hasattr(dataset, "item_at"):
        return dataset.item_at(index, epoch)
    getitem = type(dataset).__getitem__  # a wrapper subclass with its own __getitem__ is used as it is
    if isinstance(dataset, Subset) and getitem is Subset.__getitem__:
        return _item_at(dataset.dataset, int(dataset.indices[index]), epoch)
    if isinstance(dataset, ConcatDataset) and getitem is ConcatDataset.__getitem__:
        part = bisect.bisect_right(dataset.cumulative_sizes, index)
        return _item_at(dataset.datasets[part], index - (dataset.cumulative_sizes[part - 1] if part else 0), epoch)
    _set_epoch(dataset, epoch)
    return dataset[index]


def _set_epoch(dataset: Dataset, epoch: int) -> None:
    """``set_epoch`` of ``dataset``, or of the datasets its Subset / ConcatDataset wrappers hold."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    elif isinstance(dataset, Subset):
        _set_epoch(dataset.dataset, epoch)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _set_epoch(part, epoch)


def check_item(x, size: Optional[int], name: str) -> torch.Tensor:
    """A dataset item as the loaders' batches hold it: a floating (3, size, size) tensor (any
    float dtype, returned as float32), finite, in [-1, 1] (1e-3 of slack for rounding); else a
    TypeError / ValueError naming the item and the problem."""
    expected = f"a float (3, {size or 'S'}, {size or 'S'}) tensor in [-1, 1]"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: dataset items must be {expected} (or a tuple starting with one), got "
                        f"{type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: dataset items must be {expected}, got dtype {x.dtype} (scale integer pixels "
                        f"to [-1, 1] floats, e.g. x / 127.5 - 1)")
    if x.dim() != 3 or x.shape[0] != 3 or (size is not None and tuple(x.shape[1:]) != (size, size)):
        raise ValueError(f"{name}: dataset items must be {expected} (data.image_size), got shape {tuple(x.shape)}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: the item holds NaN or infinite values")
    lo, hi = x.aminmax()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{name}: values in [{float(lo):.4g}, {float(hi):.4g}]; dataset items must be in [-1, 1]")
    return x


class DatasetSource(Source):
    """A torch Dataset whose items are float (3, S, S) tensors in [-1, 1] (already cropped), or
    tuples starting with one, e.g. SyntheticImages. ``set_epoch(epoch)`` is called before reading
    (per-epoch augmentation), also through Subset and ConcatDataset wrappers (the package's own
    datasets take the epoch with each item instead: ``item_at``). Only the PyTorch loader reads
    these; it checks every item (:func:`check_item`)."""

    kind = "dataset"

    def __init__(self, dataset: Dataset, description: Optional[str] = None):
        super().__init__(np.full(len(dataset), -1, np.int64))
        self.dataset = dataset
        self.description = description or type(dataset).__name__

    def name(self, i: int) -> str:
        return f"{self.description}[{i}]"

    def item(self, index: int, epoch: int, size: Optional[int] = None) -> torch.Tensor:
        """Item ``index`` at ``epoch``, checked (:func:`check_item`; ``size``: the side it must have)."""
        return self.item_and_label(index, epoch, size)[0]

    def item_and_label(self, index: int, epoch: int, size: Optional[int] = None) -> Tuple[torch.Tensor, int]:
        """(:meth:`item`, label): the label is the item's second element when that is an integer
        (an ``(image, class)`` pair, as torchvision's datasets give), else -1."""
        item = _item_at(self.dataset, index, epoch)
        pair = isinstance(item, (tuple, list)) and item
        label = item[1] if pair and len(item) > 1 else -1
        if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
            label = label.item()
        label = int(label) if isinstance(label, (int, np.integer)) and not isinstance(label, bool) else -1
        return check_item(item[0] if pair else item, size, self.name(index)), label

    def subset(self, indices: Sequence[int]) -> "DatasetSource":
        return self._derived(DatasetSource(Subset(self.dataset, [int(i) for i in indices]), self.description))


# --------------------------------------------------------------------------------------------
# resolution


def resolve_source(spec, *, image_size: int = 64, num_synthetic: int = 10000, seed: int = 0,
                   train: bool = True, hflip: bool = True, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> Source:
    """Turn a data source description into a :class:`Source` (see the module docstring).

    Args:
        spec: a Source (returned as is), a torch Dataset (-> DatasetSource), a DataConfig (its
            ``source``, ``image_size``, ``num_synthetic_images`` and ``hflip``), or a string.
        image_size, num_synthetic, seed, train, hflip: for "synthetic"/"builtin" (see make_dataset;
            the loaders flip files and shards themselves).
        extensions: image file extensions a folder is scanned for.
    Raises:
        FileNotFoundError: a named folder, list, shard or pattern matches nothing.
        ValueError: an empty folder / list / shard set, a shard that is no tar, an unknown name.
    """
    from ..config import DataConfig
    from . import make_dataset

    if isinstance(spec, Source):
        return spec
    if isinstance(spec, DataConfig):
        image_size, num_synthetic, hflip, spec = spec.image_size, spec.num_synthetic_images, spec.hflip, spec.source
    if isinstance(spec, Dataset):
        return DatasetSource(spec)
    spec = os.fspath(spec)
    if spec in ("synthetic", "builtin"):
        return DatasetSource(make_dataset(spec, image_size, train=train, seed=seed, num_synthetic=num_synthetic,
                                          hflip=hflip), description=spec)
    # a folder or file that exists is itself, whatever its name holds ("photos [2023]", "what?")
    pattern = None if os.path.exists(os.path.expanduser(spec)) else _tar_paths(spec)
    if pattern is not None:
        if not pattern:
            raise FileNotFoundError(f"data source pattern {spec!r} matches no file")
        missing = [p for p in pattern if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"data source {spec!r}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        not_tar = [p for p in pattern if not p.lower().endswith(".tar")]
        if not_tar:
            raise ValueError(f"data source pattern {spec!r} must name .tar shards; it also matches {not_tar[0]}")
        return TarSource.from_shards(pattern, description=spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return FileSource.from_folder(path, extensions)
    if os.path.isfile(path):
        if path.lower().endswith(".tar"):
            return TarSource.from_shards([os.path.abspath(path)])
        return FileSource.from_list(path)
    raise FileNotFoundError(f"unknown data source {spec!r}: expected 'synthetic', 'builtin', a folder of images, "
                            "a text file listing images, or tar shards (x.tar, 'shards-{000..009}.tar', 'dir/*.tar')")


# --------------------------------------------------------------------------------------------
# screening


# The end marker of the formats whose truncation the header check looks for.
_EOI = (b"\xff\xd9", "JPEG", "end-of-image marker")
_END_MARKERS = {"JPEG": _EOI, "MPO": _EOI, "PNG": (b"IEND", "PNG", "IEND chunk")}


def _check_one(source: _EncodedSource, i: int, mode: str, formats: Optional[frozenset]) -> Optional[str]:
    """Why sample ``i`` is unusable, or None. ``header``: PIL identifies the format and size from
    the header (no pixel decoding; an aspect ratio beyond ``MAX_ASPECT_RATIO`` is refused), and a
    JPEG/PNG whose end marker (EOI / IEND) is not within its last 4 KiB, truncated or followed by
    other data (a phone's motion photo appends a video), is decoded in full to tell which;
    ``decode``: the header check, then a full decode of every file. Errors about the process
    rather than the file (``unreadable_file_error``) propagate."""
    try:
        with source.open(i) as f:
            with Image.open(f) as img:
                fmt, (w, h) = img.format, img.size
            if formats is not None and fmt not in formats:
                return f"format {fmt} is not supported (readable formats: {', '.join(sorted(formats))})"
            too_thin = aspect_ratio_problem(w, h)
            if too_thin is not None:
                return too_thin
            size = source.size(i)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except Exception as e:
        if not unreadable_file_error(e):
            raise
        return f"{type(e).__name__}: {e}"
    marker, kind, what = _END_MARKERS.get(fmt, (None, None, None))
    no_marker = marker is not None and marker not in tail
    if mode == "decode" or no_marker:
        try:
            source.decode(i)
        except ValueError as e:  # an unusable file (decode raises the process's errors as they are)
            return f"truncated {kind} (no {what}; {e})" if no_marker else str(e)
    return None


def check_source(source: Source, mode: str = "header", formats: Optional[Iterable[str]] = None,
                 threads: int = 8) -> Source:
    """Screen an encoded source once and return the source of its usable samples.

    Args:
        mode: "header" (cheap: format header + JPEG/PNG end marker, see ``_check_one``),
            "decode" (also decode every image fully with PIL: slow; catches the corrupt pixel
            data its decoders report, but libjpeg recovers from some damaged JPEG data with only
            a warning on stderr, and such an image is kept)
            or "none" (no check: the source is returned as is).
        formats: PIL format names the loader can decode (e.g. DALI_FORMATS); None = any.
        threads: I/O threads for the check.
    Returns:
        the same source when nothing was removed, otherwise a subset whose ``skipped`` lists
        (name, reason) of every removed file. Results are cached on ``source`` per (mode, formats).
    Raises:
        ValueError: ``mode`` is unknown, or no sample passed (the message shows some reasons).
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"check mode must be one of {CHECK_MODES}, got {mode!r}")
    if not isinstance(source, _EncodedSource) or mode == "none":
        return source
    fmts = frozenset(formats) if formats is not None else None
    key = (mode, fmts)
    if key in source._clean:
        return source
    if key in source._checked:
        return source._checked[key]
    n = len(source)
    if n == 0:
        raise ValueError(f"data source {source.description!r} is empty (no files)")
    if n < 64 or threads <= 1:
        reasons = [_check_one(source, i, mode, fmts) for i in range(n)]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            reasons = list(pool.map(lambda i: _check_one(source, i, mode, fmts), range(n), chunksize=64))
    bad = [(i, r) for i, r in enumerate(reasons) if r is not None]
    if len(bad) == n:
        examples = "; ".join(f"{source.name(i)}: {r}" for i, r in bad[:3])
        raise ValueError(f"none of the {n} files of {source.description} is a readable image ({examples})")
    result = source
    if bad:
        bad_set = {i for i, _ in bad}
        result = source.subset([i for i in range(n) if i not in bad_set])
        result.skipped = source.skipped + [(source.name(i), r) for i, r in bad]
        logger.warning("%s: skipping %d of %d files that are not readable images (check=%s), e.g. %s",
                       source.description, len(bad), n, mode,
                       "; ".join(f"{source.name(i)} ({r})" for i, r in bad[:3]))
        for i, r in bad:
            logger.debug("skipped %s: %s", source.name(i), r)
    result._clean.add(key)
    source._checked[key] = result
    return result
