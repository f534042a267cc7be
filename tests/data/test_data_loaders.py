"""Tests for dito_fast.data.make_loader: the PyTorch loader and the DALI loader (CPU pipelines),
on a folder of real JPEG/PNG photographs and on webdataset tar shards.

Tolerances between the loaders (same files, same crop windows and flips by construction):
- decoding only (images whose shorter side is already the crop size, center crop): at most
  2 grey levels (2/127.5) apart; DALI's CPU decoders matched PIL exactly (0 levels) here, the
  margin covers other libjpeg-turbo builds;
- after resizing (cubic, antialiased in both, different implementations): mean absolute
  difference <= 0.5 grey levels, maximum <= 16 (measured here: ~0.2 mean, <= 11 max).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil

import pytest
import torch
from PIL import Image

from data_helpers import SIZE, corrupt_middle, random_bytes
from dito_fast.config import DataConfig
from dito_fast.data import DALIUnavailableError, dali_status, make_loader, resolve_source, select_loader
from dito_fast.data import loader as loader_mod

HAVE_DALI = dali_status()[0]
DALI = pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed "
                                                     "(pip install nvidia-dali-cuda130)"))
KINDS = ["torch", DALI]
LEVEL = 1 / 127.5  # one grey level in [-1, 1] units


@pytest.fixture(params=["folder", "tar"])
def source(request, photo_dir, tar_pattern):
    """(source string, labels by source index) for the folder and for the tar shards."""
    spec = str(photo_dir[0]) if request.param == "folder" else tar_pattern
    return spec, resolve_source(spec).labels.tolist()


def _loader(kind, spec, *, batch_size=4, seed=0, **kw):
    data_kw = {k: kw.pop(k) for k in ("memory_format", "check_files", "hflip", "workers") if k in kw}
    return make_loader(DataConfig(source=spec, image_size=SIZE, **data_kw), batch_size=batch_size, seed=seed,
                       loader=kind, **kw)


def _run(kind, spec, **kw):
    loader = _loader(kind, spec, **kw)
    return loader, list(loader)


def _indices(batches):
    return [b["index"].tolist() for b in batches]


# ---------------------------------------------------------------- batch structure

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_batches_shapes_dtype_range_labels(kind, source, memory_format):
    spec, labels = source
    loader, batches = _run(kind, spec, num_steps=3, memory_format=memory_format)
    assert loader.kind == kind and len(loader) == 3 and len(batches) == 3
    for b in batches:
        assert set(b) == {"image", "label", "index"}
        x = b["image"]
        assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
        assert x.is_contiguous(memory_format=torch.channels_last if memory_format == "channels_last"
                               else torch.contiguous_format)
        assert b["label"].dtype == b["index"].dtype == torch.int64
        assert b["label"].tolist() == [labels[i] for i in b["index"].tolist()]
    # 3 steps of 4 = one epoch of 12 images: each exactly once
    assert sorted(sum(_indices(batches), [])) == list(range(12))
    assert set(labels) == {0, 1, 2}
    # evaluation: one pass in source order, center crops, last batch partial
    ev_loader, ev = _run(kind, spec, batch_size=5, train=False, memory_format=memory_format)
    assert len(ev_loader) == 3 and _indices(ev) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert ev[-1]["image"].shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_order_new_epoch_new_order(kind, source):
    spec, _ = source
    _, a = _run(kind, spec, seed=7, num_steps=6)
    _, b = _run(kind, spec, seed=7, num_steps=6)
    assert _indices(a) == _indices(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    epoch0, epoch1 = sum(_indices(a[:3]), []), sum(_indices(a[3:]), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12)) and epoch0 != epoch1
    _, c = _run(kind, spec, seed=8, num_steps=6)
    assert _indices(c) != _indices(a)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_epoch_reproduces_the_rest(kind, source):
    spec, _ = source
    _, full = _run(kind, spec, seed=3, num_steps=8)
    _, rest = _run(kind, spec, seed=3, start_step=4, num_steps=4)  # step 4 is inside epoch 1 (3 steps/epoch)
    assert _indices(rest) == _indices(full[4:])
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[4:]))


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_disjoint_and_covering(kind, source):
    spec, _ = source
    _, whole = _run(kind, spec, seed=1, num_steps=6)
    ranks = [_run(kind, spec, seed=1, num_steps=6, rank=r, world_size=2)[1] for r in range(2)]
    for k in range(6):
        r0, r1 = ranks[0][k]["index"].tolist(), ranks[1][k]["index"].tolist()
        assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)
        assert r0 + r1 == whole[k]["index"].tolist()  # each global batch split across the ranks
    for epoch in range(2):  # together the ranks read every image once per epoch
        seen = [i for r in range(2) for b in ranks[r][3 * epoch:3 * epoch + 3] for i in b["index"].tolist()]
        assert sorted(seen) == list(range(12))
    ev = [sum(_indices(_run(kind, spec, batch_size=4, train=False, rank=r, world_size=2)[1]), []) for r in range(2)]
    assert ev == [list(range(6)), list(range(6, 12))]
    # a global batch the world size does not divide: shares of 2 and 1 samples, still one global batch
    uneven = [_run(kind, spec, batch_size=3, seed=1, num_steps=4, rank=r, world_size=2)[1] for r in range(2)]
    whole3 = _run(kind, spec, batch_size=3, seed=1, num_steps=4)[1]
    for k in range(4):
        r0, r1 = uneven[0][k]["index"].tolist(), uneven[1][k]["index"].tolist()
        assert (len(r0), len(r1)) == (1, 2) and r0 + r1 == whole3[k]["index"].tolist()
    with pytest.raises(ValueError, match="smaller than world_size"):
        _loader(kind, spec, batch_size=1, world_size=2)


# ---------------------------------------------------------------- DALI vs PyTorch

@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
def test_dali_and_torch_agree(source):
    spec, _ = source
    src = resolve_source(spec)
    for train in (True, False):
        _, t = _run("torch", spec, seed=2, num_steps=6, train=train)
        _, d = _run("dali", spec, seed=2, num_steps=6, train=train)
        assert _indices(t) == _indices(d) and len(t) == (6 if train else 3)
        diff = torch.cat([(a["image"] - b["image"]).abs() for a, b in zip(t, d)])
        assert diff.mean() <= 0.5 * LEVEL and diff.max() <= 16 * LEVEL, (diff.mean() / LEVEL, diff.max() / LEVEL)
    # decoding alone: center crops of images whose shorter side is already SIZE (no resampling)
    native = [i for i in range(len(src)) if min(src.decode(i).size) == SIZE]
    assert len(native) == 2  # one JPEG, one PNG
    fmts = set()
    for i, a, b in zip(range(len(src)), torch.cat([x["image"] for x in t]), torch.cat([x["image"] for x in d])):
        if i in native:
            with Image.open(src.open(i)) as img:
                fmts.add(img.format)
            assert (a - b).abs().max() <= 2 * LEVEL
    assert fmts == {"JPEG", "PNG"}


@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
def test_dali_pipeline_chunks_do_not_change_the_stream(source):
    # one DALI pipeline per chunk of steps; for tars at most max_shard_runs index files each
    spec, _ = source
    _, ref = _run("torch", spec, seed=6, num_steps=7)
    loader = _loader("dali", spec, seed=6, num_steps=7)
    loader.chunk_samples, loader.max_shard_runs = 4, 2
    batches = list(loader)
    assert loader._pipelines_built >= 3
    assert _indices(batches) == _indices(ref)


# ---------------------------------------------------------------- unreadable files

@pytest.fixture
def messy_dir(photo_dir, tmp_path):
    """6 good photographs; a random-bytes .jpg and a truncated .jpg (caught by the header
    check); a PNG whose pixel data is corrupt behind a valid header (caught only when decoded)."""
    root, files = photo_dir
    d = tmp_path / "messy"
    d.mkdir()
    for k in (0, 1, 3, 5, 8, 11):
        shutil.copy(files[k][0], d / os.path.basename(files[k][0]))
    (d / "03_garbage.jpg").write_bytes(random_bytes(4000))
    jpeg = open(files[0][0], "rb").read()
    (d / "04_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    big = Image.open(files[11][0]).convert("RGB")  # a 64-px PNG: its IDAT is long enough to corrupt
    big.save(d / "06_corrupt.png")
    (d / "06_corrupt.png").write_bytes(corrupt_middle((d / "06_corrupt.png").read_bytes()))
    return d


@pytest.mark.parametrize("kind,workers", [("torch", 0), ("torch", 1), (DALI.values[0], 1)])
def test_unreadable_files_are_skipped_and_counted(kind, workers, messy_dir, caplog):
    if kind == "dali" and not HAVE_DALI:
        pytest.skip("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    with caplog.at_level(logging.WARNING, logger="dito_fast.data"):
        loader, batches = _run(kind, str(messy_dir), seed=0, num_steps=8, workers=workers)
    names = sorted(os.path.basename(f) for f in loader.skipped_files)
    assert names == ["03_garbage.jpg", "04_truncated.jpg", "06_corrupt.png"] and loader.num_skipped == 3
    assert len(loader.source) == 7  # the two the header check removed are gone; the corrupt PNG is met later
    bad = loader.source.files.index(str(messy_dir / "06_corrupt.png"))
    seen = set(sum(_indices(batches), []))
    assert bad not in seen and len(seen) == 6
    for b in batches:
        assert torch.isfinite(b["image"]).all()
    assert "06_corrupt.png" in caplog.text and "03_garbage.jpg" in caplog.text
    if kind == "torch":  # the replacement is the same in every loader: compare with the in-process run
        _, ref = _run("torch", str(messy_dir), seed=0, num_steps=8, workers=0)
        assert _indices(ref) == _indices(batches)


@pytest.mark.parametrize("kind", KINDS)
def test_unscreened_unreadable_files_are_found_while_reading(kind, messy_dir):
    # check_files="none": every bad file is met during the run (DALI: its pipeline fails, the file
    # is identified, replaced like the PyTorch loader does, and a new pipeline resumes)
    loader, batches = _run(kind, str(messy_dir), seed=4, num_steps=6, check_files="none")
    assert len(loader.source) == 9 and loader.num_skipped == 3
    assert sorted(os.path.basename(f) for f in loader.skipped_files) == [
        "03_garbage.jpg", "04_truncated.jpg", "06_corrupt.png"]
    _, ref = _run("torch", str(messy_dir), seed=4, num_steps=6, check_files="none")
    assert _indices(batches) == _indices(ref)


@pytest.mark.parametrize("kind", KINDS)
def test_images_too_thin_to_resize_are_skipped(kind, photo_dir, tmp_path):
    """An image of 2 x 300 pixels (aspect 150:1, beyond MAX_ASPECT_RATIO) is skipped and named by
    the screening of both loaders: resized whole, a 4 KB PNG of 1 x 1,000,000 pixels had become
    256 x 256,000,000 pixels and stopped training with a bare MemoryError. Unscreened, the PyTorch
    loader skips it when it meets it."""
    root, files = photo_dir
    d = tmp_path / "thin"
    d.mkdir()
    for k in (0, 1, 4):
        shutil.copy(files[k][0], d / os.path.basename(files[k][0]))
    Image.new("RGB", (2, 300), (200, 10, 10)).save(d / "zz_line.png")
    loader, batches = _run(kind, str(d), seed=0, num_steps=3, batch_size=2)
    assert [os.path.basename(f) for f in loader.skipped_files] == ["zz_line.png"] and len(loader.source) == 3
    assert "aspect ratio 150.0:1" in next(reason for _, reason in loader.source.skipped)
    assert len(batches) == 3
    if kind == "torch":
        loader, batches = _run(kind, str(d), seed=0, num_steps=3, batch_size=2, check_files="none")
        assert len(loader.source) == 4 and len(batches) == 3
        assert [os.path.basename(f) for f in loader.skipped_files] == ["zz_line.png"]


@pytest.mark.parametrize("kind", KINDS)
def test_file_names_that_are_not_utf8(kind, photo_dir, tmp_path):
    """A file named in Latin-1 (b"caf\\xe9.png", as old archives hold) is read like any other, in
    training and evaluation: one such name had failed DALI's whole pipeline ("Unsupported argument
    type with name files")."""
    root, files = photo_dir
    d = tmp_path / "names"
    d.mkdir()
    for k in (0, 1):
        shutil.copy(files[k][0], d / os.path.basename(files[k][0]))
    shutil.copy(files[4][0], os.path.join(os.fsencode(d), b"caf\xe9.png"))
    loader, batches = _run(kind, str(d), seed=0, num_steps=3, batch_size=2)
    _, ref = _run("torch", str(d), seed=0, num_steps=3, batch_size=2)
    assert loader.num_skipped == 0 and len(loader.source) == 3
    assert _indices(batches) == _indices(ref) and sorted(set(sum(_indices(batches), []))) == [0, 1, 2]
    evaluated = list(_loader(kind, str(d), train=False, batch_size=2))
    assert sorted(sum(_indices(evaluated), [])) == [0, 1, 2]


