"""Tests for dito_fast/data: ImageFolderDataset, SyntheticImages, bundled photographs, make_dataset."""

import io
import itertools
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dito_fast.data.builtin as builtin
from dito_fast.data import (COLOR_PHOTOGRAPHS, HOLDOUT_PHOTOGRAPHS, ImageFolderDataset,
                            ImageTransform, MixedDataset, PhotoCrops, SyntheticImages,
                            builtin_split, bundled_photographs, list_image_files, load_image,
                            make_dataset, resize_shorter_side)

SIZE = 32


def _check_image(x, size=SIZE):
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert x.shape == (3, size, size)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage")
    found = bundled_photographs(["astronaut", "chelsea", "coffee", "rocket"])
    # Small copies keep the folder tests fast.
    return [(name, resize_shorter_side(img, 60)) for name, img in found]


@pytest.fixture
def photo_folder(tmp_path, photos):
    """4 real images (JPEG/PNG, nested, upper-case extensions), a corrupt and a truncated JPEG."""
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "other").mkdir()
    (name0, img0), (name1, img1), (name2, img2), (name3, img3) = photos
    img0.save(root / "a_astronaut.jpg", quality=90)
    img1.save(root / "sub" / "b_chelsea.png")
    img2.save(root / "sub" / "deeper" / "c_coffee.JPG", format="JPEG", quality=90)
    img3.save(root / "other" / "d_rocket.PNG", format="PNG")
    (root / "b_bad.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    buf = io.BytesIO()
    img0.save(buf, format="JPEG", quality=90)
    (root / "sub" / "truncated.jpeg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "readme.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------- ImageFolderDataset

def test_folder_lists_recursively_sorted_case_insensitive(photo_folder):
    ds = ImageFolderDataset(photo_folder, SIZE)
    names = [p[len(str(photo_folder)) + 1:].replace("\\", "/") for p in ds.files]
    assert names == ["a_astronaut.jpg", "b_bad.jpg", "other/d_rocket.PNG",
                     "sub/b_chelsea.png", "sub/deeper/c_coffee.JPG", "sub/truncated.jpeg"]
    assert len(ds) == 6
    only_png = ImageFolderDataset(photo_folder, SIZE, extensions=["PNG"])
    assert [p.rsplit("/", 1)[-1] for p in only_png.files] == ["d_rocket.PNG", "b_chelsea.png"]


def test_folder_skips_corrupt_and_truncated_files(photo_folder, caplog):
    ds = ImageFolderDataset(photo_folder, SIZE, train=False)
    with caplog.at_level(logging.WARNING, logger="dito_fast.data.folder"):
        items = [ds[i] for i in range(len(ds))]
    for x in items:
        _check_image(x)
    assert ds.num_skipped == 2
    assert "b_bad.jpg" in caplog.text and "truncated.jpeg" in caplog.text
    # A bad index returns the next readable image (eval: no randomness, so exactly equal).
    assert torch.equal(items[1], items[2])  # b_bad.jpg -> other/d_rocket.PNG
    assert torch.equal(items[5], items[0])  # sub/truncated.jpeg wraps around to a_astronaut.jpg
    assert not torch.equal(items[0], items[2])
    ds[1], ds[5]  # bad files are remembered, not retried
    assert ds.num_skipped == 2


def test_folder_eval_is_center_crop_of_the_file(photo_folder):
    ds = ImageFolderDataset(photo_folder, SIZE, train=False)
    assert ds.transform.crop == "center" and not ds.transform.hflip
    expected = ImageTransform(SIZE)(load_image(ds.files[3]))
    assert torch.equal(ds[3], expected)


def test_folder_train_randomness_is_seeded_per_epoch_and_index(photo_folder):
    ds = ImageFolderDataset(photo_folder, SIZE, train=True, seed=5)
    assert ds.transform.crop == "random" and ds.transform.hflip
    again = ImageFolderDataset(photo_folder, SIZE, train=True, seed=5)
    good = [0, 2, 3, 4]
    first = [ds[i] for i in good]
    assert all(torch.equal(a, again[i]) for a, i in zip(first, good))
    ds.set_epoch(1)
    second = [ds[i] for i in good]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    other_seed = ImageFolderDataset(photo_folder, SIZE, train=True, seed=6)
    assert any(not torch.equal(a, other_seed[i]) for a, i in zip(first, good))
    assert not ImageFolderDataset(photo_folder, SIZE, train=True, hflip=False).transform.hflip


def test_folder_all_corrupt_raises(tmp_path):
    for name in ("x.jpg", "y.png"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 50)
    ds = ImageFolderDataset(tmp_path, SIZE)
    with pytest.raises(RuntimeError, match="none of the 2 image files"):
        ds[0]


def test_symlinked_folders_are_followed_once(tmp_path):
    # a link back up the tree ("latest -> .") had listed every image ~40 times, until the path was too long
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a.png")
    Image.new("RGB", (8, 8)).save(root / "sub" / "b.png")
    (root / "self").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "c.png")
    (root / "linked").symlink_to(other)  # a folder outside the tree, reached through a link
    (root / "dangling").symlink_to(tmp_path / "gone")
    names = [os.path.relpath(f, root) for f in list_image_files(root)]
    assert names == ["a.png", os.path.join("linked", "c.png"), os.path.join("sub", "b.png")]
    # a link to a folder inside the tree whose name sorts first: the folder keeps its own name
    # (the link had been walked first, renaming the class and dropping the real folder)
    (root / "0_alias_of_sub").symlink_to("sub")
    names = [os.path.relpath(f, root) for f in list_image_files(root)]
    assert names == ["a.png", os.path.join("linked", "c.png"), os.path.join("sub", "b.png")]


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataset(missing, SIZE)
    empty = tmp_path / "empty_dir"
    (empty / "nested").mkdir(parents=True)
    (empty / "nested" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="empty_dir") as info:
        ImageFolderDataset(empty, SIZE)
    assert ".jpg" in str(info.value)
    assert list_image_files(empty) == []
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        list_image_files(missing)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolderDataset(a_file, SIZE)


def test_folder_works_in_dataloader(photo_folder):
    ds = ImageFolderDataset(photo_folder, SIZE, train=False)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch.shape == (3, 3, SIZE, SIZE)


# ---------------------------------------------------------------- SyntheticImages

def test_synthetic_deterministic_distinct_and_in_range():
    ds = SyntheticImages(16, SIZE, seed=3)
    assert len(ds) == 16
    items = [ds[i] for i in range(16)]
    for x in items:
        _check_image(x)
        assert x.std() > 0.05  # not a constant image
    twin = SyntheticImages(16, SIZE, seed=3)
    assert all(torch.equal(items[i], twin[i]) for i in (0, 7, 15))
    assert torch.equal(items[-1], ds[-1])
    for i in range(15):
        assert (items[i] - items[i + 1]).abs().mean() > 0.02
    other = SyntheticImages(16, SIZE, seed=4)
    assert all(not torch.equal(items[i], other[i]) for i in range(4))
    means = torch.stack([x.mean(dim=(1, 2)) for x in items])
    assert means.std(dim=0).min() > 0.05  # colours vary between images


def test_synthetic_has_sharp_edges_and_smooth_regions():
    ds = SyntheticImages(24, 64, seed=0)
    strong_edges, smooth, max_steps = 0, 0, []
    for i in range(len(ds)):
        x = ds[i]
        dx = (x[:, :, 1:] - x[:, :, :-1]).abs().amax(0)
        dy = (x[:, 1:, :] - x[:, :-1, :]).abs().amax(0)
        step = torch.maximum(dx[:-1, :], dy[:, :-1])
        max_steps.append(float(step.max()))
        strong_edges += int((step > 0.3).float().mean() > 0.002)
        smooth += int((step < 0.02).float().mean() > 0.1)  # flat or gently varying areas
    assert strong_edges >= 20
    assert smooth >= 12  # the rest are textured or grainy
    assert np.median(max_steps) > 0.5


def test_synthetic_render_matches_item_and_bounds():
    ds = SyntheticImages(3, SIZE)
    img = ds.render(1)
    assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    torch.testing.assert_close(ImageTransform(SIZE)(img), ds[1], rtol=0, atol=0)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError):
        SyntheticImages(3, SIZE, seed=-1)


