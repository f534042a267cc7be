"""Helpers of the data tests: real photographs (made from the images bundled with scikit-image)
written as a folder of JPEG/PNG files in class subfolders, and as webdataset tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

SIZE = 32  # crop size of the loader tests
# (photograph, class folder, shorter side in pixels, format); 12 images, 3 classes
LAYOUT = [
    ("chelsea", "animals", 48, "JPEG"), ("chelsea", "animals", 32, "PNG"),
    ("immunohistochemistry", "animals", 40, "PNG"), ("hubble_deep_field", "animals", 56, "JPEG"),
    ("rocket", "objects", 32, "JPEG"), ("coffee", "objects", 44, "PNG"),
    ("motorcycle_left", "objects", 60, "JPEG"), ("motorcycle_right", "objects", 36, "PNG"),
    ("astronaut", "people", 52, "JPEG"), ("retina", "people", 38, "PNG"),
    ("coffee", "people", 34, "JPEG"), ("rocket", "people", 64, "PNG"),
]
CLASSES = ["animals", "objects", "people"]


def write_photos(root: Path, layout=LAYOUT) -> list:
    """Write the layout under ``root``; returns [(path, label)] sorted by path."""
    from dito_fast.data import bundled_photographs, resize_shorter_side

    photos = dict(bundled_photographs(sorted({name for name, *_ in layout})))
    out = []
    for k, (name, cls, short, fmt) in enumerate(layout):
        img = resize_shorter_side(photos[name], short)
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{k:02d}_{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
        img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append((str(path), CLASSES.index(cls)))
    return sorted(out)


def write_shards(folder: Path, files_labels: list, num_shards: int = 2, prefix: str = "shard") -> str:
    """Webdataset tars: sample k = (key.jpg|png, key.cls); returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        with tarfile.open(folder / f"{prefix}-{s:02d}.tar", "w") as tf:
            for k, (path, label) in enumerate(files_labels):
                if k % num_shards != s:
                    continue
                key = f"sample{k:03d}"
                tf.add(path, arcname=f"{key}.{path.rsplit('.', 1)[1]}")
                cls = str(label).encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(cls)
                tf.addfile(info, io.BytesIO(cls))
    return str(folder / f"{prefix}-{{00..{num_shards - 1:02d}}}.tar")


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


def corrupt_middle(data: bytes, seed: int = 1) -> bytes:
    """A copy of an encoded PNG whose compressed pixel data is garbage (header and end intact)."""
    b = bytearray(data)
    i = b.find(b"IDAT")
    b[i + 60:i + 400] = random_bytes(340, seed)
    return bytes(b)
