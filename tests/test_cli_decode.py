"""Tests for ``dito-fast decode``: the fast_decode options on the command line, progress output,
and clear errors (one line, exit code 2) for bad options."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dito_fast.cli import main
from dito_fast.decode import fast_decode

from conftest import cli_usage_error as _usage_error


@pytest.fixture
def model_dir(micro_model, tmp_path):
    micro_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _png(path):
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)


def test_decode_options_match_fast_decode(micro_model, model_dir, tmp_path, capsys, monkeypatch):
    z = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    save_file({"latent": z}, str(tmp_path / "lat.safetensors"))
    out = tmp_path / "out"
    argv = ["decode", str(model_dir), str(tmp_path / "lat.safetensors"), "--out", str(out), "--sampler", "ab2",
            "--steps", "3", "--schedule", "shifted:0.5", "--seed", "5", "--max-batch", "1", "--tile", "32",
            "--tile-overlap", "16", "--channels-last", "on", "--dtype", "bfloat16", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "lat_0.png" in captured.out and "lat_1.png" in captured.out
    assert captured.err == ""  # no progress bars into a redirected log (5 KB of them for 9 tiny latents)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # on a terminal: the bar (tqdm, on stderr)
    assert main([*argv, "--overwrite"]) == 0
    assert "decode" in capsys.readouterr().err
    ref = fast_decode(micro_model, z, sampler="ab2", steps=3, schedule="shifted:0.5", seed=5, max_batch=1, tile=32,
                      tile_overlap=16, channels_last=True, dtype=torch.bfloat16)
    for i in range(2):
        assert (_png(out / f"lat_{i}.png").int() - ref[i].int()).abs().max() <= 1


def test_decode_default_is_auto_without_progress(micro_model, model_dir, tmp_path, capsys):
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    save_file({"latent": z}, str(tmp_path / "a.safetensors"))
    assert main(["decode", str(model_dir), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    auto = "cuda" if torch.cuda.is_available() else "cpu"  # what --device auto picks
    model = copy.deepcopy(micro_model).to(auto)
    assert torch.equal(_png(tmp_path / "o" / "a.png"), fast_decode(model, z.to(auto), seed=0)[0])


@pytest.mark.parametrize("args, msg", [
    (["--tile", "36"], "tile must be a positive multiple of 8"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--schedule", "cosine"], "unknown schedule 'cosine'"),
    (["--cuda-graph", "on", "--device", "cpu"], "cuda_graph=True needs a CUDA device"),
])
def test_decode_bad_options_one_line(model_dir, tmp_path, capsys, args, msg):
    save_file({"latent": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "a.safetensors"))
    assert main(["decode", str(model_dir), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "o"),
                 "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    # a setting's error names no file; a tile that does not fit names the first file of that size
    assert err.startswith("error: ") and msg in err
    assert ("a.safetensors" in err) == (msg.startswith("tile") or "cuda" in msg), err


def test_decode_bad_latent_names_the_file(model_dir, tmp_path, capsys):
    save_file({"latent": torch.zeros(1, 3, 2, 2)}, str(tmp_path / "three.safetensors"))
    assert main(["decode", str(model_dir), str(tmp_path / "three.safetensors"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "three.safetensors" in err and "shape (B, 4, h, w)" in err


def test_decode_unknown_sampler_is_argparse_error(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["decode", str(model_dir), "x.safetensors", "--out", str(tmp_path), "--sampler", "ddim"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_decode_checks_every_file_before_decoding(model_dir, tmp_path, capsys):
    # a.safetensors (2 latents) writes a_0.png and a_1.png, as a_0.safetensors (1 latent) writes
    # a_0.png: the run had overwritten one with the other and exited 0. A missing or unreadable
    # file after a good one had stopped the run after writing the good file's images.
    lat, out = tmp_path / "lat", tmp_path / "o"
    lat.mkdir()
    save_file({"latent": torch.zeros(2, 4, 2, 2)}, str(lat / "a.safetensors"))
    save_file({"latent": torch.zeros(1, 4, 2, 2)}, str(lat / "a_0.safetensors"))
    _usage_error(capsys, "would both be written to", ["decode", str(model_dir), str(lat), "--out", str(out), "--steps", "1", "--no-progress"])
    for bad, msg in ((tmp_path / "ghost.safetensors", "latent file not found"),
                     (tmp_path / "junk.safetensors", "cannot read latent file")):
        if "junk" in bad.name:
            bad.write_bytes(b"\x10" + bytes(40))
        _usage_error(capsys, msg, ["decode", str(model_dir), str(lat / "a.safetensors"), str(bad), "--out", str(out), "--steps", "1",
                  "--no-progress"])
    assert not out.exists()
    assert main(["decode", str(model_dir), str(lat / "a.safetensors"), "--out", str(out), "--steps", "1",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_0.png", "a_1.png"]


def test_decode_mirrors_the_folders_encode_writes(model_dir, tmp_path):
    # encode mirrors an input folder's subfolders; decode had read the top level only (class
    # folders gave "no .safetensors latent files given", nested ones were skipped silently)
    lat, out = tmp_path / "lat", tmp_path / "o"
    for rel in ("a", "cat/0", "dog/0"):
        (lat / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({"latent": torch.zeros(1, 4, 2, 2)}, str(lat / f"{rel}.safetensors"))
    assert main(["decode", str(model_dir), str(lat), "--out", str(out), "--steps", "1", "--no-progress"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a.png", "cat/0.png", "dog/0.png"]
