"""Latent packs (dito_fast.data.latents, `dito-fast pack-latents`): a folder's latents in one
memory-mapped file, the same set as the folder, its refusals, and training on it."""

import json
import os
import struct
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dito_fast.cli import main
from dito_fast.data.latents import PACK_FORMAT, latent_classes, latent_shape, load_latents, pack_latents
from dito_fast.train.checkpoint import save_safetensors
from dito_fast.train.dit import resolve_dit_run_config, train_dit

TOK = {"model": "dito-x", "model_fingerprint": "aaaa"}


def _folder(root, n_per_class=4, classes=("b_dog", "a_cat"), shape=(2, 4, 4)):
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(sorted(classes)):
        for i in range(n_per_class):
            save_safetensors({"latent": k + 0.3 * torch.randn(1, *shape, generator=g)},
                             root / name / f"{i:02d}.safetensors", metadata=dict(TOK))
    return root


def test_a_pack_is_its_folder_memory_mapped(tmp_path):
    root = _folder(tmp_path / "lat")
    save_safetensors({"latent": torch.full((2, 2, 4, 4), 7.0)}, root / "a_cat" / "two.safetensors", metadata=dict(TOK))
    (root / "b_dog" / "broken.safetensors").write_bytes(b"not a safetensors file")
    (root / "b_dog" / "caf\u00e9 \u732b.safetensors").write_bytes(
        (root / "b_dog" / "00.safetensors").read_bytes())  # a non-ASCII name survives the pack
    if sys.platform.startswith("linux"):  # a name that is not UTF-8 (encode writes any name): read all the same
        (root / "b_dog" / os.fsdecode(b"x\xe9.safetensors")).write_bytes((root / "b_dog" / "01.safetensors").read_bytes())
    folder = load_latents(root, class_folders=True)
    packed = pack_latents(root, tmp_path / "lat.safetensors", class_folders=True)
    assert packed.skipped == folder.skipped == [("b_dog/broken.safetensors", folder.skipped[0][1])]
    pack = load_latents(tmp_path / "lat.safetensors", class_folders=True)
    n = 12 if sys.platform.startswith("linux") else 11
    assert len(pack) == len(folder) == n and pack.names == folder.names and pack.skipped == folder.skipped
    assert torch.equal(pack.latents, folder.latents) and torch.equal(pack.labels, folder.labels)
    assert pack.describe() == folder.describe() and pack.classes == ["a_cat", "b_dog"] and pack.tokenizer == TOK
    with safe_open(str(tmp_path / "lat.safetensors"), "pt") as h:
        meta = h.metadata()
    assert meta["format"] == PACK_FORMAT and json.loads(meta["classes"]) == pack.classes
    # the latents are mapped from the file, and a subset shares them; take() copies rows out
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as f:
            assert any(str(tmp_path / "lat.safetensors") in line for line in f)
    part = pack.subset([10, 0, 3])
    assert part.latents.data_ptr() == pack.latents.data_ptr() and len(part) == 3
    z, y = part.take(torch.tensor([0, 2]))
    assert torch.equal(z, folder.latents[[10, 3]]) and y.tolist() == folder.labels[[10, 3]].tolist()
    assert part.set_names() == [folder.names[i] for i in (10, 0, 3)]
    assert part.describe() == folder.subset([10, 0, 3]).describe()
    # without class folders: no labels, and the pack reads unconditionally too
    unconditional = pack_latents(root, tmp_path / "plain.safetensors")
    assert unconditional.labels is None and unconditional.classes == []
    assert load_latents(tmp_path / "lat.safetensors").labels is None  # labels kept, not used
    assert latent_shape(tmp_path / "plain.safetensors") == (2, 4, 4)
    assert latent_classes(tmp_path / "lat.safetensors", True) == ["a_cat", "b_dog"]


