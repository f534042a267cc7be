"""Real photographs that ship inside the scikit-image wheel, and a crop dataset over them.

The files are read straight from scikit-image's package folder with PIL: ``skimage.data``
functions are not called, because some of them download through pooch, and nothing here may
touch the network. scikit-image is optional: without it ``bundled_photographs()`` returns [].
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from .synthetic import SyntheticImages
from .transforms import (ImageTransform, SharedEpoch, load_image, make_generator, pil_to_tensor,
                         resize_shorter_side, to_rgb)

logger = logging.getLogger(__name__)

__all__ = ["COLOR_PHOTOGRAPHS", "GREYSCALE_PHOTOGRAPHS", "HOLDOUT_PHOTOGRAPHS", "MixedDataset", "PhotoCrops",
           "builtin_split", "bundled_photographs", "skimage_data_dir"]

# name (as in skimage.data) -> file in skimage/data. Natural colour photographs and micrographs.
COLOR_PHOTOGRAPHS: Dict[str, str] = {
    "astronaut": "astronaut.png",                      # 512 x 512
    "chelsea": "chelsea.png",                          # 451 x 300, a cat
    "coffee": "coffee.png",                            # 600 x 400
    "hubble_deep_field": "hubble_deep_field.jpg",      # 1000 x 872
    "immunohistochemistry": "ihc.png",                 # 512 x 512, stained tissue micrograph
    "motorcycle_left": "motorcycle_left.png",          # 741 x 500, stereo pair (left)
    "motorcycle_right": "motorcycle_right.png",        # 741 x 500, stereo pair (right)
    "retina": "retina.jpg",                            # 1411 x 1411, fundus photograph
    "rocket": "rocket.jpg",                            # 640 x 427
}
# Greyscale photographs and scans; only loaded when asked for by name (returned as RGB).
GREYSCALE_PHOTOGRAPHS: Dict[str, str] = {
    "brick": "brick.png",
    "camera": "camera.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "moon": "moon.png",
    "page": "page.png",
    "text": "text.png",
}


def skimage_data_dir() -> Optional[str]:
    """scikit-image's bundled data folder, located without importing scikit-image; None if absent."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return path if os.path.isdir(path) else None


def bundled_photographs(names: Optional[Sequence[str]] = None) -> List[Tuple[str, Image.Image]]:
    """Load photographs shipped with scikit-image, offline.

    Args:
        names: keys of COLOR_PHOTOGRAPHS or GREYSCALE_PHOTOGRAPHS; None means every colour
            photograph present in the installed version (missing ones are skipped with an info log).
    Returns:
        [(name, RGB PIL image)], in the order of ``names`` (alphabetical for None);
        [] with an info log when scikit-image is not installed.
    Raises:
        ValueError: an unknown name.  FileNotFoundError: a requested name is not in this
        scikit-image installation.
    """
    known = {**COLOR_PHOTOGRAPHS, **GREYSCALE_PHOTOGRAPHS}
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown photograph(s) {unknown}; available: {sorted(known)}")
    data_dir = skimage_data_dir()
    if data_dir is None:
        logger.info("scikit-image is not installed: no bundled photographs")
        return []
    photos = []
    for name in (sorted(COLOR_PHOTOGRAPHS) if names is None else names):
        path = os.path.join(data_dir, known[name])
        if not os.path.isfile(path):
            if names is not None:
                raise FileNotFoundError(f"photograph {name!r} is not in this scikit-image: {path}")
            logger.info("photograph %s not found in %s; skipped", name, data_dir)
            continue
        photos.append((name, load_image(path)))
    return photos


PhotoList = Sequence[Union[Image.Image, Tuple[str, Image.Image]]]


