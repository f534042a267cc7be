"""Tests for dito_fast/train/trainer.py: learning, exact resume, non-finite steps, run layout."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import pytest
import torch
from torch.utils.data import Dataset

from dito_fast.config import apply_overrides
from dito_fast.data import SyntheticImages
from dito_fast.diffusion import flow
from dito_fast.models.dito import DiTo
from dito_fast.train import EMA, StepBatchSampler, TrainingDivergedError, train
from dito_fast.train import checkpoint as ckpt


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# learning


@pytest.mark.slow
def test_tiny_model_overfits_four_images(make_micro_config):
    """The flow-matching loss of 4 fixed images, averaged over 8 fixed held-out noise draws,
    falls by more than 5x in 300 AdamW steps."""
    torch.manual_seed(0)
    model = DiTo(make_micro_config())
    ds = SyntheticImages(4, 16, seed=0)
    x = torch.stack([ds[i] for i in range(4)])

    def eval_loss():
        with torch.no_grad():
            return torch.stack([model(x, generator=torch.Generator().manual_seed(1000 + k))
                                for k in range(8)]).mean().item()

    initial = eval_loss()
    # the zero-initialised output layer predicts v = 0: the loss starts at E|e - x|^2 ~ 1 + E x^2
    assert initial == pytest.approx(1 + float(x.square().mean()), rel=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = x.repeat(4, 1, 1, 1)  # 4 noise draws per image per step
    for step in range(300):
        loss = model(batch, generator=torch.Generator().manual_seed(step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = eval_loss()
    assert final < initial / 5, (initial, final)


# --------------------------------------------------------------------------------------------
# run layout, validation


def test_train_writes_run_layout(make_run_config, tmp_path):
    cfg = make_run_config(steps=4, val_every_steps=2, checkpoint_every_steps=2, log_every_steps=2)
    result = train(cfg, tmp_path, progress=False)
    assert result.step == 4 and result.skipped_steps == 0
    assert [s for s, _ in result.losses] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(l)) for _, l in result.losses)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["decoder"]["level_channels"] == [8, 16, 16, 16] and saved["train"]["steps"] == 4
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    step_files = {p.name for p in (tmp_path / "checkpoints" / "step_00000004").iterdir()}
    assert step_files == {"model.safetensors", "ema.safetensors", "config.json", "state.pt", "COMPLETE"}
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (tmp_path / "samples" / "recon_00000002.png").is_file()
    assert (tmp_path / "samples" / "recon_00000004.png").is_file()
    records = _metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert [r["step"] for r in records if "val_psnr" in r] == [2, 4]
    assert records[0]["loss"] == pytest.approx((result.losses[0][1] + result.losses[1][1]) / 2)
    assert "val_psnr" in result.last_val and result.last_val["val_psnr"] > 0
    # the exported model is the EMA model, loadable, identical to the final EMA weights
    loaded = DiTo.from_pretrained(tmp_path / "model")
    assert _state_equal(loaded, result.model)
    ema_w = ckpt.load_weights(tmp_path / "checkpoints" / "step_00000004" / "ema.safetensors")
    assert all(torch.equal(ema_w[k], v) for k, v in loaded.state_dict().items())
    model_w = ckpt.load_weights(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors")
    assert any(not torch.equal(model_w[k], v) for k, v in loaded.state_dict().items())


def test_train_without_ema_exports_raw_weights(make_run_config, tmp_path):
    result = train(make_run_config(steps=2, ema_decay=0.0), tmp_path, progress=False)
    model_w = ckpt.load_weights(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors")
    assert all(torch.equal(model_w[k], v) for k, v in result.model.state_dict().items())
    assert not (tmp_path / "checkpoints" / "step_00000002" / "ema.safetensors").exists()


def test_train_with_noise_sync_and_other_objective(make_run_config, tmp_path):
    cfg = make_run_config(steps=2)
    cfg.model.flow.noise_sync_prob = 0.5
    cfg.model.flow.objective = "x0"
    result = train(cfg, tmp_path, progress=False)
    assert result.step == 2 and len(result.losses) == 2


def test_train_under_bf16_autocast(make_run_config, tmp_path):
    """precision=bf16 (what "auto" picks on CUDA): the decoder's output is bf16, the target float32;
    the loss is taken in float32 and the steps train (this raised a dtype mismatch in fm_loss)."""
    cfg = make_run_config(steps=2, precision="bf16", ema_decay=0.0)
    cfg.model.flow.noise_sync_prob = 0.5
    result = train(cfg, tmp_path, progress=False)
    assert result.step == 2 and result.skipped_steps == 0  # finite losses and gradients, two updates
    assert all(math.isfinite(loss) for _, loss in result.losses)
    assert all(v.dtype == torch.float32 for v in result.model.state_dict().values())


def test_weights_change_and_seed_matters(make_run_config, tmp_path):
    a = train(make_run_config(steps=2, ema_decay=0.0), tmp_path / "a", progress=False)
    b = train(make_run_config(steps=2, ema_decay=0.0), tmp_path / "b", progress=False)
    c = train(make_run_config(steps=2, ema_decay=0.0, seed=1), tmp_path / "c", progress=False)
    assert a.losses == b.losses and _state_equal(a.model, b.model)  # deterministic on CPU
    assert a.losses != c.losses
    torch.manual_seed(0)
    init = DiTo(make_run_config().model)
    assert not _state_equal(init, a.model)


# --------------------------------------------------------------------------------------------
# exact resume


def test_exact_resume(make_run_config, tmp_path):
    N, k = 6, 3
    full = train(make_run_config(steps=N), tmp_path / "full", progress=False)
    assert len(full.losses) == N

    part = train(make_run_config(steps=k), tmp_path / "resumed", progress=False)
    assert part.losses == full.losses[:k]
    rest = train(make_run_config(steps=N), tmp_path / "resumed", resume=True, progress=False)
    assert [s for s, _ in rest.losses] == list(range(k + 1, N + 1))
    assert rest.losses == full.losses[k:]  # bit-identical losses after the resume point
    assert _state_equal(rest.model, full.model)  # exported (EMA) weights
    w_full = ckpt.load_weights(tmp_path / "full" / "checkpoints" / f"step_{N:08d}" / "model.safetensors")
    w_res = ckpt.load_weights(tmp_path / "resumed" / "checkpoints" / f"step_{N:08d}" / "model.safetensors")
    assert all(torch.equal(w_full[n], w_res[n]) for n in w_full)
    # the optimizer state after resume matches too
    s_full = ckpt.load_torch(tmp_path / "full" / "checkpoints" / f"step_{N:08d}" / "state.pt")
    s_res = ckpt.load_torch(tmp_path / "resumed" / "checkpoints" / f"step_{N:08d}" / "state.pt")
    for pid, st in s_full["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], s_res["optimizer"]["state"][pid]["exp_avg_sq"])
    assert s_full["ema_updates"] == s_res["ema_updates"] == N


def test_global_rng_resumes_exactly(make_run_config, tmp_path):
    """torch's global RNG (training itself draws nothing from it) after a resumed run is where
    the uninterrupted run's is: the loader no longer takes its workers' seeds from it, which had
    moved it once more on every resume. And a run's stream is its own, set from (seed, rank)."""
    train(make_run_config(steps=4, checkpoint_every_steps=2), tmp_path / "full", progress=False)
    full = torch.get_rng_state()
    train(make_run_config(steps=2, checkpoint_every_steps=2), tmp_path / "part", progress=False)
    torch.manual_seed(12345)  # whatever happens between the two processes
    train(make_run_config(steps=4, checkpoint_every_steps=2), tmp_path / "part", resume=True, progress=False)
    assert torch.equal(torch.get_rng_state(), full)
    torch.manual_seed(make_run_config().train.seed)
    assert not torch.equal(torch.get_rng_state(), full)  # not the weight-init stream


