"""Training the downstream DiT on latents (dito_fast.train.dit, `dito-fast train-dit`): the latent
folder, the per-sample draws, the loader's order, exact resume, the refusals, torchrun, and the
command line from `encode` to `sample-dit` and `export`."""

import json
import os
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dito_fast import DiT
from dito_fast.cli import main
from dito_fast.train import train
from dito_fast.train.checkpoint import save_safetensors
from dito_fast.data.latents import load_latents, pack_latents
from dito_fast.train.dit import DiTRunConfig, LatentDataConfig, LatentLoader, resolve_dit_run_config, train_dit

from conftest import micro_run_config

TOK = {"model": "dito-x", "model_fingerprint": "aaaa"}


def _write(folder, name, z, meta=TOK):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({"latent": z}, path, metadata=dict(meta))
    return path


def _latent_folder(root, n_per_class=4, classes=("b_dog", "a_cat"), shape=(2, 4, 4), seed=0):
    """Latents in class folders; class k's latents are centred on k (the classes are learnable)."""
    g = torch.Generator().manual_seed(seed)
    for k, name in enumerate(sorted(classes)):
        for i in range(n_per_class):
            _write(root, f"{name}/{i:02d}.safetensors", k + 0.3 * torch.randn(1, *shape, generator=g))
    return root


def _config(source, class_folders=True, num_classes=2, steps=6, **train):
    train = {"batch_size": 4, "log_every_steps": 1, "checkpoint_every_steps": 3, "val_images": 0,
             "val_every_steps": 0, "ema_decay": 0.9, "threads": 1, **train}
    return resolve_dit_run_config(None, None, {
        "model.name": "tiny-dit", "model.latent_channels": 2, "model.latent_size": 4, "model.patch_size": 2,
        "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.num_classes": num_classes,
        "model.time_freq_dim": 32, "data.source": str(source), "data.class_folders": class_folders,
        "train.steps": steps, **{f"train.{k}": v for k, v in train.items()}})


def test_load_latents_labels_by_sorted_class_folder_and_skips_unreadable_files(tmp_path, caplog):
    root = _latent_folder(tmp_path / "lat")
    _write(root, "a_cat/two.safetensors", torch.zeros(2, 2, 4, 4))  # two latents in one file: two samples
    (root / "b_dog" / "broken.safetensors").write_bytes(b"not a safetensors file")
    _write(root, "b_dog/nan.safetensors", torch.full((1, 2, 4, 4), float("nan")))
    _write(root, "b_dog/nokey.safetensors", torch.zeros(1, 2, 4, 4)).rename(root / "b_dog" / "tmp")
    save_safetensors({"other": torch.zeros(1)}, root / "b_dog" / "nokey.safetensors")
    s = load_latents(root, class_folders=True)
    assert s.classes == ["a_cat", "b_dog"] and len(s) == 10
    assert sorted(f for f, _ in s.skipped) == ["b_dog/broken.safetensors", "b_dog/nan.safetensors",
                                               "b_dog/nokey.safetensors"]
    # each latent's label is its folder's index; the two-latent file gives two samples
    for z, y, name in zip(s.latents, s.labels.tolist(), s.names):
        assert name.startswith(s.classes[y])
        assert z.mean().item() == pytest.approx(0.0 if name == "a_cat/two.safetensors" else y, abs=0.5)
    assert s.names.count("a_cat/two.safetensors") == 2
    assert s.tokenizer == TOK and s.latents.dtype == torch.float32
    unconditional = load_latents(root)
    assert unconditional.labels is None and unconditional.classes == []