@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
def test_dali_skips_an_image_only_pil_reads(photo_dir, tmp_path):
    # A valid 1-bit TIFF: PIL (and so the screening and the PyTorch loader) reads it, DALI's
    # decoder refuses it with a message naming no file; the run had stopped with "no unreadable
    # file was found". DALI now tests the in-flight samples one by one and skips that file.
    root, files = photo_dir
    d = tmp_path / "bilevel"
    d.mkdir()
    for k in (0, 1, 4):
        shutil.copy(files[k][0], d / os.path.basename(files[k][0]))
    Image.open(files[0][0]).convert("1").save(d / "zz_bilevel.tif")
    loader, batches = _run("dali", str(d), seed=0, num_steps=4, batch_size=2)
    assert [os.path.basename(f) for f in loader.skipped_files] == ["zz_bilevel.tif"] and loader.num_skipped == 1
    assert "DALI cannot decode it" in next(iter(loader._bad.values()))
    assert len(batches) == 4 and all(torch.isfinite(b["image"]).all() for b in batches)
    torch_loader, _ = _run("torch", str(d), seed=0, num_steps=4, batch_size=2)
    assert torch_loader.num_skipped == 0  # the two loaders' streams differ for such files (documented)


def test_any_decoder_error_skips_the_file_but_process_errors_stop_the_run(photo_dir, tmp_path, monkeypatch):
    # PIL raises more than OSError/ValueError on damaged data (a fuzzed TIFF gave a TypeError,
    # which had stopped training); "Too many open files" is the process's, not the file's, and
    # must not get good files skipped.
    import errno

    from dito_fast.data import transforms

    root, files = photo_dir
    d = tmp_path / "few"
    d.mkdir()
    for k in (0, 1, 4):
        shutil.copy(files[k][0], d / os.path.basename(files[k][0]))
    victim = Image.open(files[0][0]).size  # the only one of its size among the three
    real = transforms.ImageOps.exif_transpose

    def flaky(exc):
        def exif_transpose(img):
            if img.size == victim:
                raise exc
            return real(img)
        return exif_transpose
    monkeypatch.setattr(transforms.ImageOps, "exif_transpose", flaky(TypeError("bad tag")))
    loader, batches = _run("torch", str(d), seed=0, num_steps=3, batch_size=2, check_files="none")
    assert [os.path.basename(f) for f in loader.skipped_files] == [os.path.basename(files[0][0])]
    assert loader.num_skipped == 1 and len(batches) == 3
    monkeypatch.setattr(transforms.ImageOps, "exif_transpose", flaky(OSError(errno.EMFILE, "Too many open files")))
    with pytest.raises(OSError, match="Too many open files"):
        _run("torch", str(d), seed=0, num_steps=3, batch_size=2, check_files="none")


