"""The demo's plumbing on a micro model: files written, report consistent with its images."""

import json

import pytest
import torch

from dito_fast import DiTo, demo
from dito_fast.eval.metrics import bicubic_baseline, psnr, ssim

from conftest import MICRO_MODEL_OVERRIDES


@pytest.fixture
def micro_demo(monkeypatch):
    settings = dict(demo.DEMO_SETTINGS)
    settings.update({f"model.{k}": v for k, v in MICRO_MODEL_OVERRIDES.items()})
    settings.update({"train.steps": 3, "train.batch_size": 2, "train.checkpoint_every_steps": 2,
                     "data.num_synthetic_images": 8, "train.threads": 1})
    monkeypatch.setattr(demo, "DEMO_SETTINGS", settings)
    monkeypatch.setattr(demo, "DECODE", {"steps": 2, "sampler": "euler", "seed": 0})
    monkeypatch.setattr(demo, "PAPER_DECODE", {"steps": 3, "sampler": "euler", "seed": 0})
    monkeypatch.setattr(demo, "EVAL_PHOTOS", 2)
    monkeypatch.setattr(demo, "EVAL_SYNTHETIC", 2)


def test_demo_writes_model_grid_and_consistent_metrics(tmp_path, micro_demo):
    report = demo.run_demo(tmp_path)
    for name in ("model/config.json", "model/model.safetensors", "reconstructions.png", "metrics.json",
                 "run/metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["dito_psnr"] == pytest.approx(report["dito_psnr"])
    assert report["train_steps"] == 3 and report["downsample_factor"] == 8
    assert report["beats_baseline"] == (report["dito_psnr"] > report["bicubic_psnr"])

    # Recompute the DiTo figure from the saved model and the same held-out images.
    from dito_fast.data import builtin_split
    from dito_fast.train.trainer import _mix_seed

    _, val = builtin_split(demo.EVAL_IMAGE_SIZE, 1, seed=0, val_seed=_mix_seed(0, 0xD3140) % 2**31, num_val=4)
    x = torch.stack([val[i] for i in range(len(val))])
    n = report["num_val_images"]
    model = DiTo.from_pretrained(tmp_path / "model")
    recon = model.reconstruct(x, steps=2, seed=0)
    assert float(psnr(recon, x)[:n].mean()) == pytest.approx(report["dito_psnr"], abs=1e-3)
    paper = model.reconstruct(x, steps=3, seed=0)
    assert float(psnr(paper, x)[:n].mean()) == pytest.approx(report["dito_paper_decode_psnr"], abs=1e-3)
    assert float(psnr(recon, x).mean()) == pytest.approx(report["dito_psnr_all_held_out"], abs=1e-3)
    assert float(psnr(bicubic_baseline(x, 8), x)[:n].mean()) == pytest.approx(report["bicubic_psnr"], abs=1e-6)
    assert float(ssim(recon, x)[:n].mean()) == pytest.approx(report["dito_ssim"], abs=1e-4)
    assert float(ssim(paper, x)[:n].mean()) == pytest.approx(report["dito_paper_decode_ssim"], abs=1e-4)
    assert float(ssim(bicubic_baseline(x, 8), x)[:n].mean()) == pytest.approx(report["bicubic_ssim"], abs=1e-9)
    assert [p["bicubic_ssim"] for p in report["per_image"]] == pytest.approx(
        ssim(bicubic_baseline(x, 8), x).tolist(), abs=1e-4)