def test_load_latents_refuses_mixed_sets(tmp_path):
    root = _latent_folder(tmp_path / "shape")
    _write(root, "a_cat/big.safetensors", torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"big.safetensors: latent of shape \(2, 8, 8\).*one --size"):
        load_latents(root, True)
    root = _latent_folder(tmp_path / "tok")
    _write(root, "b_dog/other.safetensors", torch.zeros(1, 2, 4, 4), {"model": "dito-y", "model_fingerprint": "bbbb"})
    with pytest.raises(ValueError, match="two tokenizers.*dito-y"):
        load_latents(root, True)
    root = _latent_folder(tmp_path / "loose")
    _write(root, "top.safetensors", torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="every latent must be in one: .*top.safetensors is not"):
        load_latents(root, True)
    assert len(load_latents(root, False)) == 9
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors latents"):
        load_latents(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the 1 latent files"):
        load_latents(tmp_path / "bad")


def test_dit_loss_draws_per_sample_seed():
    """With seeds, sample i's draws come from its own seed: its loss is the same alone or in a
    batch, and the per-sample path differs from the batch generator's."""
    torch.manual_seed(0)
    dit = DiT.from_preset("DiT-S/2", latent_channels=2, latent_size=4, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3, time_freq_dim=32, class_dropout_prob=0.5)
    torch.nn.init.normal_(dit.final.linear.weight, std=0.1)  # adaLN-Zero starts at zero output
    z, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    together = dit.loss(z, y, seeds=[5, 6, 7])
    alone = torch.cat([dit.loss(z[i:i + 1], y[i:i + 1], seeds=[s]) for i, s in enumerate([5, 6, 7])])
    torch.testing.assert_close(together, alone)
    assert not torch.allclose(dit.loss(z, y, seeds=[5, 6, 8])[2], together[2])
    torch.testing.assert_close(dit.loss(z, y, seeds=[5, 6, 8])[:2], together[:2])
    with pytest.raises(ValueError, match="one seed per sample"):
        dit.loss(z, y, seeds=[1, 2])
    with pytest.raises(ValueError, match="and a generator"):
        dit.loss(z, y, generator=torch.Generator(), seeds=[1, 2, 3])


def test_latent_loader_splits_global_batches_across_ranks_and_resumes(tmp_path):
    s = load_latents(_latent_folder(tmp_path / "lat", n_per_class=5), True)
    whole = [b["latent"] for b in LatentLoader(s, 4, seed=3, num_steps=6)]
    ranks = [[b for b in LatentLoader(s, 4, seed=3, rank=r, world_size=2, num_steps=6)] for r in range(2)]
    for step in range(6):
        torch.testing.assert_close(torch.cat([ranks[0][step]["latent"], ranks[1][step]["latent"]]), whole[step],
                                   rtol=0, atol=0)
        for r in range(2):  # the labels travel with their latents
            means = ranks[r][step]["latent"].mean(dim=(1, 2, 3))
            assert (means - ranks[r][step]["label"]).abs().max() < 0.5
    resumed = [b["latent"] for b in LatentLoader(s, 4, seed=3, start_step=4, num_steps=2)]
    torch.testing.assert_close(torch.stack(resumed), torch.stack(whole[4:]), rtol=0, atol=0)
    seen = torch.cat(whole[:2] + [whole[2][:2]])  # the first 10 samples: one epoch, each latent once
    assert len({tuple(v.flatten().tolist()) for v in seen}) == 10


def _weights(path):
    return load_file(str(path))


def test_train_dit_learns_writes_its_files_and_resumes_exactly(tmp_path):
    root = _latent_folder(tmp_path / "lat")
    cfg = _config(root, steps=6, val_images=2, val_every_steps=3)
    straight = train_dit(cfg, tmp_path / "straight", progress=False)
    assert straight.step == 6 and not straight.skipped_steps
    run = tmp_path / "straight"
    described = json.loads((run / "checkpoints" / "step_00000003" / "latents.json").read_text())
    assert {k: described[k] for k in ("classes", "tokenizer", "latent_shape", "num_latents")} == {
        "classes": ["a_cat", "b_dog"], "tokenizer": TOK, "latent_shape": [2, 4, 4], "num_latents": 7}  # 1 held out (n // 5)
    assert json.loads((run / "model" / "latents.json").read_text()) == described
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert isinstance(DiT.from_pretrained(run / "model"), DiT)

    # stopped at step 3 and resumed: the same weights as the uninterrupted run, bit for bit
    train_dit(_config(root, steps=3, val_images=2, val_every_steps=3), tmp_path / "split", progress=False)
    train_dit(cfg, tmp_path / "split", resume=True, progress=False)
    a = _weights(run / "checkpoints" / "step_00000006" / "model.safetensors")
    b = _weights(tmp_path / "split" / "checkpoints" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x_embed.weight"], _weights(run / "checkpoints" / "step_00000003" /
                                                         "model.safetensors")["x_embed.weight"])


