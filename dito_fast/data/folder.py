"""A dataset over a folder tree of image files (any layout, labels ignored: a tokenizer needs none)."""

from __future__ import annotations

import logging
import os
from typing import Iterable, List, Optional, Set

import torch
from torch.utils.data import Dataset

from .transforms import ImageTransform, PathLike, SharedEpoch, load_image, make_generator, unreadable_file_error

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "list_image_files"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _normalize_extensions(extensions: Iterable[str]) -> tuple:
    exts = tuple(sorted({("." + e.lower().lstrip(".")) for e in extensions}))
    if not exts:
        raise ValueError("extensions must not be empty")
    return exts


def list_image_files(root: PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> List[str]:
    """All files under ``root`` (recursive; symlinked folders are followed, each folder entered
    once, so a link back up the tree is no loop; a link to a folder inside ``root`` is skipped,
    since that folder is listed under its own name, whatever the two names' order) whose
    extension matches, case-insensitively. Hidden files and folders (names starting with ".":
    ``.ipynb_checkpoints``, ``.Trash-1000``, macOS's ``._x.jpg`` resource forks) are not listed,
    as tar members of such names are not either: their copies had been trained on, a trash folder
    had become class 0 and shifted every label. (A file list names its files itself: they are read.)
    Returns sorted absolute paths, so the order is the same on every run; [] when nothing matches.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a directory.
    """
    root = os.path.abspath(os.fspath(root))
    exts = _normalize_extensions(extensions)
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"image folder is not a directory: {root}")
    files = []
    root_stat, inside = os.stat(root), os.path.join(os.path.realpath(root), "")
    seen = {(root_stat.st_dev, root_stat.st_ino)}  # folders entered: a symlink back up the tree is a loop
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            path = os.path.join(dirpath, d)
            if os.path.islink(path) and os.path.join(os.path.realpath(path), "").startswith(inside):
                continue  # (walked under its real name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                files.append(os.path.join(dirpath, name))
    return sorted(files)


class ImageFolderDataset(Dataset):
    """Images found recursively under ``root``, as float32 tensors (3, size, size) in [-1, 1].

    Args:
        root: folder to scan (see ``list_image_files``); FileNotFoundError if missing,
            NotADirectoryError if not a folder, ValueError if it holds no image file.
        size: output side in pixels; the shorter image side is resized to ``size`` (bicubic).
        train: True -> random crop (+ flip by default); False -> center crop, no flip.
        hflip: random left-right flip with p=0.5; None means "same as train".
        extensions: file extensions to accept, case-insensitive, with or without the dot.
        seed: base seed; item ``i`` in epoch ``e`` uses a generator seeded from (seed, e, i),
            so the same (seed, epoch, index) always gives the same crop and flip.

    Unreadable files (corrupt, truncated, not an image) are skipped: a warning names the file,
    ``num_skipped`` is incremented, the index is remembered so it is not retried, and the next
    readable file (wrapping around) is returned instead. If no file is readable, RuntimeError.
    With a multi-process DataLoader each worker keeps its own ``num_skipped`` and bad-index set;
    ``set_epoch`` reaches every worker, persistent ones too (the epoch is in shared memory).
    """

    def __init__(self, root: PathLike, size: int, train: bool = True, hflip: Optional[bool] = None,
                 extensions: Iterable[str] = IMAGE_EXTENSIONS, seed: int = 0):
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.root = os.path.abspath(os.fspath(root))
        self.extensions = _normalize_extensions(extensions)
        self.files = list_image_files(self.root, self.extensions)
        if not self.files:
            raise ValueError(f"no image files with extensions {', '.join(self.extensions)} "
                             f"found under {self.root}")
        self.train = bool(train)
        self.transform = ImageTransform(size, crop="random" if self.train else "center",
                                        hflip=self.train if hflip is None else bool(hflip))
        self.size = self.transform.size
        self.seed = int(seed)
        self._epoch = SharedEpoch()
        self.num_skipped = 0
        self._bad: Set[int] = set()
        logger.info("ImageFolderDataset: %d image files under %s", len(self.files), self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={self.root!r}, num_files={len(self.files)}, "
                f"size={self.size}, train={self.train}, seed={self.seed})")

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used to seed per-item crops and flips (in every DataLoader worker)."""
        self._epoch.set(epoch)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.item_at(index, self.epoch)

    def item_at(self, index: int, epoch: int) -> torch.Tensor:
        """Item ``index`` as epoch ``epoch`` crops and flips it (``dataset[index]`` is
        ``item_at(index, epoch set by set_epoch)``)."""
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                img = load_image(self.files[i])
            except Exception as e:
                if not unreadable_file_error(e):
                    raise
                self._bad.add(i)
                self.num_skipped += 1
                logger.warning("skipping unreadable image %s (%s)", self.files[i], e)
                continue
            # Seeded from the requested index, so a skipped file's neighbours keep their crops.
            return self.transform(img, generator=make_generator(self.seed, epoch, index))
        raise RuntimeError(f"none of the {n} image files under {self.root} could be read "
                           f"({self.num_skipped} skipped); see the warnings above")
