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
    # overwrite=False: a file that appeared while the pack was written is kept
    (tmp_path / "taken.safetensors").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="written meanwhile by another process"):
        pack_latents(root, tmp_path / "taken.safetensors", overwrite=False)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"someone else's"
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
