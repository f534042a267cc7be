"""Tests for dito_fast/train/checkpoint.py: atomic files, checkpoint directories, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dito_fast.train import checkpoint as ckpt


class NotAllowed:
    """A class weights-only unpickling must refuse."""


def _files(step):
    return {"model.safetensors": {"w": torch.full((2, 3), float(step))},
            "config.json": {"step": step},
            "state.pt": {"step": step, "rng": torch.get_rng_state()}}


def test_atomic_writers_leave_no_temporaries(tmp_path):
    ckpt.atomic_write_json({"a": [1, 2]}, tmp_path / "sub" / "x.json")
    ckpt.atomic_write_text("hello", tmp_path / "t.txt")
    ckpt.save_safetensors({"w": torch.arange(6.0).reshape(2, 3).t()}, tmp_path / "w.safetensors")  # non-contiguous
    ckpt.save_torch({"s": torch.ones(2)}, tmp_path / "s.pt")
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "t.txt").read_text() == "hello"
    assert torch.equal(ckpt.load_weights(tmp_path / "w.safetensors")["w"], torch.arange(6.0).reshape(2, 3).t())
    assert torch.equal(ckpt.load_torch(tmp_path / "s.pt")["s"], torch.ones(2))
    assert not list(tmp_path.rglob("*.tmp"))


def test_json_is_strict_json(tmp_path):
    # an exact reconstruction's PSNR (+inf) or a diverged figure (NaN) had been written as
    # Infinity / NaN, which strict parsers (jq, JavaScript) refuse
    ckpt.atomic_write_json({"psnr": float("inf"), "per_image": [1.5, float("nan"), -float("inf")]}, tmp_path / "m.json")

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {"psnr": None,
                                                                                   "per_image": [1.5, None, None]}


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "x.json"
    ckpt.atomic_write_json({"v": 1}, path)
    with pytest.raises(TypeError):
        ckpt.atomic_write_json({"v": object()}, path)  # not JSON-serialisable: fails mid-write
    assert json.loads(path.read_text()) == {"v": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing weights file: .*nope.safetensors"):
        ckpt.load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="missing checkpoint file: .*state.pt"):
        ckpt.load_torch(tmp_path / "state.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read weights .*bad.safetensors"):
        ckpt.load_weights(tmp_path / "bad.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint state .*bad.pt"):
        ckpt.load_torch(tmp_path / "bad.pt")


def test_load_torch_is_weights_only(tmp_path):
    # arbitrary pickled objects are refused (weights_only=True)
    torch.save({"x": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot read checkpoint state"):
        ckpt.load_torch(tmp_path / "evil.pt")


def test_write_list_latest_prune(tmp_path):
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 10):
        path = ckpt.write_checkpoint(tmp_path, step, _files(step))
        assert path.name == f"step_{step:08d}" and (path / "COMPLETE").is_file()
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000001", "step_00000002", "step_00000010"]  # numeric order
    latest = ckpt.latest_checkpoint(tmp_path)
    assert torch.equal(ckpt.load_weights(latest / "model.safetensors")["w"], torch.full((2, 3), 10.0))
    assert ckpt.load_torch(latest / "state.pt")["step"] == 10
    assert json.loads((latest / "config.json").read_text()) == {"step": 10}
    # re-writing a step replaces it
    files = _files(10)
    files["model.safetensors"] = {"w": torch.zeros(1)}
    ckpt.write_checkpoint(tmp_path, 10, files)
    assert torch.equal(ckpt.load_weights(latest / "model.safetensors")["w"], torch.zeros(1))
    # pruning keeps the newest N and removes stale temporaries
    (tmp_path / "checkpoints" / ".step_00000011.xyz.tmp").mkdir()
    (tmp_path / "checkpoints" / ".latest.abc.tmp").write_text("step_00000011\n")  # a kill while `latest` was replaced
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000010"]
    assert not list((tmp_path / "checkpoints").glob(".*"))
    ckpt.prune_checkpoints(tmp_path, keep=0)  # 0 keeps everything
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_incomplete_and_foreign_dirs_ignored(tmp_path):
    ckpt.write_checkpoint(tmp_path, 3, _files(3))
    root = tmp_path / "checkpoints"
    (root / "step_00000007").mkdir()  # no COMPLETE marker
    (root / "step_00000008.bak").mkdir()
    ((root / "step_00000008.bak") / "COMPLETE").write_text("complete\n")
    (root / ".step_00000009.abc.tmp").mkdir()
    ((root / ".step_00000009.abc.tmp") / "COMPLETE").write_text("complete\n")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_00000003"


def test_failed_checkpoint_write_leaves_nothing(tmp_path):
    ckpt.write_checkpoint(tmp_path, 1, _files(1))
    bad = _files(2)
    bad["notes.txt"] = "x"
    with pytest.raises(ValueError, match="unsupported checkpoint file type: notes.txt"):
        ckpt.write_checkpoint(tmp_path, 2, bad)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step_00000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"


def test_replacing_or_pruning_a_checkpoint_never_leaves_it_half_deleted(tmp_path, monkeypatch):
    # The old step_N was deleted in place: a crash mid-deletion left step_N with COMPLETE but
    # without its weights, which latest_checkpoint returned. Now it goes aside (a hidden temporary
    # name) before it is deleted.
    import shutil

    ckpt.write_checkpoint(tmp_path, 1, _files(1))
    ckpt.write_checkpoint(tmp_path, 2, _files(2))
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        for f in Path(path).rglob("model.safetensors"):  # part of it gone, then the kill
            f.unlink()
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 2, _files(2))  # re-saving step 2 (a time-budget stop at a checkpoint step)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(tmp_path, keep=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    for p in ckpt.list_checkpoints(tmp_path):  # whatever is listed is whole
        assert ckpt.load_weights(p / "model.safetensors")["w"].shape == (2, 3)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    ckpt.prune_checkpoints(tmp_path, keep=1)  # the leftovers go with the next prune
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step_00000002"]