@pytest.mark.parametrize("kind", KINDS)
def test_empty_or_unreadable_source_is_a_clear_error(kind, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="no image files"):
        _loader(kind, str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("a.jpg", "b.png"):
        (bad / name).write_bytes(b"\x00garbage" * 40)
    with pytest.raises(ValueError, match="none of the 2 files"):
        _loader(kind, str(bad))
    loader = _loader(kind, str(bad), check_files="none", num_steps=1)  # unscreened: found when read
    with pytest.raises(RuntimeError, match="none of the 2 images"):
        list(loader)


# ---------------------------------------------------------------- selection

def test_auto_selection(monkeypatch, photo_dir):
    folder = resolve_source(str(photo_dir[0]))
    synthetic = resolve_source("synthetic", image_size=SIZE, num_synthetic=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_loader("auto", folder) == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loader_mod, "dali_status", lambda: (True, "installed"))
    assert select_loader("auto", folder) == "dali"
    assert select_loader("auto", folder, device="cpu") == "torch"
    assert select_loader("auto", synthetic) == "torch"
    assert select_loader("torch", folder) == "torch"
    with pytest.raises(DALIUnavailableError, match="generated in Python"):
        select_loader("dali", synthetic)
    with pytest.raises(ValueError, match="loader must be one of"):
        select_loader("pil", folder)


def test_forcing_dali_without_dali_names_the_package(monkeypatch, photo_dir, tmp_path, capsys):
    from dito_fast.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.startswith("nvidia") else real(name, *a, **k))
    with pytest.raises(DALIUnavailableError, match="pip install nvidia-dali-cuda130"):
        _loader("dali", str(photo_dir[0]))
    assert _loader("auto", str(photo_dir[0])).kind == "torch"
    rc = main(["train", "--preset", "dito-tiny", "--data", str(photo_dir[0]), "--loader", "dali", "--steps", "1",
               "--image-size", "32", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "nvidia-dali-cuda130" in err and "Traceback" not in err


def test_procedural_source_through_make_loader():
    cfg = DataConfig(source="synthetic", image_size=16, num_synthetic_images=6, memory_format="channels_last")
    batches = list(make_loader(cfg, batch_size=3, seed=1, num_steps=2))
    assert sorted(sum(_indices(batches), [])) == list(range(6))
    x = batches[0]["image"]
    assert x.shape == (3, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    assert (batches[0]["label"] == -1).all()
