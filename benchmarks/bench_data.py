"""Data-loading throughput against what training consumes, measured in one run.

- ``test_train_step_consumption``: images/s a dito-S training step (64x64, batch 8, forward +
  backward + fused AdamW, default fused-op backend) consumes on this machine;
- ``test_loader_throughput``: images/s delivered by ``dito_fast.data.make_loader`` at 64x64 and
  256x256 random crops (+ flips) from 64 JPEGs of 300-600 px (the photographs bundled with
  scikit-image, re-encoded), for the DALI loader on CPU (1 and 2 threads) and the PyTorch loader
  with 0, 1 and 2 worker processes. Steady state: workers started and the first batch read
  before timing. ``extra_info``: images_per_s, loader, workers, threads, crop, and (when the
  consumption test ran first in the same session) train_images_per_s and ratio_vs_train;
- ``test_latent_set_open``: the start of a ``train-dit`` rank (``load_latents`` to the first batch)
  on 2,000 latent files as ``encode`` writes them and on their pack (``pack-latents``), with the
  pack's speed-up in the same run.

The default loader on a CPU-only machine is the PyTorch loader with ``data.workers = 0``
(``"default": true`` in extra_info); its ratio_vs_train must stay >= 3.

Run: ``pytest benchmarks/bench_data.py --benchmark-json=bench_data.json`` and
``python benchmarks/report.py bench_data.json``.
"""

from __future__ import annotations

import time

import pytest
import torch

from dito_fast.config import DataConfig
from dito_fast.data import COLOR_PHOTOGRAPHS, bundled_photographs, dali_status, make_loader, resize_shorter_side

import bench_model  # the same dito-S train step as the model benchmark (benchmarks/ is on sys.path under pytest)

BATCH = 32  # loader batch
STEPS_PER_ROUND = 4
TRAIN_PRESET, TRAIN_SIZE, TRAIN_BATCH = "dito-S", 64, 8
_consumption: dict = {}  # train_images_per_s measured by test_train_step_consumption in this session


def _median(benchmark):
    return benchmark.stats.stats.median if benchmark.stats is not None else None


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    """64 JPEGs (quality 90) with shorter sides spread over 300-600 px, from the bundled photographs."""
    pytest.importorskip("skimage")
    photos = bundled_photographs(sorted(COLOR_PHOTOGRAPHS))
    if not photos:
        pytest.skip("no bundled photographs")
    root = tmp_path_factory.mktemp("bench_jpegs")
    for k in range(64):
        name, img = photos[k % len(photos)]
        img = resize_shorter_side(img, 300 + (k * 151) % 301)
        img.save(root / f"{k:02d}_{name}.jpg", quality=90)
    return str(root)


def test_train_step_consumption(benchmark):
    batch = 1 if benchmark.disabled else TRAIN_BATCH  # smoke runs exercise the code path only
    assert TRAIN_SIZE == bench_model.SIZE
    step = bench_model.train_step_fn(TRAIN_PRESET, batch)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    med = _median(benchmark)
    if med:
        _consumption["train_images_per_s"] = TRAIN_BATCH / med
        benchmark.extra_info.update({"preset": TRAIN_PRESET, "batch": TRAIN_BATCH, "image_size": TRAIN_SIZE,
                                     "images_per_s": TRAIN_BATCH / med, "threads": torch.get_num_threads()})


CONFIGS = [("dali", 1), ("dali", 2), ("torch", 0), ("torch", 1), ("torch", 2)]


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("loader,workers", CONFIGS, ids=[f"{k}-w{w}" for k, w in CONFIGS])
def test_loader_throughput(benchmark, jpeg_dir, loader, workers, size):
    if loader == "dali" and not dali_status()[0]:
        pytest.skip("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    cfg = DataConfig(source=jpeg_dir, image_size=size, loader=loader, workers=workers)
    data = make_loader(cfg, batch_size=BATCH, seed=0, device="cpu")
    batches = iter(data)
    t0 = time.perf_counter()
    next(batches)  # start workers / build the pipeline
    first_batch_s = time.perf_counter() - t0

    def pull():
        for _ in range(STEPS_PER_ROUND):
            next(batches)

    try:
        benchmark.pedantic(pull, rounds=5, warmup_rounds=1, iterations=1)
    finally:
        batches.close()  # ends worker processes / the DALI pipeline
        data.close()
    med = _median(benchmark)
    threads = workers if loader == "dali" else torch.get_num_threads()
    info = {"loader": loader, "workers": workers, "threads": threads, "crop": size, "batch": BATCH,
            "default": loader == "torch" and workers == DataConfig().workers, "first_batch_s": first_batch_s}
    if med:
        info["images_per_s"] = STEPS_PER_ROUND * BATCH / med
        if "train_images_per_s" in _consumption:
            info["train_images_per_s"] = _consumption["train_images_per_s"]
            info["ratio_vs_train"] = info["images_per_s"] / _consumption["train_images_per_s"]
    benchmark.extra_info.update(info)


LATENTS = 2000  # 4x32x32 latents, one file each, in 10 class folders


@pytest.fixture(scope="module")
def latent_sets(tmp_path_factory):
    """A folder of LATENTS latent files as ``encode`` writes them, and its pack."""
    from dito_fast.data.latents import pack_latents
    from dito_fast.train.checkpoint import save_safetensors

    root = tmp_path_factory.mktemp("bench_latents")
    g = torch.Generator().manual_seed(0)
    for i in range(LATENTS):
        save_safetensors({"latent": torch.randn(1, 4, 32, 32, generator=g)},
                         root / "latents" / f"c{i % 10}" / f"{i:05d}.safetensors",
                         metadata={"model": "dito-B", "model_fingerprint": "0" * 16})
    pack_latents(root / "latents", root / "latents.safetensors", class_folders=True, progress=False)
    return {"folder": root / "latents", "pack": root / "latents.safetensors"}


_latent_open: dict = {}


@pytest.mark.parametrize("form", ["folder", "pack"])
def test_latent_set_open(benchmark, latent_sets, form):
    """Seconds from ``load_latents`` to train-dit's first batch of 256 (as every rank of a run
    pays at its start), for the folder (every file read) and its pack (memory-mapped; its pages
    warm in the page cache, as the folder's files are after the first round). extra_info:
    latents_per_s, and for the pack ``speedup_vs_folder`` (the folder's row must run first)."""
    from dito_fast.data.latents import load_latents
    from dito_fast.train.dit import LatentLoader

    def start():
        loader = LatentLoader(load_latents(latent_sets[form], class_folders=True, progress=False), 256, seed=0)
        next(iter(loader))

    benchmark.pedantic(start, rounds=5, warmup_rounds=1, iterations=1)
    med = _median(benchmark)
    if med:
        _latent_open[form] = med
        info = {"form": form, "latents": LATENTS, "latents_per_s": LATENTS / med}
        if form == "pack" and "folder" in _latent_open:
            info["speedup_vs_folder"] = _latent_open["folder"] / med
        benchmark.extra_info.update(info)
