"""`dito-fast sample-dit`: images from a DiT and its tokenizer, resumable, reproducible per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_usage_error
from dito_fast.cli import main
from dito_fast.decode import fast_decode
from dito_fast.models.dit import DiT


@pytest.fixture
def pair(tmp_path, micro_model):
    """(DiT dir, tokenizer dir, DiT): a micro tokenizer and a tiny class-conditional DiT on its
    latents, the DiT's output layer made non-zero (it starts at v = 0)."""
    torch.manual_seed(0)
    z = micro_model.encode(torch.zeros(1, 3, 32, 32))
    dit = DiT.from_preset("DiT-S/2", latent_channels=z.shape[1], latent_size=z.shape[-1], hidden_size=32, depth=1,
                          num_heads=2, num_classes=3).eval()
    with torch.no_grad():
        for p in dit.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    dit.save_pretrained(tmp_path / "dit")
    micro_model.save_pretrained(tmp_path / "tok")
    return tmp_path / "dit", tmp_path / "tok", dit


def test_sample_dit_writes_each_image_reproducibly_and_resumes(tmp_path, pair, micro_model, capsys):
    dit_dir, tok_dir, dit = pair
    argv = ["sample-dit", str(dit_dir), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "out"),
            "--per-class", "2", "--classes", "0,2", "--steps", "2", "--decode-steps", "2", "--decode-sampler",
            "euler", "--cfg-scale", "2", "--batch-size", "3", "--seed", "5"]
    assert main(argv) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["000000.png", "000001.png", "000002.png", "000003.png", "samples.json"]
    manifest = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert manifest["labels"] == [0, 0, 2, 2] and manifest["cfg_scale"] == 2.0 and manifest["seed"] == 5
    # image 2 (class 2) made alone: its latent noise from seed 5 + 2, its decode noise from 5 + 2 + 2^63
    with torch.inference_mode():
        z = dit.sample(torch.tensor([2]), steps=2, cfg_scale=2.0, seed=[7])
        expected = fast_decode(micro_model, z, steps=2, sampler="euler", seed=[7 + 2**63])[0]
    saved = torch.from_numpy(np.array(Image.open(tmp_path / "out" / "000002.png"))).permute(2, 0, 1)
    assert torch.equal(saved, expected)
    # a stopped run continues: only the missing file is made, the same as before
    before = (tmp_path / "out" / "000001.png").read_bytes()
    (tmp_path / "out" / "000001.png").unlink()
    mtime = (tmp_path / "out" / "000003.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 images in " in (out := capsys.readouterr().out) and "1 made, 3 there already and kept" in out
    assert (tmp_path / "out" / "000001.png").read_bytes() == before
    assert (tmp_path / "out" / "000003.png").stat().st_mtime_ns == mtime
    # the folder holds images made with other settings: refused (they would be kept and mixed in)
    changed = [a if a != "2" or argv[i - 1] != "--cfg-scale" else "3" for i, a in enumerate(argv)]
    cli_usage_error(capsys, "other settings (cfg_scale differ", changed)
    fewer = argv[:6] + ["--per-class", "1", "--classes", "0,2"] + argv[10:]
    cli_usage_error(capsys, "other settings (labels differ", fewer)
    # --overwrite makes every image again and removes the numbered ones beyond the count
    assert main(fewer + ["--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000.png", "000001.png", "samples.json"]
    cli_usage_error(capsys, "class-conditional (3 classes): give --per-class", argv[:6] + ["--num", "2"])
    cli_usage_error(capsys, "--classes [5]: expected classes in 0..2", argv[:6] + ["--per-class", "1", "--classes", "5"])
    cli_usage_error(capsys, "expected classes in 0..2", argv[:6] + ["--per-class", "1", "--classes", ","])
    # settings checked before anything is loaded or written
    for bad, message in ((["--sampler", "bogus"], "bogus"), (["--decode-sampler", "bogus"], "bogus"),
                         (["--cfg-scale", "nan"], "--cfg-scale must be finite"),
                         (["--cfg-scale", "-1.5"], "--cfg-scale must be finite and >= 0")):
        cli_usage_error(capsys, message, argv[:5] + [str(tmp_path / "fresh")] + argv[6:] + bad)
    assert not (tmp_path / "fresh").exists()


def test_sample_dit_refuses_a_tokenizer_of_other_latents(tmp_path, pair, capsys):
    dit_dir, _, _ = pair
    other = DiT.from_preset("DiT-S/2", latent_channels=7, latent_size=4, hidden_size=32, depth=1, num_heads=2,
                            num_classes=0)
    other.save_pretrained(tmp_path / "other")
    cli_usage_error(capsys, "makes 7-channel latents", ["sample-dit", str(tmp_path / "other"), "--tokenizer",
                                                        str(tmp_path / "tok"), "--out", str(tmp_path / "o"),
                                                        "--num", "1"])


def test_sample_dit_unconditional(tmp_path, pair, capsys):
    _, tok_dir, dit = pair
    c, size = dit.config.latent_channels, dit.config.latent_size
    DiT.from_preset("DiT-S/2", latent_channels=c, latent_size=size, hidden_size=32, depth=1, num_heads=2,
                    num_classes=0).save_pretrained(tmp_path / "uncond")
    argv = ["sample-dit", str(tmp_path / "uncond"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "u"),
            "--steps", "1", "--decode-steps", "1", "--decode-sampler", "euler"]
    assert main(argv + ["--num", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["000000.png", "000001.png", "000002.png",
                                                                   "samples.json"]
    cli_usage_error(capsys, "unconditional: give --num N", argv + ["--per-class", "2"])
    cli_usage_error(capsys, "--num must be positive", argv + ["--num", "0"])
    cli_usage_error(capsys, "--cfg-scale guides towards classes", argv + ["--num", "1", "--cfg-scale", "2"])