def test_train_dit_fits_labelled_latents(tmp_path):
    """A tiny DiT on 8 latents of two classes: the flow-matching loss falls well below its start."""
    cfg = _config(_latent_folder(tmp_path / "lat", n_per_class=4), steps=80, lr=3e-3, checkpoint_every_steps=0,
                  ema_decay=0.0, warmup_steps=5)
    losses = [v for _, v in train_dit(cfg, tmp_path / "run", progress=False).losses]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_train_dit_refuses_data_the_model_does_not_match(tmp_path):
    root = _latent_folder(tmp_path / "lat")
    with pytest.raises(ValueError, match=r"the latents are \(2, 4, 4\).*latent_size=8"):
        cfg = _config(root)
        cfg.model.latent_size = 8
        train_dit(cfg, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="the data has 2 classes.*num_classes=3"):
        train_dit(_config(root, num_classes=3), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="the data has 0 classes.*num_classes=2"):
        train_dit(_config(root, class_folders=False), tmp_path / "c", progress=False)
    assert not any((tmp_path / d / "config.json").exists() for d in "abc")
    # a resumed run whose class folders were renamed: as many classes, but label 0 would now be
    # "b_dog", which the run learnt as label 1; also from its checkpoint into another folder
    train_dit(_config(root, steps=3), tmp_path / "run", progress=False)
    (root / "a_cat").rename(root / "c_cow")
    with pytest.raises(ValueError, match="trained on latents with other classes"):
        train_dit(_config(root, steps=6), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ValueError, match="step_00000003 was trained on latents with other classes"):
        train_dit(_config(root, steps=6), tmp_path / "elsewhere", progress=False,
                  resume=str(tmp_path / "run" / "checkpoints" / "step_00000003"))
    (root / "c_cow").rename(root / "a_cat")
    # another tokenizer's latents (as many, the same shape): refused
    for f in sorted(root.rglob("*.safetensors")):
        _write(root, str(f.relative_to(root)), load_file(str(f))["latent"], {"model": "dito-y", "model_fingerprint": "b"})
    with pytest.raises(ValueError, match="other tokenizer"):
        train_dit(_config(root, steps=6), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ValueError, match="data.source must name a folder"):
        train_dit(DiTRunConfig(data=LatentDataConfig()), tmp_path / "d")


def test_a_resume_warns_when_files_were_added(tmp_path, caplog):
    root = _latent_folder(tmp_path / "lat")
    train_dit(_config(root, steps=3), tmp_path / "run", progress=False)
    caplog.clear()
    train_dit(_config(root, steps=4), tmp_path / "run", resume=True, progress=False)
    assert "the latents in" not in caplog.text
    _write(root, "a_cat/new.safetensors", torch.zeros(1, 2, 4, 4))
    train_dit(_config(root, steps=5), tmp_path / "run", resume=True, progress=False)
    assert "the latents in" in caplog.text and "8 -> 9 training latents" in caplog.text


@pytest.mark.slow
def test_train_dit_under_torchrun_follows_one_process(tmp_path):
    """2 ranks (gloo, CPU, DDP) with global batch 4: the same weights as one process, up to float
    summation order."""
    from dito_fast.testing import run_process_tree

    root = _latent_folder(tmp_path / "lat")
    argv = ["train-dit", "--data", str(root), "--class-folders", "--steps", "4", "--batch-size", "4", "--threads", "1",
            "--set", "model.depth=1", "--set", "model.hidden_size=32", "--set", "model.num_heads=2",
            "--set", "model.time_freq_dim=32", "--set", "train.val_images=0", "--set", "train.ema_decay=0.9",
            "--set", "train.checkpoint_every_steps=0", "--preset", "DiT-S/2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = run_process_tree([sys.executable, "-m", "dito_fast.cli", *argv, "--out", str(tmp_path / "one")],
                           timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_process_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "dito_fast.cli", *argv, "--out", str(tmp_path / "two")], timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 4 steps") == 1
    a, b = (_weights(tmp_path / d / "checkpoints" / "step_00000004" / "model.safetensors") for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "model" / "latents.json").read_text())["classes"] == ["a_cat", "b_dog"]