def test_ranks_with_different_settings_are_refused(make_run_config, monkeypatch):
    """What every rank resolved is compared before training (torchrun with one node given another
    seed or batch size had trained on without a word); host-local settings may differ."""
    from dito_fast.train import distributed, trainer

    ctx = distributed.DistContext(rank=0, world_size=2, backend="gloo")
    cfg = make_run_config()
    other = {"train.seed": 7, "train.batch_size": 6}

    def gather(obj, ctx_):
        return [obj, {**obj, **other}]
    monkeypatch.setattr(distributed, "all_gather_object", gather)
    with pytest.raises(ValueError, match=r"different settings \(train.batch_size: rank 0 2, rank 1 6; "
                                         r"train.seed: rank 0 0, rank 1 7\)"):
        trainer._check_same_settings(cfg, ctx)
    # host-local settings may differ: rank 1 with other threads and workers is accepted
    rank1 = []
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj, ctx_: rank1.append(obj) or [obj])
    trainer._check_same_settings(apply_overrides(cfg, {"train.threads": 3, "data.workers": 2}), ctx)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj, ctx_: [obj, rank1[0]])
    trainer._check_same_settings(cfg, ctx)


def test_failed_checkpoint_write_leaves_no_temporary_folder(make_run_config, tmp_path, monkeypatch):
    cfg = make_run_config(steps=4, checkpoint_every_steps=2)
    real, calls = ckpt.write_files, []

    def full_disk(directory, files):  # the disk fills up while step 4's checkpoint is written
        calls.append(directory)
        real(directory, files)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "write_files", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, tmp_path / "run", progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000002"]
    assert not list(root.glob(".*.tmp"))
    assert ckpt.load_weights(root / "step_00000002" / "model.safetensors")


class _OnRead(Dataset):
    """Wraps a dataset and runs ``action()`` when item read number ``at`` (1-based) is asked for,
    before reading it: a simulated kill (raise) or a stop request."""

    def __init__(self, ds, at, action):
        self.ds, self.at, self.action, self.reads = ds, at, action, 0

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch):
        self.ds.set_epoch(epoch)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            self.action()
        return self.ds[i]


def _simulated_crash():
    raise RuntimeError("simulated crash")


def test_resume_after_crash_mid_run(make_run_config, tmp_path):
    # periodic checkpoint at step 3, crash while loading step 5's batch, resume: same run
    cfg = make_run_config(steps=6, checkpoint_every_steps=3)
    full = train(cfg, tmp_path / "full", progress=False)
    ds = SyntheticImages(cfg.data.num_synthetic_images, cfg.data.image_size, seed=cfg.train.seed)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "crash", train_dataset=_OnRead(ds, 4 * 2 + 1, _simulated_crash), progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "crash")] == ["step_00000003"]
    last = _events(tmp_path / "crash")[-1]  # the log says how the run ended
    assert last["event"] == "failed" and last["step"] == 4 and last["error"] == "RuntimeError: simulated crash"
    # a fresh start refuses to overwrite the interrupted run
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(cfg, tmp_path / "crash", progress=False)
    rest = train(cfg, tmp_path / "crash", resume=True, progress=False)
    assert rest.losses == full.losses[3:]
    assert _state_equal(rest.model, full.model)
    # metrics past the checkpoint were dropped on resume, then rewritten: same steps as the full run
    strip = lambda recs: [(r["step"], r.get("loss"), r.get("val_psnr")) for r in recs]  # noqa: E731
    assert strip(_metrics(tmp_path / "crash")) == strip(_metrics(tmp_path / "full"))