class PhotoCrops(Dataset):
    """``num_crops`` square crops of a few photographs, float32 (3, size, size) in [-1, 1].

    Item ``i`` comes from photograph ``i % len(photos)``.

    - train=True: the photograph is resized (bicubic) so its shorter side is a random integer
      in [size, 2 * size], then cropped at a random position and (``hflip``) flipped left-right
      with p=0.5. Randomness is seeded from (seed, epoch, i); see ``set_epoch``.
    - train=False: deterministic. Each photograph gives k = ceil(num_crops / len(photos))
      crops on a g x g grid (g = ceil(sqrt(k))) laid evenly over the photograph resized to a
      shorter side of min(g, 2) * size; k = 1 is a center crop of the whole-photo view.

    Args:
        photos: PIL images, or (name, image) pairs as returned by ``bundled_photographs``.
        size: crop side in pixels.
        num_crops: dataset length.
        seed: base seed for train=True.
        train: random (True) or grid (False) crops.
        hflip: random left-right flips of the train=True crops.
    """

    def __init__(self, photos: PhotoList, size: int, num_crops: int, seed: int = 0,
                 train: bool = True, hflip: bool = True):
        images = [p[1] if isinstance(p, tuple) else p for p in photos]
        self.names = [p[0] if isinstance(p, tuple) else f"photo{i}" for i, p in enumerate(photos)]
        if not images:
            raise ValueError("PhotoCrops needs at least one photograph")
        if int(size) < 1 or int(num_crops) < 0 or int(seed) < 0:
            raise ValueError(f"need size >= 1, num_crops >= 0, seed >= 0; got {size}, {num_crops}, {seed}")
        self.size = int(size)
        self.num_crops = int(num_crops)
        self.seed = int(seed)
        self.train = bool(train)
        self._epoch = SharedEpoch()
        # Shrink once to the largest scale ever used, so items resize small images.
        self.photos = [resize_shorter_side(to_rgb(img), 2 * self.size)
                       if min(img.size) > 2 * self.size else to_rgb(img) for img in images]
        self._random_crop = ImageTransform(self.size, crop="random", hflip=bool(hflip))
        self._grid = max(1, math.ceil(math.sqrt(math.ceil(self.num_crops / len(self.photos)))))

    def __len__(self) -> int:
        return self.num_crops

    def __repr__(self) -> str:
        return (f"PhotoCrops(photos={len(self.photos)}, size={self.size}, num_crops={self.num_crops}, "
                f"seed={self.seed}, train={self.train})")

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used to seed per-item scales, crops and flips (train=True only), in
        every DataLoader worker (the epoch is in shared memory)."""
        self._epoch.set(epoch)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.item_at(index, self.epoch)

    def item_at(self, index: int, epoch: int) -> torch.Tensor:
        """Crop ``index`` as epoch ``epoch`` draws it (``dataset[index]`` is ``item_at(index,
        epoch set by set_epoch)``)."""
        if not -self.num_crops <= index < self.num_crops:
            raise IndexError(f"index {index} out of range for {self.num_crops} crops")
        index %= self.num_crops
        photo = self.photos[index % len(self.photos)]
        if self.train:
            generator = make_generator(self.seed, epoch, index)
            shorter = int(torch.randint(self.size, 2 * self.size + 1, (), generator=generator))
            return self._random_crop(resize_shorter_side(photo, shorter), generator=generator)
        g = self._grid
        img = resize_shorter_side(photo, min(g, 2) * self.size)
        cell = index // len(self.photos)  # which crop of this photograph
        row, col = divmod(cell, g)
        w, h = img.size
        left = (w - self.size) // 2 if g == 1 else round(col * (w - self.size) / (g - 1))
        top = (h - self.size) // 2 if g == 1 else round(row * (h - self.size) / (g - 1))
        return pil_to_tensor(img.crop((left, top, left + self.size, top + self.size)))


class MixedDataset(ConcatDataset):
    """``torch.utils.data.ConcatDataset`` that forwards ``set_epoch`` to its parts."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)


# Held out by ``builtin_split``: a portrait and a close-up with fine texture. (The motorcycle
# stereo pair stays together in training, so no held-out picture has a near-twin there.)
HOLDOUT_PHOTOGRAPHS = ("astronaut", "coffee")


def builtin_split(size: int, num_synthetic: int, seed: int = 0, val_seed: int = 1,
                  num_val: int = 8, hflip: bool = True) -> Tuple[Dataset, Dataset]:
    """Train / validation datasets for the "builtin" source, with whole photographs held out.

    Train: SyntheticImages(num_synthetic, size, seed) followed by ``num_synthetic`` random crops
    (PhotoCrops, train=True, flipped at random if ``hflip``) of the bundled colour photographs
    except HOLDOUT_PHOTOGRAPHS.
    Validation (``num_val`` items): num_val // 2 deterministic crops of the held-out photographs,
    then synthetic images rendered with ``val_seed``. Without scikit-image both are synthetic only.
    Items are float32 (3, size, size) in [-1, 1]; both datasets have ``set_epoch``.
    """
    photos = bundled_photographs()
    held = [p for p in photos if p[0] in HOLDOUT_PHOTOGRAPHS]
    if photos and not held:  # another scikit-image version: hold out the last one
        held = photos[-1:]
    held_names = {name for name, _ in held}
    train_photos = [p for p in photos if p[0] not in held_names]
    train_parts: List[Dataset] = [SyntheticImages(num_synthetic, size, seed=seed)]
    if train_photos:
        train_parts.append(PhotoCrops(train_photos, size, num_synthetic, seed=seed, train=True, hflip=hflip))
    num_photo_val = num_val // 2 if held else 0
    val_parts: List[Dataset] = []
    if num_photo_val:
        val_parts.append(PhotoCrops(held, size, num_photo_val, seed=val_seed, train=False))
    val_parts.append(SyntheticImages(num_val - num_photo_val, size, seed=val_seed))
    logger.info("builtin_split: training photographs %s, held out %s",
                [p[0] for p in train_photos], [p[0] for p in held])
    return MixedDataset(train_parts), MixedDataset(val_parts)