def test_ranks_that_loaded_different_latents_all_refuse(tmp_path, monkeypatch):
    """Under torchrun each rank reads data.source itself: every rank's description of its set is
    all-gathered, and where they differ (or a rank could not load it) every rank raises, naming
    the ranks and what differs; alike, the run goes on."""
    from dito_fast.train.dit import DiTTask

    root = _latent_folder(tmp_path / "lat")
    others: list = []  # what the other ranks (1, 2) send
    gathered: list = []

    def all_gather_object(out, obj):
        gathered.append(obj)
        out[:] = [obj, *others]

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    cfg = _config(root, val_images=2)
    train, val = DiTTask().datasets(cfg, None)  # (alike: nothing said)
    assert (len(train), len(val)) == (7, 1) and len(gathered) == 1
    others[:] = [{**gathered[0], "num_latents": 8, "files_digest": "0" * 16}, dict(gathered[0])]
    with pytest.raises(ValueError, match=r"the ranks loaded different latent sets from data.source .*lat: ranks 0, 2: "
                                         r"7 latents .*; rank 1: 8 latents \(files digest 0000000000000000\), 1 held "
                                         r"out, shape \(2, 4, 4\), 2 classes \(differ from rank 0 in num_latents, "
                                         r"files_digest\)"):
        DiTTask().datasets(cfg, None)
    others[:] = [{"error": "FileNotFoundError: no such latent folder or pack: lat"}, dict(gathered[0])]
    with pytest.raises(ValueError, match="rank 1 could not load the latents of data.source .*no such latent folder"):
        DiTTask().datasets(cfg, None)
    # this rank cannot load them: the others are told (not left waiting), its own error raised
    gathered.clear()
    with pytest.raises(FileNotFoundError, match="no such latent folder or pack"):
        DiTTask().datasets(_config(tmp_path / "nowhere"), None)
    assert gathered == [{"error": f"FileNotFoundError: no such latent folder or pack: {tmp_path / 'nowhere'}"}]


@pytest.mark.slow
def test_ranks_that_loaded_different_latents_stop_under_torchrun(tmp_path):
    """2 gloo ranks whose latent sets differ by one file (as when a node's copy of the folder has
    one more; here each rank is handed its set): the run stops before a step, with the message,
    rather than training each rank on another set."""
    from dito_fast.testing import run_process_tree

    _latent_folder(tmp_path / "lat")
    shutil.copytree(tmp_path / "lat", tmp_path / "lat2")
    shutil.copy(tmp_path / "lat2" / "a_cat" / "00.safetensors", tmp_path / "lat2" / "a_cat" / "09.safetensors")
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from dito_fast.data.latents import load_latents\n"
        "from dito_fast.train.dit import resolve_dit_run_config, train_dit\n"
        "rank = int(os.environ['RANK'])\n"
        "cfg = resolve_dit_run_config('DiT-S/2', None, {'data.source': sys.argv[1], 'data.class_folders': True,\n"
        "    'model.hidden_size': 32, 'model.depth': 1, 'model.num_heads': 2, 'model.latent_channels': 2,\n"
        "    'model.latent_size': 4, 'model.num_classes': 2, 'train.steps': 2, 'train.batch_size': 4,\n"
        "    'train.device': 'cpu', 'train.threads': 1, 'train.val_images': 0})\n"
        "train_dit(cfg, sys.argv[3], latents=load_latents(sys.argv[1 + rank], True), progress=False)\n"
        "print(f'rank {rank} trained')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_process_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path / "lat"), str(tmp_path / "lat2"), str(tmp_path / "run")],
                            timeout=300, env=env)
    assert proc.returncode not in (0, -9), proc.stderr[-3000:]
    assert "trained" not in proc.stdout
    assert "the ranks loaded different latent sets" in proc.stderr and "rank 1: 9 latents" in proc.stderr, \
        proc.stderr[-3000:]
    assert not (tmp_path / "run" / "config.json").exists()