def test_resume_from_explicit_checkpoint_dir(make_run_config, tmp_path):
    cfg = make_run_config(steps=4, checkpoint_every_steps=2)
    full = train(cfg, tmp_path / "a", progress=False)
    step2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    rest = train(cfg, tmp_path / "b", resume=str(step2), progress=False)
    assert rest.losses == full.losses[2:]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint directory"):
        train(cfg, tmp_path / "c", resume=str(tmp_path / "a" / "checkpoints" / "step_00000099"), progress=False)


def test_resume_matches_the_uninterrupted_run_in_its_log(make_run_config, tmp_path):
    # the first line after a resume averaged only the steps since the resume, and every line gave
    # the next step's learning rate (read after the scheduler's step)
    cfg = make_run_config(steps=6, log_every_steps=3, checkpoint_every_steps=2, warmup_steps=2, lr_decay="cosine",
                          lr_min_ratio=0.1)
    train(cfg, tmp_path / "full", progress=False)
    step2 = tmp_path / "full" / "checkpoints" / "step_00000002"
    train(cfg, tmp_path / "cut", resume=str(step2), progress=False)
    rows = lambda run: [(r["step"], r["loss"], r["lr"]) for r in _metrics(run) if "loss" in r]  # noqa: E731
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")  # logs at steps 3 and 6; the checkpoint is at 2
    lrs = [lr for _, _, lr in rows(tmp_path / "full")]
    from dito_fast.train.trainer import lr_factor
    assert lrs == [cfg.train.lr * lr_factor(k - 1, cfg.train) for k in (3, 6)]  # the lr steps 3 and 6 used


def test_resume_with_changed_settings(make_run_config, tmp_path, caplog):
    cfg = make_run_config(steps=2, checkpoint_every_steps=1)
    train(cfg, tmp_path / "a", progress=False)
    step1 = tmp_path / "a" / "checkpoints" / "step_00000001"
    # optimizer hyperparameters: the new values apply (the restored states had kept the old ones), and are logged
    changed = make_run_config(steps=2, lr=5e-2, weight_decay=0.5)
    with caplog.at_level(logging.WARNING, logger="dito_fast.train"):
        run = train(changed, tmp_path / "b", resume=str(step1), progress=False)
    assert "train.lr 0.001 -> 0.05" in caplog.text and "train.weight_decay 0.0 -> 0.5" in caplog.text
    state = ckpt.load_torch(tmp_path / "b" / "checkpoints" / "step_00000002" / "state.pt")
    group = state["optimizer"]["param_groups"][0]
    assert group["lr"] == 5e-2 and group["weight_decay"] == 0.5 and state["scheduler"]["base_lrs"] == [5e-2]
    assert [r["lr"] for r in _metrics(tmp_path / "b") if "lr" in r] == [5e-2]
    assert run.step == 2
    # a model setting that keeps every tensor's shape would train the weights for something else
    other = apply_overrides(cfg, {"model.flow.objective": "epsilon"})
    with pytest.raises(ValueError, match="model.flow.objective 'velocity' -> 'epsilon'"):
        train(other, tmp_path / "c", resume=str(step1), progress=False)
    # a checkpoint's state.pt without an entry: named
    broken = tmp_path / "broken"
    shutil.copytree(step1, broken)
    state = ckpt.load_torch(broken / "state.pt")
    del state["scheduler"]
    ckpt.save_torch(state, broken / "state.pt")
    with pytest.raises(ValueError, match="state.pt has no 'scheduler' entry"):
        train(cfg, tmp_path / "d", resume=str(broken), progress=False)


def test_resume_drops_a_metrics_line_cut_by_a_crash(make_run_config, tmp_path):
    cfg = make_run_config(steps=3, checkpoint_every_steps=2)
    train(cfg, tmp_path / "a", progress=False)
    path = tmp_path / "a" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a write cut short
    train(make_run_config(steps=4), tmp_path / "a", resume=True, progress=False)
    assert [r["step"] for r in _metrics(tmp_path / "a") if "loss" in r] == [1, 2, 3, 4]


def test_resume_without_checkpoint_starts_fresh(make_run_config, tmp_path):
    a = train(make_run_config(steps=2), tmp_path / "a", progress=False)
    b = train(make_run_config(steps=2), tmp_path / "b", resume=True, progress=False)
    assert a.losses == b.losses