def test_synthetic_pickles_and_matches_in_worker_processes():
    ds = SyntheticImages(8, SIZE, seed=1)
    ds[0]  # fill the font cache before pickling / forking
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5], ds[5])
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    batches = torch.cat(list(loader))
    assert torch.equal(batches, torch.stack([ds[i] for i in range(8)]))


# ---------------------------------------------------------------- bundled photographs

def test_bundled_photographs_are_rgb_photos():
    pytest.importorskip("skimage")
    found = bundled_photographs()
    assert len(found) >= 5
    for name, img in found:
        assert name in COLOR_PHOTOGRAPHS
        assert img.mode == "RGB" and min(img.size) >= 256
        arr = np.asarray(img, dtype=np.float32)
        assert arr.std() > 10  # real content
        # Colour photographs: the channels are not all equal.
        assert np.abs(arr[..., 0] - arr[..., 2]).mean() > 3
    grey = bundled_photographs(["camera"])
    assert grey[0][0] == "camera" and grey[0][1].mode == "RGB"
    arr = np.asarray(grey[0][1])
    assert np.array_equal(arr[..., 0], arr[..., 1])
    with pytest.raises(ValueError, match="lena"):
        bundled_photographs(["lena"])


def test_bundled_photographs_without_skimage(monkeypatch, caplog):
    monkeypatch.setattr(builtin, "skimage_data_dir", lambda: None)
    with caplog.at_level(logging.INFO, logger="dito_fast.data.builtin"):
        assert bundled_photographs() == []
    assert "scikit-image" in caplog.text
    ds = make_dataset("builtin", SIZE, num_synthetic=5)
    assert len(ds) == 5