def test_commands_from_encode_to_sample_dit(tmp_path, micro_model, capsys):
    """encode (class folders of images) -> train-dit -> sample-dit, export; sample-dit refuses a
    tokenizer other than the one the latents came from."""
    from dito_fast.eval.report import save_image

    micro_model.save_pretrained(tmp_path / "tok")
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(["cat", "dog"]):
        for i in range(3):
            save_image(torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, tmp_path / "img" / name / f"{i}.png")
    assert main(["encode", str(tmp_path / "tok"), str(tmp_path / "img"), "--out", str(tmp_path / "lat")]) == 0
    assert capsys.readouterr().out.count(" -> ") == 6
    # a corrupt file that sorts first, and a folder named like a latent: skipped, not fatal
    (tmp_path / "lat" / "cat" / "0.safetensors").write_bytes(b"")
    (tmp_path / "lat" / "dog" / "00.safetensors").mkdir()
    argv = ["train-dit", "--data", str(tmp_path / "lat"), "--class-folders", "--preset", "DiT-S/2", "--steps", "2",
            "--batch-size", "2", "--set", "model.depth=1", "--set", "model.hidden_size=32", "--set",
            "model.num_heads=2", "--set", "train.val_images=0", "--out", str(tmp_path / "run")]
    assert main(argv + ["--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    c, h = micro_model.latent_channels, 16 // micro_model.downsample_factor
    assert (resolved["model"]["latent_channels"], resolved["model"]["latent_size"],
            resolved["model"]["num_classes"]) == (c, h, 2)
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_files"] == 1
    sample = ["sample-dit", str(tmp_path / "run" / "model"), "--tokenizer", str(tmp_path / "tok"), "--per-class", "1",
              "--steps", "2", "--decode-steps", "2", "--no-progress"]
    assert main(sample + ["--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == ["000000.png", "000001.png"]
    # classes by their folder names (latents.json), or by index
    assert main(sample + ["--out", str(tmp_path / "s_dog"), "--classes", "dog"]) == 0
    assert json.loads((tmp_path / "s_dog" / "samples.json").read_text())["labels"] == [1]
    assert main(sample + ["--out", str(tmp_path / "s_emu"), "--classes", "emu"]) == 2
    assert "'emu' is neither a class index nor one of the model's class names (cat, dog)" in capsys.readouterr().err
    torch.manual_seed(1)
    other = type(micro_model)(micro_model.config)
    other.save_pretrained(tmp_path / "tok2")
    sample[3] = str(tmp_path / "tok2")
    assert main(sample + ["--out", str(tmp_path / "s2")]) == 2
    assert "trained on the latents of another tokenizer" in capsys.readouterr().err
    assert main(sample + ["--out", str(tmp_path / "s2"), "--any-tokenizer"]) == 0
    # with its tokenizer, a run's validations also write decoded samples; another tokenizer is refused
    with_tok = argv[:-1] + [str(tmp_path / "run_v"), "--set", "train.val_images=2", "--set", "train.val_every_steps=1",
                            "--set", "train.val_sample_steps=2", "--steps", "1"]
    assert main(with_tok + ["--tokenizer", str(tmp_path / "tok2")]) == 2
    assert "is not the model the latents came from" in capsys.readouterr().err
    assert main(with_tok + ["--tokenizer", str(tmp_path / "tok")]) == 0
    grid = Image.open(tmp_path / "run_v" / "samples" / "dit_00000001.png")
    assert grid.width > 8 * 16 and grid.height >= 16  # 8 decoded 16x16 samples in a row
    # export: a DiT checkpoint gives a DiT's folder, with its latents.json
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    exported = DiT.from_pretrained(tmp_path / "exp")
    ema = _weights(tmp_path / "run" / "checkpoints" / "step_00000002" / "ema.safetensors")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in ema.items())
    assert (tmp_path / "exp" / "latents.json").read_text() == (tmp_path / "run" / "model" / "latents.json").read_text()
    # a checkpoint copied out of its run keeps its latents.json; a tokenizer's model exported over
    # the folder does not leave the DiT's behind
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_00000002", tmp_path / "copied")
    assert main(["export", str(tmp_path / "copied"), "--out", str(tmp_path / "exp2")]) == 0
    assert (tmp_path / "exp2" / "latents.json").is_file()
    train(micro_run_config(steps=1), tmp_path / "tokrun", progress=False)
    assert main(["export", str(tmp_path / "tokrun"), "--out", str(tmp_path / "exp"), "--overwrite"]) == 0
    assert not (tmp_path / "exp" / "latents.json").exists()
    # resuming takes the run's settings, class folders included
    assert main(["train-dit", "--out", str(tmp_path / "run"), "--resume", "--steps", "3"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert main(["train-dit", "--out", str(tmp_path / "new")]) == 2
    assert "data.source must name a folder" in capsys.readouterr().err


def test_the_held_out_latents_never_take_a_class_out_of_training(tmp_path, caplog):
    root = tmp_path / "lat"
    _write(root, "a_rare/0.safetensors", torch.zeros(1, 2, 4, 4))  # index 0: evenly spaced picks it first
    for i in range(9):
        _write(root, f"b_common/{i}.safetensors", torch.ones(1, 2, 4, 4))
    (root / "c_broken").mkdir()
    (root / "c_broken" / "0.safetensors").write_bytes(b"garbage")
    cfg = _config(root, num_classes=3, steps=1, val_images=2)
    result = train_dit(cfg, tmp_path / "run", progress=False)
    assert result.step == 1
    trained = load_latents(root, True)
    assert "a_rare" in trained.classes and "1 class folders have no readable latents (c_broken)" in caplog.text
    described = json.loads((tmp_path / "run" / "model" / "latents.json").read_text())
    assert described["num_latents"] == 9  # 10 readable, 1 held out: a b_common one, a_rare kept for training


def test_a_files_latents_are_held_out_together(tmp_path):
    """encode --flip writes an image's and its mirror image's latents into one file: validation
    must not hold out one of them while training on the other."""
    from dito_fast.train.dit import _held_out

    root = tmp_path / "lat"
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(["a_cat", "b_dog"]):
        for i in range(10):
            _write(root, f"{name}/{i:02d}.safetensors", k + 0.3 * torch.randn(2, 2, 4, 4, generator=g))
    s = load_latents(root, True)
    held = _held_out(s, 4)
    assert len(held) == 8 and all(i ^ 1 in held for i in held)  # 4 whole files of 2 latents
    assert {s.names[i] for i in held} == {"a_cat/00.safetensors", "a_cat/06.safetensors", "b_dog/03.safetensors",
                                         "b_dog/09.safetensors"}  # evenly spaced over the 20 files
    assert len(_held_out(s, 100)) == 8  # at most a fifth of the files


def test_resume_names_what_it_was_given_instead_of_a_checkpoint(tmp_path, capsys, monkeypatch):
    """--resume PATH given a missing path, a file (a pack, say) or an exported model: said so,
    not a complaint about data.source or the config file's sections."""
    root = _latent_folder(tmp_path / "lat")
    pack_latents(root, tmp_path / "lat.safetensors", class_folders=True)
    train_dit(_config(root, steps=1), tmp_path / "run", progress=False)
    for given, said in ((tmp_path / "nowhere", "no such checkpoint directory"),
                        (tmp_path / "lat.safetensors", "is a file, not a checkpoint directory"),
                        (tmp_path / "run" / "model", "is an exported model, not a training checkpoint")):
        for command in ("train-dit", "train"):
            assert main([command, "--resume", str(given), "--out", str(tmp_path / "x"), "--steps", "2"]) == 2
            assert said in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a torchrun restart resumes from the job's newest checkpoint: the one named may be pruned
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    main(["train-dit", "--resume", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--steps", "2"])
    assert "no such checkpoint directory" not in capsys.readouterr().err


def test_resuming_a_checkpoint_without_latents_json_warns(tmp_path, caplog):
    root = _latent_folder(tmp_path / "lat")
    train_dit(_config(root, steps=3), tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoints" / "step_00000003" / "latents.json").unlink()
    train_dit(_config(root, steps=4), tmp_path / "run", resume=True, progress=False)
    assert "holds no latents.json" in caplog.text


def test_the_commands_tell_a_dit_from_a_tokenizer(tmp_path, micro_model, capsys):
    from dito_fast import DiTo

    root = _latent_folder(tmp_path / "lat")
    micro_model.save_pretrained(tmp_path / "tok")
    train_dit(_config(root, steps=1), tmp_path / "dit", progress=False)
    with pytest.raises(ValueError, match="a DiTo tokenizer's folder .*not a DiT's"):
        DiT.from_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="a DiT's folder .*not a DiTo tokenizer's"):
        DiTo.from_pretrained(tmp_path / "dit" / "model")
    train(micro_run_config(steps=1), tmp_path / "tokrun", progress=False)
    assert main(["train-dit", "--data", str(root), "--out", str(tmp_path / "tokrun")]) == 2
    assert "holds a tokenizer run (dito-fast train)" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "dit"), "--resume"]) == 2
    assert "holds a DiT run (dito-fast train-dit)" in capsys.readouterr().err
    # resuming a class-conditional run without its class folders: said in terms of the data
    assert main(["train-dit", "--out", str(tmp_path / "dit"), "--resume", "--set", "data.class_folders=false",
                 "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "the latents in" in err and "with 0 classes, but the model to resume takes 2x4x4 with 2" in err
    # sample-dit writes only into an empty folder or its own
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "photo.png").write_bytes(b"x")
    assert main(["sample-dit", str(tmp_path / "dit" / "model"), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "reference"), "--per-class", "1", "--any-tokenizer"]) == 2
    assert "holds other files (photo.png)" in capsys.readouterr().err


def test_info_lists_the_dit_presets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "DiT-XL/2" in out and "674.82M" in out and "32.86M" in out  # the README's counts


def test_train_dit_review_cases(tmp_path, micro_model, capsys, caplog):
    """--resume starting a new run; class folder names that are numbers; a run folder of the other
    kind; a moved data.tokenizer; --tokenizer without held-out latents; odd --classes values;
    sample-dit's 7-digit image names."""
    root = tmp_path / "lat"
    for k in (0, 1, 10):
        for i in range(2):
            _write(root, f"{k}/{i}.safetensors", k + torch.zeros(1, 2, 4, 4))
    tiny = ["--set", "model.depth=1", "--set", "model.hidden_size=32", "--set", "model.num_heads=2",
            "--set", "model.time_freq_dim=32", "--set", "train.val_images=0", "--steps", "1", "--batch-size", "2"]
    # --resume on an empty --out with the model named starts the run (job scripts pass --resume always)
    assert main(["train-dit", "--data", str(root), "--class-folders", "--preset", "DiT-S/2", "--resume",
                 "--out", str(tmp_path / "dit"), *tiny]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    # the classes sort as strings ("0", "1", "10"): --classes 10 is folder "10" (label 2), not label 10
    from dito_fast.cli import _class_list

    assert _class_list("10,0,1", ["0", "1", "10"]) == [2, 0, 1]
    assert _class_list("2", ["0", "1", "10"]) == [2] and _class_list("cat", ["cat"]) == [0]
    from dito_fast.cli import UsageError

    for bad in ("--1", "\u00b2"):
        with pytest.raises(UsageError, match="neither a class index nor one of the model's class names"):
            _class_list(bad, ["0", "1", "10"])
    # a DiT run where a tokenizer is expected: said so
    assert main(["decode", str(tmp_path / "dit"), str(root / "0" / "0.safetensors"), "--out", str(tmp_path / "d")]) == 2
    assert "a DiT's folder" in capsys.readouterr().err
    # data.tokenizer that is not there (moved since): named as such
    micro_model.save_pretrained(tmp_path / "tok")
    assert main(["train-dit", "--data", str(root), "--class-folders", "--preset", "DiT-S/2", "--tokenizer",
                 str(tmp_path / "gone"), "--out", str(tmp_path / "dit2"), *tiny]) == 2
    assert "data.tokenizer (--tokenizer" in capsys.readouterr().err
    assert main(["train-dit", "--data", str(root), "--class-folders", "--preset", "DiT-S/2", "--tokenizer",
                 str(tmp_path / "tok"), "--out", str(tmp_path / "dit2"), *tiny]) == 2
    assert "is not the model the latents came from (dito-x, aaaa)" in capsys.readouterr().err
    # sample-dit: a 7-digit image name (k >= 10^6) is one of its own, not a foreign file (the run
    # then stops at the models' mismatch: 2-channel DiT, 4-channel tokenizer)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "1000000.png").write_bytes(b"")
    assert main(["sample-dit", str(tmp_path / "dit" / "model"), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "s"), "--per-class", "1", "--any-tokenizer"]) == 2
    err = capsys.readouterr().err
    assert "holds other files" not in err and "2-channel latents" in err


def test_a_tokenizer_without_held_out_latents_is_warned_of(tmp_path, caplog):
    root = tmp_path / "lat"
    for k, name in enumerate(("a", "b")):
        for i in range(4):
            _write(root, f"{name}/{i}.safetensors", k + torch.zeros(1, 4, 2, 2), meta={})  # no fingerprint
    from dito_fast import DiTo

    torch.manual_seed(0)
    DiTo.from_preset("dito-tiny").save_pretrained(tmp_path / "tok")
    cfg = _config(root, steps=1, val_images=0)
    cfg.model.latent_channels, cfg.model.latent_size, cfg.data.tokenizer = 4, 2, str(tmp_path / "tok")
    train_dit(cfg, tmp_path / "run", progress=False)
    assert "no sample images will be written" in caplog.text and not (tmp_path / "run" / "samples").exists()