def test_a_run_that_fails_to_start_writes_no_run_files(make_run_config, tmp_path):
    cfg = make_run_config(steps=2)
    cfg.data.source = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError):
        train(cfg, tmp_path / "run", progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # no config.json, no start event


def test_resuming_past_the_last_step_is_refused_and_changes_nothing(make_run_config, tmp_path):
    train(make_run_config(steps=4), tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="at step 4, past train.steps=2: nothing to train.*export"):
        train(make_run_config(steps=2), tmp_path, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # at its step exactly: nothing to train, the model exported again (what a finished run's restart does)
    assert train(make_run_config(steps=4), tmp_path, resume=True, progress=False).step == 4


def test_interrupted_checkpoints_never_latest(make_run_config, tmp_path):
    cfg2 = make_run_config(steps=2)
    train(cfg2, tmp_path, progress=False)
    root = tmp_path / "checkpoints"
    good = root / "step_00000002"
    # a later step directory without COMPLETE (crash before the marker) ...
    shutil.copytree(good, root / "step_00000009")
    (root / "step_00000009" / "COMPLETE").unlink()
    # ... and a leftover temporary directory that even holds a COMPLETE marker
    shutil.copytree(good, root / ".step_00000010.abcd.tmp")
    (root / "latest").write_text("step_00000009\n")
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.list_checkpoints(tmp_path) == [good]
    full = train(make_run_config(steps=3), tmp_path / "ref", progress=False)
    rest = train(make_run_config(steps=3), tmp_path, resume=True, progress=False)
    assert rest.losses == full.losses[2:]  # resumed from step 2, not from the broken step 9
    assert not (root / ".step_00000010.abcd.tmp").exists()  # stale temporaries are pruned


# --------------------------------------------------------------------------------------------
# non-finite losses


def _nan_loss_on_calls(monkeypatch, bad_calls):
    """Make flow.fm_loss return NaN on the given call numbers (0-based; one call per step)."""
    real = flow.fm_loss
    calls = {"n": 0}

    def fm_loss(pred, target, backend=None):
        loss = real(pred, target)
        i = calls["n"]
        calls["n"] += 1
        return loss * float("nan") if bad_calls(i) else loss

    monkeypatch.setattr(flow, "fm_loss", fm_loss)
    return calls


def test_nonfinite_steps_are_skipped(make_run_config, tmp_path, monkeypatch, caplog):
    _nan_loss_on_calls(monkeypatch, lambda i: i in (2, 3))
    result = train(make_run_config(steps=6, ema_decay=0.0), tmp_path, progress=False)
    assert result.step == 6 and result.skipped_steps == 2
    assert [s for s, _ in result.losses] == [1, 2, 5, 6]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert "non-finite loss" in caplog.text
    assert [r for r in _metrics(tmp_path) if "loss" in r][-1]["skipped_steps"] == 2
    # a skipped step does not move the weights: the run equals one where steps 3 and 4 are absent
    state = ckpt.load_torch(tmp_path / "checkpoints" / "step_00000006" / "state.pt")
    assert state["skipped_steps"] == 2
    assert all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())


def test_metrics_and_events_are_strict_json(tmp_path):
    """jq and JavaScript refuse NaN/Infinity: a non-finite value (a PSNR of identical images, a
    diverged loss) is written as null."""
    from dito_fast.train.trainer import _MetricsLog

    log = _MetricsLog(tmp_path, 0)
    log.write({"step": 1, "val_psnr": math.inf, "loss": math.nan, "lr": 1e-3})
    log.close()

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record == {"step": 1, "val_psnr": None, "loss": None, "lr": 1e-3}


def test_nonfinite_gradients_are_skipped(make_run_config, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(params, max_norm, *a, **kw):
        norm = real(params, max_norm, *a, **kw)
        calls["n"] += 1
        return norm * float("inf") if calls["n"] == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    result = train(make_run_config(steps=4), tmp_path, progress=False)
    assert result.skipped_steps == 1 and [s for s, _ in result.losses] == [1, 3, 4]


def test_divergence_stops_and_keeps_last_good_checkpoint(make_run_config, tmp_path, monkeypatch):
    _nan_loss_on_calls(monkeypatch, lambda i: i >= 4)  # steps 5, 6, 7, ... are non-finite
    cfg = make_run_config(steps=20, checkpoint_every_steps=2, max_bad_steps=3)
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps with a non-finite loss") as e:
        train(cfg, tmp_path, progress=False)
    # skipped steps 5 and 6 leave the weights at step 4's; step 6's checkpoint is still written (a
    # skip on a checkpoint step had dropped it), with the streak, so a resume goes on counting it
    last = tmp_path / "checkpoints" / "step_00000006"
    assert "weights are step 4's" in str(e.value) and f"the latest checkpoint is {last}" in str(e.value)
    assert ckpt.latest_checkpoint(tmp_path) == last
    assert not (tmp_path / "model").exists()  # nothing exported from a diverged run
    good = ckpt.load_weights(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors")
    kept = ckpt.load_weights(last / "model.safetensors")
    assert all(torch.equal(good[k], kept[k]) for k in good)
    assert ckpt.load_torch(last / "state.pt")["bad_streak"] == 2
    # the checkpoint loads into a model and training resumes from it
    model = DiTo(cfg.model)
    model.load_state_dict(kept)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    monkeypatch.undo()
    rest = train(make_run_config(steps=8, checkpoint_every_steps=2, max_bad_steps=3), tmp_path, resume=True,
                 progress=False)
    assert [s for s, _ in rest.losses] == [7, 8] and rest.skipped_steps == 2


def test_skipped_steps_keep_the_periodic_work_and_the_streak(make_run_config, tmp_path, monkeypatch):
    # steps 5 and 6 non-finite: step 6 still logs, validates and checkpoints (all had been dropped
    # on a skipped step), the checkpoint carries the streak, and a resume where step 7 is also
    # non-finite stops there as the uninterrupted run does (the streak had restarted at 0)
    from dito_fast.train import trainer as trainer_mod

    calls = _nan_loss_on_calls(monkeypatch, lambda i: i >= 4)
    validated = []
    real_validate = trainer_mod.validate
    monkeypatch.setattr(trainer_mod, "validate", lambda net, *a, **k: validated.append(1) or real_validate(net, *a, **k))
    cfg = make_run_config(steps=6, checkpoint_every_steps=3, val_every_steps=3, max_bad_steps=3)
    result = train(cfg, tmp_path, progress=False)
    assert result.skipped_steps == 2 and calls["n"] == 6
    records = [m for m in _metrics(tmp_path) if "skipped_steps" in m]
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6] and records[-1]["loss"] is None
    assert [m["step"] for m in _metrics(tmp_path) if "val_psnr" in m] == [3, 6] and len(validated) == 2
    assert ckpt.load_torch(tmp_path / "checkpoints" / "step_00000006" / "state.pt")["bad_streak"] == 2
    with pytest.raises(TrainingDivergedError, match="at step 7"):
        train(make_run_config(steps=9, max_bad_steps=3), tmp_path, resume=True, progress=False)


def test_nonfinite_gradient_is_skipped_without_clipping(make_run_config, tmp_path, monkeypatch):
    # with train.max_grad_norm=0 the norm had not been taken, and a NaN gradient under a finite
    # loss reached the weights (then every later step and the export)
    real = flow.fm_loss
    calls = {"n": 0}

    def fm_loss(pred, target, backend=None):
        loss = real(pred, target)
        calls["n"] += 1
        if calls["n"] == 2:  # + sqrt(0 |p|): the value 0, the gradient inf * 0 = NaN
            loss = loss + torch.sqrt(pred.reshape(pred.shape[0], -1)[:, 0].abs() * 0)
        return loss
    monkeypatch.setattr(flow, "fm_loss", fm_loss)
    result = train(make_run_config(steps=3, max_grad_norm=0.0), tmp_path, progress=False)
    assert result.skipped_steps == 1 and [s for s, _ in result.losses] == [1, 3]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_resume_follows_a_changed_schedule(make_run_config, tmp_path):
    # extending a cosine run: the first resumed step had kept the old schedule's rate (0 at its end)
    from dito_fast.train.trainer import lr_factor

    train(make_run_config(steps=4, lr_decay="cosine", lr_min_ratio=0.0, warmup_steps=0), tmp_path, progress=False)
    longer = make_run_config(steps=8, lr_decay="cosine", lr_min_ratio=0.0, warmup_steps=0)
    train(longer, tmp_path, resume=True, progress=False)
    lrs = {m["step"]: m["lr"] for m in _metrics(tmp_path) if "lr" in m}
    for step in (5, 6, 7, 8):
        assert lrs[step] == pytest.approx(longer.train.lr * lr_factor(step - 1, longer.train), rel=1e-12)


def test_time_budget_stop_on_a_validation_step_validates_once(make_run_config, tmp_path, monkeypatch):
    from dito_fast.train import trainer as trainer_mod

    validated = []
    real_validate = trainer_mod.validate
    monkeypatch.setattr(trainer_mod, "validate", lambda net, *a, **k: validated.append(1) or real_validate(net, *a, **k))
    result = train(make_run_config(steps=5, val_every_steps=1, max_minutes=1e-9), tmp_path, progress=False)
    assert result.step == 1 and len(validated) == 1  # the stop had run a second, identical decode
    assert [m["step"] for m in _metrics(tmp_path) if "val_psnr" in m] == [1]


def test_a_requested_stop_checkpoints_exports_and_resumes_exactly(make_run_config, tmp_path, monkeypatch):
    """request_stop (SIGTERM in dito-fast train): the step under way finishes, a checkpoint and
    the exported model follow at once (no final validation), and a resume continues the run."""
    from dito_fast.train import trainer as trainer_mod

    cfg = make_run_config(steps=6, checkpoint_every_steps=0, val_every_steps=0)
    full = train(cfg, tmp_path / "full", progress=False)
    validated = []
    real_validate = trainer_mod.validate
    monkeypatch.setattr(trainer_mod, "validate", lambda net, *a, **k: validated.append(1) or real_validate(net, *a, **k))
    from dito_fast.train import request_stop

    ds = SyntheticImages(cfg.data.num_synthetic_images, cfg.data.image_size, seed=cfg.train.seed)
    part = train(cfg, tmp_path / "run", train_dataset=_OnRead(ds, 3 * 2 - 1, request_stop), progress=False)
    assert part.stopped_early == "requested" and part.step == 3 and not validated
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert [e["reason"] for e in _events(tmp_path / "run") if e["event"] == "stop"] == ["requested"]
    rest = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert rest.stopped_early is None and rest.losses == full.losses[3:]  # the request was for the first run only
    assert _state_equal(rest.model, full.model)


def test_a_stop_requested_during_set_up_or_on_the_last_step(make_run_config, tmp_path):
    from dito_fast.train import request_stop

    request_stop()  # before the loop (dito-fast train's SIGTERM while the run sets up): not lost
    early = train(make_run_config(steps=4, val_every_steps=0), tmp_path / "a", progress=False)
    assert early.stopped_early == "requested" and early.step == 1
    later = train(make_run_config(steps=2, val_every_steps=0), tmp_path / "b", progress=False)
    assert later.stopped_early is None and later.step == 2  # the request was the first run's
    # a request on the last step: the run has ended normally, with its final validation
    cfg = make_run_config(steps=3, val_every_steps=0)
    ds = SyntheticImages(cfg.data.num_synthetic_images, cfg.data.image_size, seed=cfg.train.seed)
    last = train(cfg, tmp_path / "c", train_dataset=_OnRead(ds, 3 * 2, request_stop), progress=False)
    assert last.stopped_early is None and last.step == 3 and "val_psnr" in last.last_val


def test_a_failed_run_closes_its_logs(make_run_config, tmp_path, monkeypatch):
    from dito_fast.train import trainer as trainer_mod

    closed = []
    real_close = trainer_mod._MetricsLog.close
    monkeypatch.setattr(trainer_mod._MetricsLog, "close", lambda self: closed.append(1) or real_close(self))
    _nan_loss_on_calls(monkeypatch, lambda i: True)
    with pytest.raises(TrainingDivergedError, match="no checkpoint was written"):
        train(make_run_config(steps=5, max_bad_steps=2), tmp_path, progress=False)
    assert closed == [1]
    assert [e["event"] for e in _events(tmp_path)] == ["start", "diverged"]  # one event for the end


def test_an_interrupted_run_logs_its_end(make_run_config, tmp_path):
    def interrupt():
        raise KeyboardInterrupt
    ds = SyntheticImages(16, 32, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train(make_run_config(steps=4), tmp_path, train_dataset=_OnRead(ds, 2 * 2, interrupt), progress=False)
    # read 4 is the second step's batch: one step done
    assert [(e["event"], e["step"]) for e in _events(tmp_path)] == [("start", 0), ("interrupted", 1)]


# --------------------------------------------------------------------------------------------
# data order and EMA


def test_step_batch_sampler_stream_independent_of_cut():
    full = list(StepBatchSampler(10, 4, seed=3, start_step=0, num_steps=8))
    tail = list(StepBatchSampler(10, 4, seed=3, start_step=5, num_steps=3))
    assert tail == full[5:]
    flat = [k for batch in full for k in batch]
    assert all(len(b) == 4 for b in full)
    # each epoch is a permutation of the dataset; batches run across epoch boundaries
    for epoch in range(3):
        assert sorted(i for i, e in flat if e == epoch) == list(range(10))
    assert full != list(StepBatchSampler(10, 4, seed=4, num_steps=8))
    with pytest.raises(ValueError, match="empty dataset"):
        StepBatchSampler(0, 4, seed=0)


def test_ema_update_math():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = min(0.9, 2 / 11)  # ramp: (1 + n) / (10 + n) with n = 1
    for p0, pe, pm in zip(start, ema.model.parameters(), model.parameters()):
        assert torch.allclose(pe, d * p0 + (1 - d) * pm)
    for _ in range(100):
        ema.update(model)
    for pe, pm in zip(ema.model.parameters(), model.parameters()):
        assert torch.allclose(pe, pm, atol=1e-4)
    assert not any(p.requires_grad for p in ema.model.parameters())


# --------------------------------------------------------------------------------------------
# training from files (folders, tar shards) through dito_fast.data.make_loader


@pytest.fixture
def photo_shards(photo_dir, tar_pattern):
    """12 real photographs (32-64 px) as a folder and as 2 webdataset tar shards."""
    return str(photo_dir[0]), tar_pattern


def test_exact_resume_from_tar_shards(make_run_config, tmp_path, photo_shards):
    # 12 samples: 2 held out for validation, 10 trained on in batches of 2 (5 steps per epoch);
    # the checkpoint at step 3 is mid-epoch, the run crosses into epoch 1
    cfg = make_run_config(steps=7, checkpoint_every_steps=3)
    cfg.data.source, cfg.data.loader = photo_shards[1], "torch"
    full = train(cfg, tmp_path / "full", progress=False)
    assert len(full.losses) == 7
    (tmp_path / "cut").mkdir()
    part_cfg = make_run_config(steps=3)
    part_cfg.data.source, part_cfg.data.loader = photo_shards[1], "torch"
    part = train(part_cfg, tmp_path / "cut", progress=False)
    assert part.losses == full.losses[:3]
    rest = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert rest.losses == full.losses[3:]
    assert _state_equal(rest.model, full.model)
    assert _metrics(tmp_path / "full")[0]["skipped_files"] == 0


def test_resume_keeps_counting_files_found_unreadable(make_run_config, tmp_path, photo_dir):
    # A PNG whose pixel data is corrupt passes the header check and is found while reading. The
    # resumed run had forgotten it (skipped_files dropped back to 0 until it was met again).
    from data_helpers import corrupt_middle
    from PIL import Image

    d = tmp_path / "photos"
    shutil.copytree(photo_dir[0], d)
    bad = d / "objects" / "zz_corrupt.png"  # a middle file: the first and last are held out for validation
    Image.open(photo_dir[1][11][0]).convert("RGB").save(bad)
    bad.write_bytes(corrupt_middle(bad.read_bytes()))
    # 13 files, 2 held out: 11 trained on in batches of 2, so the first 6 steps read every one
    cfg = make_run_config(steps=8, checkpoint_every_steps=6)
    cfg.data.source, cfg.data.loader = str(d), "torch"
    train(cfg, tmp_path / "full", progress=False)
    full = {m["step"]: m["skipped_files"] for m in _metrics(tmp_path / "full") if "skipped_files" in m}
    assert full[6] == full[8] == 1
    state = ckpt.load_torch(tmp_path / "full" / "checkpoints" / "step_00000006" / "state.pt")
    assert [os.path.basename(name) for name, _ in state["unreadable_files"]] == ["zz_corrupt.png"]
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "step_00000008")
    train(cfg, tmp_path / "full", resume=True, progress=False)
    resumed = [m["skipped_files"] for m in _metrics(tmp_path / "full") if "skipped_files" in m and m["step"] > 6]
    assert resumed == [1, 1]


def test_unreadable_validation_file_is_counted(make_run_config, tmp_path, photo_dir):
    # a held-out file that fails to decode was left out of both sets without being counted
    from data_helpers import corrupt_middle
    from PIL import Image

    from dito_fast.train.trainer import build_datasets

    d = tmp_path / "photos"
    shutil.copytree(photo_dir[0], d)
    bad = d / "people" / "zz_corrupt.png"  # the last file: held out for validation
    Image.open(photo_dir[1][11][0]).convert("RGB").save(bad)
    bad.write_bytes(corrupt_middle(bad.read_bytes()))
    cfg = make_run_config()
    cfg.data.source = str(d)
    train_ds, val = build_datasets(cfg)
    assert len(val) == 1 and len(train_ds) == 11
    assert [os.path.basename(name) for name, _ in train_ds.skipped] == ["zz_corrupt.png"]


def test_train_with_dali_loader(make_run_config, tmp_path, photo_shards):
    from dito_fast.data import dali_status

    if not dali_status()[0]:
        pytest.skip("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    for name, src in (("folder", photo_shards[0]), ("tar", photo_shards[1])):
        cfg = make_run_config(steps=2)
        cfg.data.source, cfg.data.loader, cfg.data.memory_format = src, "dali", "channels_last"
        result = train(cfg, tmp_path / name, progress=False)
        assert result.step == 2 and all(math.isfinite(l) for _, l in result.losses)


def test_channels_last_training_follows_the_contiguous_run(make_run_config, tmp_path):
    """data.memory_format=channels_last trains on channels_last batches, the parameters kept in the
    default layout (a channels_last parameter would make the fused AdamW copy it twice a step):
    the same losses as the NCHW run up to rounding, exported weights that load anywhere, and an
    exact resume."""
    base = make_run_config(steps=4, checkpoint_every_steps=2)
    cl = apply_overrides(base, {"data.memory_format": "channels_last"})
    ref = train(base, tmp_path / "nchw", progress=False)
    run = train(cl, tmp_path / "cl", progress=False)
    assert all(p.is_contiguous() for p in run.raw_model.parameters())
    assert [l for _, l in run.losses] == pytest.approx([l for _, l in ref.losses], rel=1e-4)
    assert max(float((a - b).abs().max()) for a, b in zip(run.model.state_dict().values(),
                                                           ref.model.state_dict().values())) < 1e-4
    # the exported model is stored contiguous and loads into a plain model
    loaded = DiTo.from_pretrained(tmp_path / "cl" / "model")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), run.model.state_dict().values()))
    # resume from step 2 of the channels_last run: exactly the same continuation
    rest = train(cl, tmp_path / "cl2", resume=str(tmp_path / "cl" / "checkpoints" / "step_00000002"), progress=False)
    assert rest.losses == run.losses[2:]