def test_photo_crops_train(photos):
    ds = PhotoCrops(photos, SIZE, num_crops=12, seed=2, train=True)
    assert len(ds) == 12
    first = [ds[i] for i in range(12)]
    for x in first:
        _check_image(x)
    assert torch.equal(first[3], PhotoCrops(photos, SIZE, 12, seed=2, train=True)[3])
    assert len({tuple(x.flatten()[:50].tolist()) for x in first}) == 12
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]) for i, a in enumerate(first))
    with pytest.raises(IndexError):
        ds[12]


def test_photo_crops_eval(photos):
    # One crop per photograph: the center crop of the whole photograph.
    ds = PhotoCrops(photos, SIZE, num_crops=len(photos), train=False)
    for i, (_, img) in enumerate(photos):
        expected = ImageTransform(SIZE)(img)
        assert (ds[i] - expected).abs().mean() < 0.03
    # Several crops per photograph: deterministic, different positions of the same photograph.
    ds = PhotoCrops([p[1] for p in photos], SIZE, num_crops=4 * len(photos), train=False)
    n = len(photos)
    crops_of_first = [ds[n * k] for k in range(4)]
    assert torch.equal(crops_of_first[1], PhotoCrops(photos, SIZE, 4 * n, train=False)[n])
    assert all(not torch.equal(crops_of_first[0], c) for c in crops_of_first[1:])
    with pytest.raises(ValueError):
        PhotoCrops([], SIZE, 4)


# ---------------------------------------------------------------- make_dataset

def test_make_dataset_dispatch(photo_folder):
    ds = make_dataset("synthetic", SIZE, num_synthetic=7, seed=1)
    assert isinstance(ds, SyntheticImages) and len(ds) == 7 and ds.seed == 1
    folder = make_dataset(str(photo_folder), SIZE, train=False, seed=4)
    assert isinstance(folder, ImageFolderDataset) and folder.seed == 4
    assert folder.transform.crop == "center"
    assert make_dataset(photo_folder, SIZE).transform.crop == "random"


def test_make_dataset_builtin():
    pytest.importorskip("skimage")
    ds = make_dataset("builtin", SIZE, num_synthetic=6, train=False)
    assert isinstance(ds, MixedDataset) and len(ds) == 12
    _check_image(ds[0])
    _check_image(ds[11])
    photo_part = ds.datasets[1]
    assert isinstance(photo_part, PhotoCrops) and not photo_part.train
    ds.set_epoch(3)
    assert photo_part.epoch == 3


def test_make_dataset_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="imagenet_typo"):
        make_dataset("imagenet_typo", SIZE)
    a_file = tmp_path / "list.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="list.txt"):
        make_dataset(str(a_file), SIZE)


