"""Tests for dito_fast/eval/evaluate.py and `dito-fast evaluate`: reconstruction metrics over an
image set."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dito_fast.decode import fast_decode
from dito_fast.eval.evaluate import evaluate_reconstruction, image_batches
from dito_fast.eval.fid import FeatureStats, InceptionFeatures, frechet_distance
from dito_fast.eval.metrics import psnr, ssim
from dito_fast.eval.report import to_uint8


def _as_8bit(x):
    return to_uint8(x).float() / 127.5 - 1


def _write_images(folder, n, size=40):
    g = torch.Generator().manual_seed(5)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")


def test_metrics_match_a_direct_computation_and_not_the_batch_size(micro_model, images):
    options = dict(sampler="euler", steps=3)
    one, _ = evaluate_reconstruction(micro_model, [images[:1], images[1:]], seed=7, **options)
    all_at_once, _ = evaluate_reconstruction(micro_model, [images], seed=7, **options)
    # image i's noise is seeded with seed + i whatever the batches
    assert one.psnr_per_image == pytest.approx(all_at_once.psnr_per_image, rel=1e-6)
    x = _as_8bit(images)
    with torch.inference_mode():
        recon = _as_8bit(fast_decode(micro_model, micro_model.encode(x), seed=[7, 8, 9], output="float", **options))
    assert all_at_once.psnr_per_image == pytest.approx(psnr(recon, x).tolist(), rel=1e-6)
    assert all_at_once.psnr == pytest.approx(float(psnr(recon, x).mean()), rel=1e-6)
    assert all_at_once.ssim == pytest.approx(float(ssim(recon, x).mean()), rel=1e-6)
    assert all_at_once.num_images == 3 and all_at_once.rfid is None
    assert all_at_once.settings["sampler"] == "euler" and all_at_once.settings["nfe"] == 3
    assert all_at_once.settings["image_size"] == [32, 32]


def test_rfid_is_the_distance_between_the_feature_statistics(micro_model, images):
    torch.manual_seed(0)
    net = InceptionFeatures()
    report, real = evaluate_reconstruction(micro_model, [images[:2], images[2:]], features=net, sampler="euler",
                                           steps=2)
    x = _as_8bit(images)
    with torch.inference_mode():
        recon = _as_8bit(fast_decode(micro_model, micro_model.encode(x), seed=[0, 1, 2], sampler="euler", steps=2,
                                     output="float"))
        fx, fr = net(x), net(recon)
    fake = FeatureStats()
    fake.update(fr)
    assert real.n == 3 and torch.allclose(real.mean, fx.double().mean(0), atol=1e-6)
    assert report.rfid == pytest.approx(frechet_distance(fake.mean, fake.cov, real.mean, real.cov), rel=1e-4)
    assert report.rfid > 0
    # against reference statistics given: the same value when they are the originals'
    again, none = evaluate_reconstruction(micro_model, [images], features=net, reference=real, sampler="euler",
                                          steps=2)
    assert none is None and again.rfid == pytest.approx(report.rfid, rel=1e-4)


def test_image_batches_reads_each_file_once_and_counts_unreadable_ones(tmp_path):
    _write_images(tmp_path / "set" / "sub", 3)
    (tmp_path / "set" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    skipped = []
    batches = list(image_batches(tmp_path / "set", 32, 2, skipped=skipped))
    # broken.jpg comes first in the sorted list; the other three are read once each, center-cropped
    assert [b.shape for b in batches] == [(1, 3, 32, 32), (2, 3, 32, 32)]
    assert len(skipped) == 1 and skipped[0].endswith("broken.jpg")
    assert sum(b.shape[0] for b in image_batches(tmp_path / "set", 32, 8, limit=2)) == 1  # limit counts files
    builtin = list(image_batches("builtin", 16, 4, limit=6))
    assert [b.shape[0] for b in builtin] == [4, 2] and all(b.abs().max() <= 1 for b in builtin)
    with pytest.raises(ValueError, match="neither a folder nor 'builtin' or 'synthetic'"):
        image_batches(tmp_path / "nowhere", 32, 2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        image_batches("builtin", 32, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        image_batches(tmp_path / "empty", 32, 2)


def test_evaluate_command(tmp_path, micro_model, capsys):
    from conftest import cli_usage_error

    from dito_fast.cli import main

    micro_model.save_pretrained(tmp_path / "model")
    _write_images(tmp_path / "set", 3)
    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    from safetensors.torch import save_file

    save_file(dict(InceptionFeatures().state_dict()), str(weights))
    argv = ["evaluate", str(tmp_path / "model"), str(tmp_path / "set"), "--size", "32", "--batch-size", "2",
            "--sampler", "euler", "--steps", "2", "--fid-weights", str(weights), "--json", str(tmp_path / "r.json")]
    assert main(argv + ["--save-stats", str(tmp_path / "stats.safetensors")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert out.startswith(f"3 images: PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}, "
                          f"rFID {report['rfid']:.3f}")
    assert len(report["psnr_per_image"]) == 3 and report["skipped"] == []
    assert FeatureStats.load(tmp_path / "stats.safetensors").n == 3
    # the saved statistics as the reference: the same rFID
    assert main(argv + ["--fid-reference", str(tmp_path / "stats.safetensors")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rfid"] == pytest.approx(report["rfid"], rel=1e-6)
    capsys.readouterr()
    # an unreadable file is skipped and counted: exit status 1, the others evaluated
    (tmp_path / "set" / "zz.png").write_bytes(b"garbage")
    assert main(argv[:-4]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("3 images:") and "1 of 4 inputs could not be read" in captured.err
    cli_usage_error(capsys, "need --fid-weights", argv[:-4] + ["--save-stats", str(tmp_path / "s2.safetensors")])
    cli_usage_error(capsys, "--size must be a positive multiple", argv[:3] + ["--size", "30"])
    cli_usage_error(capsys, "batch_size must be positive", argv[:-4] + ["--batch-size", "0"])
