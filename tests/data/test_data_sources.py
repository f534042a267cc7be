"""Tests for dito_fast/data/sources.py and sampler.py: resolving sources, labels, tar indexing,
screening unreadable files, and the rank-aware step order."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import torch
from PIL import Image

from data_helpers import CLASSES, corrupt_middle, random_bytes, write_shards
from dito_fast.config import DataConfig
from dito_fast.data import (DALI_FORMATS, DatasetSource, FileSource, StepBatchSampler, TarSource, check_source,
                            eval_shard, expand_braces, parse_file_list, rank_slice, resolve_source)


# ---------------------------------------------------------------- resolving sources

def test_folder_source_labels_from_class_subfolders(photo_dir, tmp_path):
    root, files = photo_dir
    src = resolve_source(str(root))
    assert isinstance(src, FileSource) and len(src) == len(files) == 12
    assert src.files == [f for f, _ in files]  # sorted, absolute
    assert src.labels.tolist() == [label for _, label in files]
    assert src.classes == CLASSES
    # an image directly in the root has no class: label -1
    flat = tmp_path / "flat"
    (flat / "cls").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "top.png")
    Image.new("RGB", (8, 8)).save(flat / "cls" / "x.png")
    src = resolve_source(str(flat))
    assert [os.path.basename(f) for f in src.files] == ["x.png", "top.png"]
    assert src.labels.tolist() == [0, -1] and src.classes == ["cls"]
    # hidden files and folders are not data: a trash folder had become class 0, a notebook's
    # checkpoint copies samples, macOS's "._x.png" files unreadable ones
    for hidden in (flat / ".Trash-1000" / "y.png", flat / "cls" / ".ipynb_checkpoints" / "z.png"):
        hidden.parent.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(hidden)
    (flat / "cls" / "._x.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    src = resolve_source(str(flat))
    assert [os.path.basename(f) for f in src.files] == ["x.png", "top.png"] and src.classes == ["cls"]


def test_file_list_formats(photo_dir, tmp_path):
    root, files = photo_dir
    spaced = tmp_path / "with space.png"
    Image.new("RGB", (8, 8)).save(spaced)
    lines = ["# a comment", "", f"{files[0][0]}\t7", f"{os.path.relpath(files[1][0], tmp_path)} 3",
             files[2][0], "with space.png", "with space.png\t-1", "  with space.png   12  "]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    src = resolve_source(str(tmp_path / "list.txt"))
    assert isinstance(src, FileSource)
    assert src.files == [files[0][0], files[1][0], files[2][0]] + [str(spaced)] * 3
    assert src.labels.tolist() == [7, 3, -1, -1, -1, 12]
    assert parse_file_list(str(tmp_path / "list.txt"))[1] == src.labels.tolist()
    (tmp_path / "bad.txt").write_text(f"{files[0][0]}\tcat\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: label 'cat'"):
        resolve_source(str(tmp_path / "bad.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="names no image file"):
        resolve_source(str(tmp_path / "empty.txt"))
    # a byte order mark (Windows editors write one) is not part of the first path
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + f"{files[0][0]}\t7\n{files[1][0]}\n".encode())
    src = resolve_source(str(tmp_path / "bom.txt"))
    assert src.files == [files[0][0], files[1][0]] and src.labels.tolist() == [7, -1]


def test_tar_members_in_hidden_folders_are_not_data(tmp_path):
    """As in folders: a member in a hidden folder (.ipynb_checkpoints/a.png) or with a hidden name
    (._c.png) is no sample."""
    import io
    import tarfile

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as t:
        for name in (".ipynb_checkpoints/a.png", "b.png", "._c.png", "d/.git/e.png", "d/f.png"):
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            t.addfile(info, io.BytesIO(buf.getvalue()))
    assert resolve_source(str(tmp_path / "s.tar")).members == ["b.png", "d/f.png"]


@pytest.mark.parametrize("name", ["photos [2023]", "set{a,b}", "what?", "all*"])
def test_folders_named_like_patterns_are_folders(tmp_path, name):
    """A folder whose name holds glob or brace characters is read as the folder it is (it had
    been taken for a tar-shard pattern: "matches no file", or "set{a,b}" expanded)."""
    folder = tmp_path / name
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    src = resolve_source(str(folder))
    assert isinstance(src, FileSource) and src.files == [str(folder / "x.png")]


def test_tar_source_brace_and_glob(photo_dir, tar_pattern):
    _, files = photo_dir
    src = resolve_source(tar_pattern)
    assert isinstance(src, TarSource) and len(src) == 12 and len(src.shards) == 2
    # shard 0 holds samples 0, 2, 4, ...; shard 1 holds 1, 3, 5, ...
    order = [k for s in range(2) for k in range(12) if k % 2 == s]
    assert src.labels.tolist() == [files[k][1] for k in order]
    assert src.members[0] == "sample000.jpg" or src.members[0].startswith("sample000.")
    for i, k in enumerate(order):  # bytes read back by offset are the original files
        assert src.read_bytes(i) == open(files[k][0], "rb").read()
    glob_src = resolve_source(os.path.join(os.path.dirname(tar_pattern), "*.tar"))
    assert glob_src.shards == src.shards and glob_src.labels.tolist() == src.labels.tolist()
    single = resolve_source(src.shards[1])
    assert len(single) == 6 and single.labels.tolist() == src.labels.tolist()[6:]


def test_tar_without_images_or_compressed(tmp_path):
    with tarfile.open(tmp_path / "meta.tar", "w") as tf:
        info = tarfile.TarInfo("a.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match="no image samples"):
        resolve_source(str(tmp_path / "meta.tar"))
    with tarfile.open(tmp_path / "z.tar", "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("empty.jpg"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        resolve_source(str(tmp_path / "z.tar"))


def test_procedural_sources_and_errors(tmp_path):
    src = resolve_source("synthetic", image_size=16, num_synthetic=5)
    assert isinstance(src, DatasetSource) and len(src) == 5 and (src.labels == -1).all()
    assert src.item(2, 0).shape == (3, 16, 16)
    cfg_src = resolve_source(DataConfig(source="builtin", image_size=16, num_synthetic_images=3))
    assert isinstance(cfg_src, DatasetSource) and len(cfg_src) >= 3
    with pytest.raises(FileNotFoundError, match="unknown data source"):
        resolve_source(str(tmp_path / "nothing_here"))
    with pytest.raises(FileNotFoundError, match=r"4 shard\(s\) not found"):
        resolve_source(str(tmp_path / "s-{00..03}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_source(str(tmp_path / "*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="'files' is empty"):
        check_source(FileSource([]))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="must name .tar shards"):
        resolve_source(str(tmp_path / "*.txt"))


class _Items(torch.utils.data.Dataset):
    """n items made by fn(i); records the epochs set_epoch received."""

    def __init__(self, fn, n=4):
        self.fn, self.n, self.epochs = fn, n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.fn(i)

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


@pytest.mark.parametrize("item,error,match", [
    (lambda i: torch.zeros(3, 24, 24), ValueError, r"got shape \(3, 24, 24\)"),  # a valid multiple, wrong size
    (lambda i: torch.zeros(16, 16, 3), ValueError, r"got shape \(16, 16, 3\)"),  # channels last
    (lambda i: torch.full((3, 16, 16), 200.0), ValueError, r"values in \[200, 200\]"),  # 0..255 floats
    (lambda i: torch.full((3, 16, 16), float("nan")), ValueError, "NaN"),
    (lambda i: torch.zeros(3, 16, 16, dtype=torch.uint8), TypeError, "dtype torch.uint8"),
    (lambda i: Image.new("RGB", (16, 16)), TypeError, "got Image"),
])
def test_dataset_items_are_checked(item, error, match):
    # items of a user Dataset had reached the batches unchecked (a wrong size trained at that size)
    src = DatasetSource(_Items(item), description="mine")
    with pytest.raises(error, match=r"mine\[2\]: .*" + match):
        src.item(2, 0, size=16)
    good = DatasetSource(_Items(lambda i: (torch.rand(3, 16, 16, dtype=torch.float64) * 2 - 1, 5)))
    x = good.item(1, 0, size=16)
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16)


def test_wrapper_subclasses_keep_their_own_getitem():
    # a Subset subclass that transforms its items is read through its __getitem__, and set_epoch
    # still reaches the dataset it wraps
    class Negated(torch.utils.data.Subset):
        def __getitem__(self, i):
            return -super().__getitem__(i)

        def __getitems__(self, indices):  # torch asks for it beside __getitem__
            return [self[i] for i in indices]

    inner = _Items(lambda i: torch.full((3, 4, 4), 0.25))
    src = DatasetSource(Negated(inner, [0, 1]))
    assert src.item(1, 4, size=4).max() == -0.25 and inner.epochs == [4]


def test_loader_checks_dataset_items():
    from dito_fast.data import make_loader

    ds = _Items(lambda i: torch.zeros(3, 24, 24))
    loader = make_loader(DataConfig(source="x", image_size=16), batch_size=2, source=ds, loader="torch", num_steps=1,
                         device="cpu")
    with pytest.raises(ValueError, match=r"got shape \(3, 24, 24\)"):
        next(iter(loader))


def test_dataset_pairs_keep_their_labels():
    """(image, class) items, as torchvision's datasets give, keep their class in the batches'
    "label" (it had been -1 for every item); an item with no integer second element has -1."""
    from dito_fast.data import make_loader

    ds = _Items(lambda i: (torch.zeros(3, 16, 16), [7, torch.tensor(3), "cat", 2.5][i % 4]))
    loader = make_loader(DataConfig(source="x", image_size=16), batch_size=4, source=ds, loader="torch", num_steps=1,
                         device="cpu", train=False)
    batch = next(iter(loader))
    assert dict(zip(batch["index"].tolist(), batch["label"].tolist())) == {0: 7, 1: 3, 2: -1, 3: -1}


def test_set_epoch_reaches_wrapped_datasets():
    # ConcatDataset and nested Subsets had kept their datasets at epoch 0
    a, b = _Items(lambda i: torch.zeros(3, 4, 4)), _Items(lambda i: torch.full((3, 4, 4), 0.5))
    wrapped = torch.utils.data.Subset(torch.utils.data.Subset(torch.utils.data.ConcatDataset([a, b]), range(8)), [1, 6])
    src = DatasetSource(wrapped)
    assert src.item(0, 3, size=4).max() == 0 and a.epochs == [3] and b.epochs == []  # item 1 of a
    assert src.item(1, 5, size=4).min() == 0.5 and b.epochs == [5]  # item 2 of b


def test_worker_processes_read_items_of_their_own_epochs(photo_dir):
    # The epoch of the package's datasets is shared with worker processes (set_epoch reaches
    # persistent workers); the loaders pass each item's epoch instead of setting it, so workers
    # reading items of different epochs at once cannot change each other's crops.
    from dito_fast.data import ImageFolderDataset, make_loader

    ds = ImageFolderDataset(photo_dir[0], 16, train=True, seed=0)
    runs = [list(make_loader(DataConfig(source="x", image_size=16, workers=w), batch_size=5, source=ds,
                             loader="torch", num_steps=6, device="cpu")) for w in (0, 2)]
    for b0, b2 in zip(*runs):
        assert torch.equal(b0["index"], b2["index"]) and torch.equal(b0["image"], b2["image"])


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{3..1}") == ["x3", "x2", "x1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("d/{9..11}") == ["d/9", "d/10", "d/11"]


def test_tar_epoch_order_is_shard_blocked(tmp_path, photo_dir):
    _, files = photo_dir
    src = resolve_source(write_shards(tmp_path, files, num_shards=3))
    for epoch in range(3):
        perm = src.epoch_order(seed=4, epoch=epoch)
        assert sorted(perm.tolist()) == list(range(12))
        shards = src.shard[perm.numpy()].tolist()
        assert sum(a != b for a, b in zip(shards, shards[1:])) == 2  # three blocks, one per shard
    assert not torch.equal(src.epoch_order(4, 0), src.epoch_order(4, 1))
    assert torch.equal(src.epoch_order(4, 1), src.epoch_order(4, 1))


# ---------------------------------------------------------------- screening

def test_check_source_skips_unreadable_files(photo_dir, tmp_path):
    root, files = photo_dir
    good = open(files[1][0], "rb").read()  # a PNG
    jpeg = open(files[0][0], "rb").read()
    bad = {
        "garbage.jpg": random_bytes(3000),
        "text.png": b"not an image at all",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": good[: len(good) // 2],
        "animated.gif": None,
    }
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, data in bad.items():
        if data is None:
            Image.new("RGB", (40, 40), (9, 9, 9)).save(folder / name)
        else:
            (folder / name).write_bytes(data)
    (folder / "ok.png").write_bytes(good)
    (folder / "ok.jpg").write_bytes(jpeg)
    src = resolve_source(str(folder))
    assert len(src) == 7
    checked = check_source(src, "header", formats=DALI_FORMATS)
    assert [os.path.basename(f) for f in checked.files] == ["ok.jpg", "ok.png"]
    reasons = {os.path.basename(n): r for n, r in checked.skipped}
    assert set(reasons) == set(bad)
    assert "GIF" in reasons["animated.gif"] and "truncated JPEG" in reasons["truncated.jpg"]
    assert "truncated PNG" in reasons["truncated.png"]
    assert check_source(src, "header", formats=DALI_FORMATS) is checked  # cached
    assert check_source(checked.subset([1]), "header", formats=DALI_FORMATS).skipped == checked.skipped
    # any format allowed: the GIF stays
    assert len(check_source(src, "header")) == 3
    # pixel data corrupted behind an intact header and end marker: only a full decode sees it
    (folder / "middle.png").write_bytes(corrupt_middle(good))
    src = resolve_source(str(folder))
    assert "middle.png" in [os.path.basename(f) for f in check_source(src, "header", DALI_FORMATS).files]
    assert "middle.png" not in [os.path.basename(f) for f in check_source(src, "decode", DALI_FORMATS).files]
    assert check_source(src, "none") is src


def test_header_check_keeps_images_followed_by_other_data(photo_dir, tmp_path):
    # A phone's motion photo appends a video after the JPEG's end marker: not truncated. The
    # header check decodes a file whose marker is not in its last 4 KiB to tell the two apart.
    _, files = photo_dir
    jpeg, png = open(files[0][0], "rb").read(), open(files[1][0], "rb").read()
    d = tmp_path / "trailing"
    d.mkdir()
    (d / "motion.jpg").write_bytes(jpeg + random_bytes(20000, seed=3))
    (d / "padded.png").write_bytes(png + bytes(8192))
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) - 300])
    checked = check_source(resolve_source(str(d)), "header", DALI_FORMATS)
    assert [os.path.basename(f) for f in checked.files] == ["motion.jpg", "padded.png"]
    assert [(os.path.basename(n), r[:40]) for n, r in checked.skipped] == [
        ("truncated.jpg", "truncated JPEG (no end-of-image marker; ")]


def test_tar_source_keeps_a_bounded_set_of_shards_open(tmp_path, photo_dir, monkeypatch):
    # One descriptor per shard had run a process out of descriptors on large datasets ("Too many
    # open files", then whole shards skipped as unreadable): the least recently used idle shard
    # closes beyond MAX_OPEN_SHARDS, never one a reader is using.
    from dito_fast.data import sources

    monkeypatch.setattr(sources, "MAX_OPEN_SHARDS", 3)
    _, files = photo_dir
    src = resolve_source(write_shards(tmp_path, files, num_shards=6))
    first = {i: src.read_bytes(i) for i in range(len(src))}
    assert len(src._fds) <= 3
    member = src.open(0)  # pins its shard while open
    pinned = src._fds[int(src.shard[0])]
    for i in range(len(src)):  # every other shard opens and closes around it
        assert src.read_bytes(i) == first[i]
    assert src._fds.get(int(src.shard[0])) is pinned and pinned[1] == 1
    member.seek(0)
    assert member.read() == first[0]
    src.close()  # a pinned file closes when its reader is done
    os.fstat(pinned[0])
    member.close()
    with pytest.raises(OSError):
        os.fstat(pinned[0])
    assert src.read_bytes(5) == first[5] and check_source(src, "header") is src


def test_check_tar_members_and_all_bad(tmp_path, photo_dir):
    _, files = photo_dir
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(random_bytes(500))
    pattern = write_shards(tmp_path / "t", [files[0], (str(fake), 1), files[1]], num_shards=1)
    src = resolve_source(pattern)
    checked = check_source(src, "header", DALI_FORMATS, threads=1)
    assert len(checked) == 2 and checked.labels.tolist() == [files[0][1], files[1][1]]
    assert checked.skipped[0][0].endswith("sample001.jpg")
    for name in ("x.jpg", "y.png"):
        (tmp_path / "allbad" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "allbad" / name).write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="none of the 2 files"):
        check_source(resolve_source(str(tmp_path / "allbad")), "header")


def test_check_source_threaded_matches_serial(tmp_path, photo_dir):
    _, files = photo_dir
    items = [files[k % 12] for k in range(70)] + [(str(tmp_path / "bad.png"), 0)]
    (tmp_path / "bad.png").write_bytes(b"junk")
    (tmp_path / "list.txt").write_text("\n".join(f for f, _ in items))
    a = check_source(resolve_source(str(tmp_path / "list.txt")), "header", threads=1)
    b = check_source(resolve_source(str(tmp_path / "list.txt")), "header", threads=4)
    assert a.files == b.files and len(a) == 70 and a.skipped == b.skipped


# ---------------------------------------------------------------- step order

def test_step_sampler_ranks_split_each_global_batch():
    n, B, W = 10, 2, 3
    whole = list(StepBatchSampler(n, B * W, seed=5, num_steps=7))
    ranks = [list(StepBatchSampler(n, B, seed=5, num_steps=7, rank=r, world_size=W)) for r in range(W)]
    for k in range(7):
        assert sum((ranks[r][k] for r in range(W)), []) == whole[k]
    # every epoch is visited exactly once over all ranks
    flat = [key for batch in whole for key in batch]
    for epoch in range(4):
        assert sorted(i for i, e in flat if e == epoch) == list(range(n))
    # resume on each rank
    for r in range(W):
        assert list(StepBatchSampler(n, B, seed=5, start_step=4, num_steps=3, rank=r, world_size=W)) == ranks[r][4:]
    with pytest.raises(ValueError, match="rank"):
        StepBatchSampler(n, B, seed=0, rank=3, world_size=3)


def test_step_sampler_uneven_shares_of_a_global_batch():
    # G = 7 over W = 3 ranks: shares of 2, 2, 3 samples (rank_slice), together each global batch
    n, G, W = 10, 7, 3
    whole = list(StepBatchSampler(n, G, seed=2, num_steps=5))
    shares = [rank_slice(G, r, W) for r in range(W)]
    assert shares == [(0, 2), (2, 4), (4, 7)]
    ranks = [list(StepBatchSampler(n, hi - lo, seed=2, num_steps=5, rank=r, world_size=W, global_batch_size=G))
             for r, (lo, hi) in enumerate(shares)]
    for k in range(5):
        assert sum((ranks[r][k] for r in range(W)), []) == whole[k]
    assert list(StepBatchSampler(n, 3, seed=2, start_step=3, num_steps=2, rank=2, world_size=W,
                                 global_batch_size=G)) == ranks[2][3:]
    with pytest.raises(ValueError, match="share of a global batch of 7 is 2 samples"):
        StepBatchSampler(n, 3, seed=0, rank=0, world_size=W, global_batch_size=G)
    with pytest.raises(ValueError, match="smaller than world_size"):
        rank_slice(2, 0, 3)


def test_eval_shard_is_disjoint_and_covering():
    for n in (0, 1, 5, 12, 13):
        for W in (1, 2, 3, 4):
            parts = [list(eval_shard(n, r, W)) for r in range(W)]
            assert sum(parts, []) == list(range(n))
