"""Tests for dito_fast/train/export.py and ``dito-fast export``: any checkpoint's model as a model
directory, from both checkpoint formats, bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch

from dito_fast.cli import main
from dito_fast.models.dito import DiTo
from dito_fast.train import checkpoint as ckpt
from dito_fast.train import export_checkpoint, find_checkpoint, train

from conftest import cli_usage_error, micro_run_config


def _weights(directory) -> dict:
    return ckpt.load_weights(directory / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run with EMA, checkpoints at steps 2 and 4 (safetensors format)."""
    out = tmp_path_factory.mktemp("run")
    train(micro_run_config(steps=4, checkpoint_every_steps=2), out, progress=False)
    return out


def test_export_of_each_checkpoint_is_its_weights_bit_for_bit(run, tmp_path):
    step2 = run / "checkpoints" / "step_00000002"
    assert export_checkpoint(step2, tmp_path / "s2") == step2
    assert _same(_weights(tmp_path / "s2"), ckpt.load_weights(step2 / "ema.safetensors"))
    export_checkpoint(step2, tmp_path / "s2raw", weights="model")
    assert _same(_weights(tmp_path / "s2raw"), ckpt.load_weights(step2 / "model.safetensors"))
    assert not _same(_weights(tmp_path / "s2"), _weights(tmp_path / "s2raw"))
    # a run directory (or its checkpoints/ folder) gives its newest checkpoint: the run's own export
    assert export_checkpoint(run, tmp_path / "latest") == run / "checkpoints" / "step_00000004"
    assert find_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_00000004"
    assert _same(_weights(tmp_path / "latest"), _weights(run / "model"))
    model = DiTo.from_pretrained(tmp_path / "latest")
    assert model.config == DiTo.from_pretrained(run / "model").config and not model.training


def test_export_of_a_dcp_checkpoint(make_run_config, tmp_path):
    """FSDP's format (DCP shards), read in one process: the same weights as the run's export."""
    out = tmp_path / "fsdp"
    train(make_run_config(steps=2, parallel="fsdp"), out, progress=False)
    assert ckpt.checkpoint_format(out / "checkpoints" / "step_00000002") == "dcp"
    export_checkpoint(out, tmp_path / "m")
    assert _same(_weights(tmp_path / "m"), _weights(out / "model"))
    export_checkpoint(out, tmp_path / "raw", weights="model")
    assert not _same(_weights(tmp_path / "raw"), _weights(out / "model"))


def test_export_without_ema(make_run_config, tmp_path):
    train(make_run_config(steps=2, ema_decay=0.0), tmp_path / "run", progress=False)
    export_checkpoint(tmp_path / "run", tmp_path / "auto")  # auto: the raw weights, as the run exported
    assert _same(_weights(tmp_path / "auto"), _weights(tmp_path / "run" / "model"))
    with pytest.raises(ValueError, match="holds no EMA weights"):
        export_checkpoint(tmp_path / "run", tmp_path / "ema", weights="ema")
    assert not (tmp_path / "ema").exists()


def test_export_refuses_bad_sources_and_existing_models(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "m")
    with pytest.raises(NotADirectoryError, match="is a file"):
        export_checkpoint(run / "config.json", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "m")
    half = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(run / "checkpoints" / "step_00000002", half)
    (half / "COMPLETE").unlink()  # a write that was interrupted
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        export_checkpoint(half, tmp_path / "m")
    with pytest.raises(ValueError, match="weights must be one of"):
        export_checkpoint(run, tmp_path / "m", weights="best")
    export_checkpoint(run / "checkpoints" / "step_00000002", tmp_path / "m")
    with pytest.raises(FileExistsError, match="already holds a model"):
        export_checkpoint(run, tmp_path / "m")
    assert _same(_weights(tmp_path / "m"), ckpt.load_weights(run / "checkpoints" / "step_00000002" / "ema.safetensors"))
    export_checkpoint(run, tmp_path / "m", overwrite=True)
    assert _same(_weights(tmp_path / "m"), _weights(run / "model"))
    # never over the run or a checkpoint, --overwrite or not: their config.json is the run's
    step2 = run / "checkpoints" / "step_00000002"
    for target in (step2, run, run / "checkpoints" / ".." / "checkpoints" / "step_00000002"):
        before = (step2 / "config.json").read_bytes(), (run / "config.json").read_bytes()
        with pytest.raises(ValueError, match="is a training run or a checkpoint"):
            export_checkpoint(step2, target, overwrite=True)
        assert ((step2 / "config.json").read_bytes(), (run / "config.json").read_bytes()) == before


def test_export_names_a_checkpoint_whose_weights_do_not_match_its_config(run, tmp_path):
    bad = tmp_path / "step_00000002"
    shutil.copytree(run / "checkpoints" / "step_00000002", bad)
    w = ckpt.load_weights(bad / "ema.safetensors")
    w.pop(next(iter(w)))
    ckpt.save_safetensors(w, bad / "ema.safetensors")
    with pytest.raises(ValueError, match="do not match its config.json"):
        export_checkpoint(bad, tmp_path / "m")


def test_cli_export(run, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(tmp_path / "m")]) == 0
    assert "exported" in capsys.readouterr().out
    assert _same(_weights(tmp_path / "m"), _weights(run / "model"))
    cli_usage_error(capsys, "--overwrite", ["export", str(run), "--out", str(tmp_path / "m")])
    assert main(["export", str(run / "checkpoints" / "step_00000002"), "--out", str(tmp_path / "m"),
                 "--weights", "model", "--overwrite"]) == 0
    assert _same(_weights(tmp_path / "m"), ckpt.load_weights(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    cli_usage_error(capsys, "no complete checkpoint", ["export", str(tmp_path), "--out", str(tmp_path / "x")])