def test_folder_reads_every_listed_format(tmp_path, photos):
    from PIL import features
    img = photos[0][1]
    formats = {"x.bmp": "BMP", "x.gif": "GIF", "x.tif": "TIFF", "x.TIFF": "TIFF", "x.jpeg": "JPEG"}
    if features.check("webp"):
        formats["x.webp"] = "WEBP"
    for name, fmt in formats.items():
        img.save(tmp_path / name, format=fmt)
    ds = ImageFolderDataset(tmp_path, SIZE, train=False)
    assert len(ds) == len(formats)
    for i in range(len(ds)):
        _check_image(ds[i])
    assert ds.num_skipped == 0


def test_builtin_split_holds_out_whole_photographs():
    pytest.importorskip("skimage")
    train, val = builtin_split(SIZE, num_synthetic=6, seed=0, val_seed=9, num_val=5)
    assert len(train) == 12 and len(val) == 5
    train_photos, val_photos = train.datasets[1], val.datasets[0]
    assert train_photos.train and not val_photos.train and len(val_photos) == 2
    assert len(train_photos.photos) + len(HOLDOUT_PHOTOGRAPHS) == len(bundled_photographs())
    assert sorted(val_photos.names) == sorted(HOLDOUT_PHOTOGRAPHS)
    assert not set(train_photos.names) & set(HOLDOUT_PHOTOGRAPHS)
    val_items = torch.stack([val[i] for i in range(5)])
    assert torch.equal(val_items, torch.stack([val[i] for i in range(5)]))
    assert torch.equal(val_items[2], SyntheticImages(3, SIZE, seed=9)[0])
    train.set_epoch(2)
    assert train_photos.epoch == 2


@pytest.mark.skipif(not bundled_photographs(), reason="scikit-image's photographs are not installed")
def test_builtin_source_follows_data_hflip():
    """data.hflip=false reaches the builtin source's photo crops (it had been hard-coded on):
    each crop equals the unflipped transform of its draw."""
    from dito_fast.config import resolve_run_config
    from dito_fast.data.transforms import make_generator, resize_shorter_side
    from dito_fast.train.trainer import build_datasets

    from dito_fast.data import make_loader

    flips = {}
    for (hflip, via) in itertools.product((True, False), ("trainer", "make_loader")):
        cfg = resolve_run_config("dito-tiny", None, {"data.source": "builtin", "data.hflip": hflip,
                                                     "data.num_synthetic_images": 20})
        if via == "trainer":
            crops = build_datasets(cfg)[0].datasets[1]
        else:  # the public loader had hard-coded the flips on for this source
            crops = make_loader(cfg, num_steps=1, loader="torch").source.dataset.datasets[1]
        plain = ImageTransform(crops.size, crop="random", hflip=False)
        flips[hflip, via] = 0
        for i in range(len(crops)):
            g = make_generator(crops.seed, crops.epoch, i)
            shorter = int(torch.randint(crops.size, 2 * crops.size + 1, (), generator=g))
            ref = plain(resize_shorter_side(crops.photos[i % len(crops.photos)], shorter), generator=g)
            flips[hflip, via] += not torch.equal(crops[i], ref)
    for via in ("trainer", "make_loader"):
        assert flips[False, via] == 0 and flips[True, via] > 0


def test_set_epoch_reaches_persistent_workers(photo_dir):
    """A plain DataLoader with persistent workers: set_epoch in the main process had not reached
    the workers, which repeated epoch 0's crops and flips every epoch."""
    ds = ImageFolderDataset(photo_dir[0], 16, train=True, seed=0)
    expected = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        expected.append(torch.stack([ds[i] for i in range(len(ds))]))
    assert not torch.equal(expected[0], expected[1])
    loader = DataLoader(ds, batch_size=len(ds), num_workers=2, persistent_workers=True)
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        assert torch.equal(next(iter(loader)), expected[epoch])


@pytest.mark.parametrize("size", [4, 5])
def test_synthetic_images_at_the_smallest_sizes(size):
    """Sizes 4 and 5 (the documented minimum is 4) had failed for about half the items (a stripe
    period drawn from an empty range)."""
    ds = SyntheticImages(200, size, seed=0)
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, size, size) and x.min() >= -1 and x.max() <= 1