def test_a_second_trainer_on_the_same_folder_is_refused(make_run_config, tmp_path):
    """Rank 0 holds an exclusive lock on the run folder for the whole run: a second training
    process on it (a job relaunched while the first still runs) is refused before it touches
    anything (it had rewritten the first one's metrics and deleted its half-written checkpoint);
    the lock goes with the run, so the next run on the folder starts."""
    import fcntl

    cfg = make_run_config(steps=1, checkpoint_every_steps=0, val_every_steps=0)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as held:  # another process's lock (flock locks are per open file)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        with pytest.raises(BlockingIOError, match=r"in use by another training process \(pid 4242 on elsewhere\)"):
            train(cfg, run, progress=False)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    assert train(cfg, run, progress=False).step == 1
    assert train(make_run_config(steps=2, checkpoint_every_steps=0, val_every_steps=0), run, resume=True,
                 progress=False).step == 2  # (released at the end of the first run)
    with pytest.raises(NotADirectoryError, match="is a file"):
        train(cfg, run / "config.json", progress=False)


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path):
    """A DataLoader worker forked while the run holds its lock shares the lock's open file: the
    child closes its copy, so the run's folder is free once the trainer itself is gone (an
    orphaned worker had held it until it noticed, keeping a torchrun restart out)."""
    import fcntl
    import multiprocessing

    from dito_fast.train import trainer as trainer_mod

    lock, busy = trainer_mod._lock_run(tmp_path / "run")
    assert busy is None
    fork = multiprocessing.get_context("fork")
    running = fork.Event()
    child = fork.Process(target=time_sleep, args=(30, running))
    child.start()
    try:
        assert running.wait(30)  # (the fork's hooks have run in the child)
        trainer_mod._HELD_LOCKS.remove(lock)
        lock.close()  # the trainer's end (a SIGKILL closes it the same way)
        with open(tmp_path / "run" / ".lock", "a+") as again:
            fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the child held a copy
    finally:
        child.kill()
        child.join()