def test_what_is_not_a_usable_pack_is_refused_by_name(tmp_path):
    root = _folder(tmp_path / "lat")
    pack_latents(root, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="holds no labels .*packed without --class-folders"):
        load_latents(tmp_path / "plain.safetensors", class_folders=True)
    with pytest.raises(ValueError, match="is a latent file .*a folder of them is what --data takes"):
        load_latents(root / "a_cat" / "00.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a readable latent pack"):
        load_latents(tmp_path / "notes.txt")
    data = (tmp_path / "plain.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable latent pack"):
        load_latents(tmp_path / "cut.safetensors")
    tensors = load_file(str(tmp_path / "plain.safetensors"))
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as h:
        meta = h.metadata()
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={**meta, "version": "9"})
    with pytest.raises(ValueError, match="latent pack version '9'"):
        load_latents(tmp_path / "v9.safetensors")
    save_file({**tensors, "names": tensors["names"][:-3]}, str(tmp_path / "names.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="inconsistent latent pack"):
        load_latents(tmp_path / "names.safetensors")
    with pytest.raises(ValueError, match="would be inside the folder it packs"):
        pack_latents(root, root / "pack.safetensors")
    assert not (root / "pack.safetensors").exists()
    # the hint names a new file, never the file given (a model's weights, say)
    with pytest.raises(ValueError, match="pack-latents FOLDER --out latents.safetensors"):
        load_latents(root / "a_cat" / "00.safetensors")
    # a name safetensors cannot open is refused before the latents are streamed
    if sys.platform.startswith("linux"):
        bad = tmp_path / os.fsdecode(b"p\xe9.safetensors")
        with pytest.raises(ValueError, match="not valid UTF-8"):
            pack_latents(root, bad)
        assert not bad.exists()


def test_pack_latents_checks_out_before_reading_and_again_at_the_end(tmp_path, monkeypatch):
    """overwrite=False with ``out`` existing, or ``out`` a folder: refused before a latent is
    read; a file that appears at ``out`` while the pack is written is kept (FileExistsError)."""
    import dito_fast.data.latents as L

    root = _folder(tmp_path / "lat")
    read, calls = L._read, []

    def counted(path):
        calls.append(path)
        return read(path)

    monkeypatch.setattr(L, "_read", counted)
    (tmp_path / "taken.safetensors").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="taken.safetensors exists .overwrite=True replaces it"):
        pack_latents(root, tmp_path / "taken.safetensors", overwrite=False)
    (tmp_path / "adir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="adir.safetensors is a folder; a pack is one file"):
        pack_latents(root, tmp_path / "adir.safetensors")
    assert calls == []  # nothing read

    def appears(path):  # another process writes the name while the latents stream
        if not calls:
            (tmp_path / "late.safetensors").write_bytes(b"someone else's")
        return counted(path)

    monkeypatch.setattr(L, "_read", appears)
    with pytest.raises(FileExistsError, match="written meanwhile by another process"):
        pack_latents(root, tmp_path / "late.safetensors", overwrite=False)
    assert len(calls) == 8 and (tmp_path / "late.safetensors").read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_the_pack_header_is_exact_safetensors(tmp_path):
    """The header is written last into room reserved before the latents: its length field, JSON
    and space padding must make a file any safetensors reader takes, the data 8-byte aligned."""
    root = _folder(tmp_path / "lat", n_per_class=3)
    pack_latents(root, tmp_path / "p.safetensors", class_folders=True)
    raw = (tmp_path / "p.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0 and header["skipped"]["data_offsets"][1] == len(raw) - 8 - n
    tensors = load_file(str(tmp_path / "p.safetensors"))
    assert tensors["latents"].shape == (6, 2, 4, 4) and tensors["labels"].tolist() == [0, 0, 0, 1, 1, 1]


def _config(source, steps=6, **train):
    train = {"batch_size": 4, "log_every_steps": 1, "checkpoint_every_steps": 3, "val_images": 2,
             "val_every_steps": 3, "ema_decay": 0.9, "threads": 1, **train}
    return resolve_dit_run_config(None, None, {
        "model.name": "tiny-dit", "model.latent_channels": 2, "model.latent_size": 4, "model.patch_size": 2,
        "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.num_classes": 2,
        "model.time_freq_dim": 32, "data.source": str(source), "data.class_folders": True,
        "train.steps": steps, **{f"train.{k}": v for k, v in train.items()}})


def _weights(run):
    return load_file(str(run / "checkpoints" / "step_00000006" / "model.safetensors"))


def test_training_on_a_pack_is_training_on_its_folder(tmp_path, caplog):
    """The same weights bit for bit, held-out latents included; a run started on the folder
    resumes on its pack without a word about changed data, and ends as the uninterrupted run."""
    root = _folder(tmp_path / "lat", n_per_class=6)
    (root / "a_cat" / "bad.safetensors").write_bytes(b"")
    pack_latents(root, tmp_path / "lat.safetensors", class_folders=True)
    a = train_dit(_config(root), tmp_path / "folder", progress=False)
    b = train_dit(_config(tmp_path / "lat.safetensors"), tmp_path / "pack", progress=False)
    wa, wb = _weights(tmp_path / "folder"), _weights(tmp_path / "pack")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.losses == b.losses
    counts = [[r["skipped_files"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if "skipped_files" in r] for d in ("folder", "pack")]
    assert counts[0] == counts[1] == [1] * 6
    assert (tmp_path / "folder" / "model" / "latents.json").read_text() == \
        (tmp_path / "pack" / "model" / "latents.json").read_text()
    train_dit(_config(root, steps=3), tmp_path / "split", progress=False)
    caplog.clear()
    train_dit(_config(tmp_path / "lat.safetensors"), tmp_path / "split", resume=True, progress=False)
    assert "the latents in" not in caplog.text and "data.source" in caplog.text  # (a changed setting, said)
    ws = _weights(tmp_path / "split")
    assert all(torch.equal(wa[k], ws[k]) for k in wa)


def test_pack_latents_command(tmp_path, capsys):
    root = _folder(tmp_path / "lat")
    (root / "a_cat" / "bad.safetensors").write_bytes(b"")
    out = tmp_path / "lat.safetensors"
    assert main(["pack-latents", str(root), "--out", str(out), "--class-folders"]) == 1  # a file left out
    cap = capsys.readouterr()
    assert "8 latents of 2x4x4, 2 classes" in cap.out and "train-dit --data" in cap.out
    assert "skipped a_cat/bad.safetensors" in cap.err and "1 of 9 inputs could not be read" in cap.err
    assert main(["pack-latents", str(root), "--out", str(out)]) == 2
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    assert main(["pack-latents", str(root), "--out", str(tmp_path)]) == 2
    assert "is a folder; a pack is one file" in capsys.readouterr().err
    assert main(["pack-latents", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "latent folder not found" in capsys.readouterr().err
    (root / "a_cat" / "bad.safetensors").unlink()
    assert main(["pack-latents", str(root), "--out", str(out), "--overwrite", "--class-folders"]) == 0
    assert "8 latents" in capsys.readouterr().out
    argv = ["train-dit", "--data", str(out), "--preset", "DiT-S/2", "--steps", "1", "--batch-size", "2", "--set",
            "model.depth=1", "--set", "model.hidden_size=32", "--set", "model.num_heads=2", "--set",
            "train.val_images=0", "--out", str(tmp_path / "run")]
    assert main(argv + ["--class-folders", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["model"]["latent_channels"], resolved["model"]["latent_size"],
            resolved["model"]["num_classes"]) == (2, 4, 2)
    assert main(argv + ["--class-folders"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "model" / "latents.json").read_text())["classes"] == ["a_cat", "b_dog"]
    main(["pack-latents", str(root), "--out", str(tmp_path / "plain.safetensors")])
    argv[2] = str(tmp_path / "plain.safetensors")
    assert main(argv + ["--class-folders", "--out", str(tmp_path / "run2")]) == 2
    assert "holds no labels" in capsys.readouterr().err
    # a pack is no latent file to decode
    from dito_fast import DiTo
    DiTo.from_preset("dito-tiny").save_pretrained(tmp_path / "tok")
    assert main(["decode", str(tmp_path / "tok"), str(out), "--out", str(tmp_path / "dec")]) == 2
    assert "is a latent pack (train-dit's data), not latent files" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_while_reading_stops_the_read_and_counts_no_file(tmp_path, monkeypatch, sig):
    """torch turns a KeyboardInterrupt raised inside its tensor constructors into a ValueError;
    Ctrl-C (or SIGTERM, which the command line turns into a KeyboardInterrupt) during a file's
    read must stop the loop, not count that good file as unreadable."""
    import signal

    import dito_fast.data.latents as L

    def as_the_cli_does(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, as_the_cli_does)
    root = _folder(tmp_path / "lat")
    read, calls = L._read, []

    def interrupted_read(path):
        calls.append(path)
        if len(calls) == 3:
            try:  # the signal inside the read; what torch's C++ makes of the KeyboardInterrupt
                os.kill(os.getpid(), getattr(signal, sig))  # (handled at once in this, the main, thread)
                for _ in range(1000):
                    pass
            except KeyboardInterrupt:
                pass
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
        return read(path)

    monkeypatch.setattr(L, "_read", interrupted_read)
    try:
        with pytest.raises(KeyboardInterrupt):
            pack_latents(root, tmp_path / "p.safetensors", class_folders=True)
        assert len(calls) == 3 and not (tmp_path / "p.safetensors").exists()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        assert signal.getsignal(signal.SIGTERM) is as_the_cli_does
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_tensor_of_a_dtype_torch_cannot_read_makes_the_file_unreadable(tmp_path):
    """safetensors files may hold dtypes (F8_E8M0, F4) that torch has no type for: such a file is
    skipped and counted, not a stop of the whole read."""
    root = _folder(tmp_path / "lat")
    z = torch.zeros(1, 2, 4, 4)
    header = {"latent": {"dtype": "F32", "shape": [1, 2, 4, 4], "data_offsets": [0, 128]},
              "x": {"dtype": "F8_E8M0", "shape": [1], "data_offsets": [128, 129]}}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    (root / "a_cat" / "odd.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + z.numpy().tobytes() + b"\x7f")
    s = load_latents(root, class_folders=True)
    assert len(s) == 8 and [name for name, _ in s.skipped] == ["a_cat/odd.safetensors"]
    assert "dtype torch cannot read" in s.skipped[0][1]


def test_a_folder_of_files_holding_more_latents_than_the_first_loads_whole(tmp_path):
    """The folder is read into room sized by the first file's count: later files holding more
    latents make it grow; every latent, in file order, with its label and name."""
    g = torch.Generator().manual_seed(0)
    expected = []
    for i, count in enumerate([1, 3, 3, 2, 3]):
        z = torch.randn(count, 2, 4, 4, generator=g)
        save_safetensors({"latent": z}, tmp_path / "lat" / f"c{i % 2}" / f"{i}.safetensors", metadata=dict(TOK))
        expected.append((i % 2, z))
    s = load_latents(tmp_path / "lat", class_folders=True)
    order = sorted(range(5), key=lambda i: (i % 2, i))  # files sorted by path: c0/0, c0/2, c0/4, c1/1, c1/3
    assert torch.equal(s.latents, torch.cat([expected[i][1] for i in order]))
    assert s.labels.tolist() == [expected[i][0] for i in order for _ in range(expected[i][1].shape[0])]
    assert s.names == [f"c{i % 2}/{i}.safetensors" for i in order for _ in range(expected[i][1].shape[0])]


def test_symlinked_class_folders_are_followed_each_real_folder_once(tmp_path):
    """A set made of links to class folders (a subset of a big set) reads as the folders would;
    a link back up the tree or a second link to a folder read already adds nothing."""
    real = _folder(tmp_path / "real")
    root = tmp_path / "linked"
    (root / "a_cat").mkdir(parents=True)
    for f in (real / "a_cat").iterdir():
        (root / "a_cat" / f.name).write_bytes(f.read_bytes())
    (root / "b_dog").symlink_to(real / "b_dog", target_is_directory=True)
    (root / "b_dog_again").symlink_to(real / "b_dog", target_is_directory=True)  # (sorts after b_dog: not read)
    (root / "a_cat" / "up").symlink_to(root, target_is_directory=True)  # a cycle
    s = load_latents(root, class_folders=True)
    expected = load_latents(real, class_folders=True)
    assert s.classes == ["a_cat", "b_dog"] and s.names == expected.names and torch.equal(s.latents, expected.latents)
    assert latent_classes(root, True) == ["a_cat", "b_dog"]
    assert pack_latents(root, tmp_path / "p.safetensors", class_folders=True).describe() == expected.describe()


def test_a_file_without_a_latent_is_refused_from_its_header(tmp_path, monkeypatch):
    """A pack (or a model's weights) inside the folder is skipped, with its own reason for a pack,
    after reading its header alone; a latent of a dtype that is not a float is refused by name."""
    import builtins

    root = _folder(tmp_path / "data" / "train")
    pack_latents(root, tmp_path / "data" / "train.safetensors")  # data/train.safetensors next to data/train
    save_file({"latent": torch.zeros(1, 2, 4, 4, dtype=torch.float8_e4m3fn)}, str(root / "a_cat" / "f8.safetensors"))
    save_file({"latent": torch.zeros(1, 2, 4, 4, dtype=torch.int32)}, str(root / "a_cat" / "int.safetensors"))
    save_file({"latent": torch.zeros(1, 2, 4, 4, dtype=torch.float16)}, str(root / "a_cat" / "half.safetensors"))
    pack = str(tmp_path / "data" / "train.safetensors")
    opened, read_from_pack = builtins.open, []

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read_from_pack.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def spy(path, *args, **kwargs):
        f = opened(path, *args, **kwargs)
        return Counted(f) if os.fspath(path) == pack else f

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr("pathlib.Path.read_bytes", lambda self: pytest.fail(f"{self} read whole"))
    s = load_latents(tmp_path / "data")
    monkeypatch.undo()
    reasons = dict(s.skipped)
    assert reasons["train.safetensors"] == ("a latent pack (dito-fast pack-latents) inside the folder; give the pack "
                                            "itself as --data")
    header = struct.unpack("<Q", (tmp_path / "data" / "train.safetensors").read_bytes()[:8])[0]
    assert 0 < sum(read_from_pack) <= 8 + header  # the header, not the latents
    assert reasons["train/a_cat/f8.safetensors"] == ("latent of dtype float8_e4m3fn not supported; latents must be "
                                                     "float16/bfloat16/float32/float64")
    assert reasons["train/a_cat/int.safetensors"].startswith("latent of dtype int32 not supported")
    assert len(s) == 9 and len(s.skipped) == 3  # the float16 one read


def test_what_is_missing_unwritable_or_unopenable_is_said_by_name(tmp_path, monkeypatch):
    """A missing --data is "no such latent folder or pack" (it may be meant as either); a write
    error while packing names the pack and leaves nothing; a pack under a folder whose name is
    not UTF-8 is said to be that, not unreadable."""
    import errno

    for load in (load_latents, latent_shape, lambda p: latent_classes(p, True)):
        with pytest.raises(FileNotFoundError, match="no such latent folder or pack: .*latnets.safetensors"):
            load(tmp_path / "latnets.safetensors")
    root = _folder(tmp_path / "lat")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with pytest.raises(OSError, match=r"cannot write the pack .*out.safetensors \(No space left on device\)") as e:
            pack_latents(root, tmp_path / "out" / "out.safetensors")
    assert e.value.errno == errno.ENOSPC and os.listdir(tmp_path / "out") == []
    if sys.platform.startswith("linux"):
        pack_latents(root, tmp_path / "p.safetensors", class_folders=True)
        odd = tmp_path / os.fsdecode(b"dir\xe9")
        odd.mkdir()
        (odd / "p.safetensors").write_bytes((tmp_path / "p.safetensors").read_bytes())
        with pytest.raises(ValueError, match=r"dir\\xe9/p.safetensors: the path is not valid UTF-8, and safetensors "
                                             "cannot open such a path: rename the pack, or move it"):
            load_latents(odd / "p.safetensors", class_folders=True)


def test_a_pack_is_written_read_only_and_replaced_by_rename(tmp_path):
    """A run reads its pack while it trains: written over in place (cp), the latents would change
    under it or the process die of SIGBUS. The pack is read-only (cp over it fails for users
    other than root); --overwrite replaces it by a rename, which a run that has it open does not
    see."""
    root = _folder(tmp_path / "lat")
    out = tmp_path / "p.safetensors"
    pack_latents(root, out)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o444 & ~umask
    if os.geteuid() != 0:
        with pytest.raises(PermissionError):
            open(out, "r+b")
    running = load_latents(out)
    before = running.take(torch.arange(8))[0].clone()
    (root / "a_cat" / "00.safetensors").unlink()
    assert len(pack_latents(root, out, overwrite=True)) == 7
    assert os.stat(out).st_mode & 0o777 == 0o444 & ~umask
    assert torch.equal(running.take(torch.arange(8))[0], before) and len(load_latents(out)) == 7


def test_pack_latents_names_stale_temporary_files_and_fid_refuses_a_pack(tmp_path, capsys):
    root = _folder(tmp_path / "lat")
    out = tmp_path / "lat.safetensors"
    stale = tmp_path / ".lat.safetensors.k2j3h4g5.tmp"  # (what a killed pack-latents leaves)
    stale.write_bytes(b"\0" * 2**20)
    (tmp_path / ".other.safetensors.a1b2c3d4.tmp").write_bytes(b"")  # another pack's: not named
    assert main(["pack-latents", str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 temporary file(s) of an earlier pack-latents" in err
    assert ".lat.safetensors.k2j3h4g5.tmp (1.0 MiB)" in err and ".other" not in err
    assert stale.exists()  # named, not deleted (it may be a running pack-latents')
    assert main(["pack-latents", str(root), "--out", str(tmp_path / "clean.safetensors")]) == 0
    assert "temporary file" not in capsys.readouterr().err
    assert main(["fid", str(out), str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a latent pack (dito-fast pack-latents), not FID statistics or images" in err and "mu" not in err
