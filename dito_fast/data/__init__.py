"""Datasets, sources, transforms and loaders: everything that turns pixels on disk (or
procedures) into tensors.

- ``resolve_source(spec)``: a folder, file list, tar shards or "synthetic"/"builtin" -> a Source;
- ``make_loader(cfg, rank, world_size, start_step, ...)``: batches {"image", "label", "index"}
  from the PyTorch DataLoader or NVIDIA DALI, same order and crops from both (loader.py, dali.py);
- datasets (``SyntheticImages``, ``ImageFolderDataset``, ``PhotoCrops``) return float32 tensors
  (3, size, size) in [-1, 1] and have ``set_epoch(epoch)``; per-item randomness is seeded from
  (seed, epoch, index);
- ``latents``: the latent sets ``train-dit`` reads (folders ``encode`` writes, and their
  memory-mapped packs), imported from ``dito_fast.data.latents``.
"""

from __future__ import annotations

import logging
import os
from typing import List

from torch.utils.data import Dataset

from .builtin import (COLOR_PHOTOGRAPHS, GREYSCALE_PHOTOGRAPHS, HOLDOUT_PHOTOGRAPHS, MixedDataset,
                      PhotoCrops, builtin_split, bundled_photographs, skimage_data_dir)
from .folder import IMAGE_EXTENSIONS, ImageFolderDataset, list_image_files
from .loader import (LOADERS, BatchLoader, DALIUnavailableError, TorchLoader, dali_status, make_loader,
                     resolve_memory_format, select_loader)
from .sampler import StepBatchSampler, eval_shard, mix_seed, rank_slice
from .sources import (DALI_FORMATS, DatasetSource, FileSource, Source, TarSource, check_source, expand_braces,
                      parse_file_list, resolve_source)
from .synthetic import SyntheticImages, find_fonts
from .transforms import (ImageTransform, crop_params, crop_params_array, crop_window, decode_image,
                         load_image, loader_resize_size, make_generator, pil_to_tensor, resize_crop_flip,
                         resize_shorter_side, tensor_to_pil, to_rgb, to_uint8, uint8_batch_to_float)

logger = logging.getLogger(__name__)

__all__ = [
    "BatchLoader",
    "COLOR_PHOTOGRAPHS",
    "DALI_FORMATS",
    "DALIUnavailableError",
    "DatasetSource",
    "FileSource",
    "LOADERS",
    "Source",
    "StepBatchSampler",
    "TarSource",
    "TorchLoader",
    "check_source",
    "crop_params",
    "crop_params_array",
    "crop_window",
    "dali_status",
    "decode_image",
    "eval_shard",
    "expand_braces",
    "loader_resize_size",
    "make_loader",
    "resolve_memory_format",
    "mix_seed",
    "parse_file_list",
    "rank_slice",
    "resize_crop_flip",
    "resolve_source",
    "select_loader",
    "GREYSCALE_PHOTOGRAPHS",
    "HOLDOUT_PHOTOGRAPHS",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageTransform",
    "MixedDataset",
    "PhotoCrops",
    "SyntheticImages",
    "builtin_split",
    "bundled_photographs",
    "find_fonts",
    "list_image_files",
    "load_image",
    "make_dataset",
    "make_generator",
    "pil_to_tensor",
    "resize_shorter_side",
    "skimage_data_dir",
    "tensor_to_pil",
    "to_rgb",
    "to_uint8",
    "uint8_batch_to_float",
]


def make_dataset(source: "str | os.PathLike[str]", size: int, train: bool = True, seed: int = 0,
                 num_synthetic: int = 10000, hflip: bool = True) -> Dataset:
    """Build the dataset named by ``source``; items are float32 (3, size, size) in [-1, 1].

    Args:
        source: "synthetic" -> SyntheticImages(num_synthetic, size, seed);
            "builtin" -> those synthetic images followed by as many crops (PhotoCrops) of the
            photographs bundled with scikit-image (synthetic only, with an info log, when
            scikit-image is missing): all of them, including the two that ``dito-fast train``
            holds out for validation (``builtin_split`` makes the trainer's split); any other
            value must be an existing directory -> ImageFolderDataset(source, size, train, seed=seed).
        size: image side in pixels.
        train: random crops/flips (True) or deterministic center/grid crops (False).
        seed: base seed of all per-item randomness.
        num_synthetic: number of synthetic images (and of photo crops for "builtin").
        hflip: random left-right flips of the training crops (photographs and folders).
    Raises:
        ValueError: ``source`` is neither a known name nor an existing directory.
    """
    source = os.fspath(source)
    if source == "synthetic":
        return SyntheticImages(num_synthetic, size, seed=seed)
    if source == "builtin":
        parts: List[Dataset] = [SyntheticImages(num_synthetic, size, seed=seed)]
        photos = bundled_photographs()
        if photos:
            parts.append(PhotoCrops(photos, size, num_crops=num_synthetic, seed=seed, train=train, hflip=hflip))
        else:
            logger.info("make_dataset('builtin'): no bundled photographs, synthetic images only")
        return MixedDataset(parts)
    if os.path.isdir(source):
        return ImageFolderDataset(source, size, train=train, seed=seed, hflip=hflip and train)
    if os.path.exists(source):
        raise ValueError(f"data source {source!r} is a file; expected 'synthetic', 'builtin' "
                         "or a directory of images")
    raise ValueError(f"unknown data source {source!r}: expected 'synthetic', 'builtin' or an "
                     "existing directory of images")