def time_sleep(seconds, running):
    import time

    running.set()
    time.sleep(seconds)


def test_a_run_inside_its_data_folder_is_refused(make_run_config, tmp_path, photo_dir):
    root, _ = photo_dir
    data = tmp_path / "data"
    shutil.copytree(root, data)
    cfg = apply_overrides(make_run_config(steps=1), {"data.source": str(data)})
    with pytest.raises(ValueError, match="is inside the data folder"):
        train(cfg, data / "runs" / "a", progress=False)
    assert not (data / "runs" / "a" / "config.json").exists()


def test_resume_refuses_a_renamed_model_and_names_a_damaged_config(make_run_config, tmp_path):
    cfg = make_run_config(steps=2, checkpoint_every_steps=1, val_every_steps=0)
    train(cfg, tmp_path / "a", progress=False)
    step1 = tmp_path / "a" / "checkpoints" / "step_00000001"
    renamed = apply_overrides(cfg, {"model.name": "dito-S"})  # the tiny weights would be labelled dito-S
    with pytest.raises(ValueError, match="model.name '.*' -> 'dito-S'"):
        train(renamed, tmp_path / "b", resume=str(step1), progress=False)
    step2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    (step2 / "state.pt").write_bytes((step2 / "state.pt").read_bytes()[:100])  # cut short
    with pytest.raises(ValueError, match=f"cannot read checkpoint state .*; the checkpoint before it, {step1}, is "
                                         f"complete: move {step2} out of .* and --resume again, or --resume {step1} "
                                         "--out <another folder>"):
        train(make_run_config(steps=3, checkpoint_every_steps=1, val_every_steps=0), tmp_path / "a", resume=True,
              progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(step1, broken)
    (broken / "config.json").write_text('{"model": {,}')
    with pytest.raises(ValueError, match=f"cannot read the checkpoint's config {broken / 'config.json'}"):
        train(cfg, tmp_path / "c", resume=str(broken), progress=False)


def test_a_stop_requested_during_a_checkpoint_stops_at_that_step(make_run_config, tmp_path, monkeypatch):
    """A SIGTERM (request_stop) that arrives while a periodic checkpoint is written ends the run at
    that step, whose checkpoint is the last: not one more step and a second checkpoint (a
    preemption's grace period is short)."""
    from dito_fast.train import request_stop
    from dito_fast.train import trainer as trainer_mod

    real = trainer_mod.ckpt.commit_checkpoint

    def commit(run_dir, step, tmp):
        if step == 2:
            request_stop()
        return real(run_dir, step, tmp)

    monkeypatch.setattr(trainer_mod.ckpt, "commit_checkpoint", commit)
    cfg = make_run_config(steps=6, checkpoint_every_steps=2, val_every_steps=0)
    run = train(cfg, tmp_path / "run", progress=False)
    assert run.stopped_early == "requested" and run.step == 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_a_killed_save_leaves_nothing_the_next_save_keeps(make_run_config, tmp_path):
    """save_pretrained removes what an earlier save killed midway left in the model folder (its
    own temporary names only), and safetensors' own temporary file goes inside a folder of ours."""
    model = DiTo(make_run_config().model)
    out = tmp_path / "model"
    out.mkdir()
    (out / ".model.safetensors.ab12cd34.tmp").write_bytes(b"")
    (out / ".model.safetensors.ef56gh78.tmpdir").mkdir()
    (out / ".model.safetensors.ef56gh78.tmpdir" / ".tmpXyZ123").write_bytes(b"x" * 1000)
    (out / ".config.json.zz99yy88.tmp").write_text("{")
    (out / ".tmpKeep00").write_bytes(b"not ours")  # another program's: kept
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == [".tmpKeep00", "config.json", "model.safetensors"]


def test_a_resume_on_changed_data_says_so(make_run_config, tmp_path, photo_dir, caplog):
    """A checkpoint records its training set's sample count and a digest of the names and labels;
    resuming on a folder that gained a file warns (the batches then differ from an uninterrupted
    run's); the same folder moved elsewhere does not."""
    from PIL import Image

    d = tmp_path / "photos"
    shutil.copytree(photo_dir[0], d)
    cfg = make_run_config(steps=2, checkpoint_every_steps=1, val_every_steps=0)
    cfg.data.source, cfg.data.loader = str(d), "torch"
    train(cfg, tmp_path / "run", progress=False)
    state = ckpt.load_torch(tmp_path / "run" / "checkpoints" / "step_00000002" / "state.pt")
    assert state["data"]["samples"] == 10 and len(state["data"]["digest"]) == 16  # 12 photos, 2 held out
    moved = tmp_path / "elsewhere" / "photos"
    shutil.move(d, moved)
    with caplog.at_level(logging.WARNING, logger="dito_fast.train"):
        train(_with_source(make_run_config(steps=3, checkpoint_every_steps=1, val_every_steps=0), moved),
              tmp_path / "run", resume=True, progress=False)
    assert "training data changed" not in caplog.text
    Image.open(photo_dir[1][0][0]).convert("RGB").save(moved / "objects" / "new.png")
    with caplog.at_level(logging.WARNING, logger="dito_fast.train"):
        train(_with_source(make_run_config(steps=4, checkpoint_every_steps=1, val_every_steps=0), moved),
              tmp_path / "run", resume=True, progress=False)
    assert "the training data changed since" in caplog.text and "(10 samples then, 11 now)" in caplog.text
    assert [e["samples_now"] for e in _events(tmp_path / "run") if e["event"] == "data_changed"] == [11]


def _with_source(cfg, folder):
    cfg.data.source, cfg.data.loader = str(folder), "torch"
    return cfg
