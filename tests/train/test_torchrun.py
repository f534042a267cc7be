"""Multi-process training through torchrun on this machine: gloo backend, 2 CPU processes of one
thread each, rendezvous on loopback (``--standalone``). Each launch takes ~10 s of start-up.

All runs train the micro model of tests/conftest.py on 32x32 synthetic images, global batch 4,
AdamW lr 1e-3. Tolerances (2 processes vs 1): losses 1e-5 relative; weights 2e-4 absolute
after 6 steps (measured: 5e-8 and 1.2e-5). The runs differ only in floating-point summation
order (per-rank partial sums, then the all-reduce), and AdamW's normalisation lets such rounding
reach the weights at a small fraction of one step (a step moves a weight by up to ~lr = 1e-3);
the same run with other noise is checked to differ by far more than the tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import micro_run_config
from dito_fast.config import to_dict
from dito_fast.models.dito import DiTo
from dito_fast.testing import run_process_tree
from dito_fast.train import checkpoint as ckpt
from dito_fast.train import parallel, train
from dito_fast.train.distributed import FAULT_ENV, DistContext
from dito_fast.train.parallel import ParallelModel

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(),
                                                   reason="torch.distributed is not available")]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
G, STEPS = 4, 6
BASE = dict(steps=STEPS, batch_size=G, checkpoint_every_steps=2, threads=1)
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-4


def _torchrun(args, nproc=2, max_restarts=0, env=None, timeout=150) -> subprocess.CompletedProcess:
    """torchrun's result; on a timeout torchrun and its workers are killed (returncode -9)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", *map(str, args)]
    full_env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    # PYTHONFAULTHANDLER: a worker that crashes (SIGSEGV) prints its Python stack (see _ok)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})})
    return run_process_tree(cmd, timeout=timeout, cwd=REPO, env=full_env)


def _ok(proc: subprocess.CompletedProcess) -> None:
    # a crashed worker's stack (faulthandler) first: the other ranks' tracebacks would push it
    # out of the tail
    crash = proc.stderr.find("Fatal Python error")
    crash_part = proc.stderr[crash:crash + 4000] + "\n...\n" if crash >= 0 else ""
    assert proc.returncode == 0, (f"torchrun failed ({proc.returncode}; -9: killed at the timeout):\n"
                                  f"{proc.stdout[-2000:]}\n{crash_part}{proc.stderr[-6000:]}")


def _losses(run_dir) -> list[tuple[int, float]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _events(run_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "events.jsonl").read_text().splitlines()]


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, the same global batch, in this process."""
    out = tmp_path_factory.mktemp("one")
    train(micro_run_config(**BASE), out, progress=False)
    return out


@pytest.fixture(scope="module")
def two_process_ddp(tmp_path_factory):
    """2 processes, DDP, uninterrupted; the worker checks the replicas by all-gather."""
    out = tmp_path_factory.mktemp("ddp2")
    _ok(_torchrun([WORKER, out, json.dumps(BASE)]))
    return out


# --------------------------------------------------------------------------------------------
# DDP: 2 processes follow 1 process


def test_two_processes_match_one_process(one_process, two_process_ddp, tmp_path, monkeypatch):
    reports = [json.loads((two_process_ddp / f"rank{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert rep["world_size"] == 2 and rep["step"] == STEPS and rep["images_seen"] == STEPS * G
        assert rep["replica_max_difference"] == 0.0  # all-gathered parameters: identical on both ranks
    assert reports[0]["losses"] == reports[1]["losses"]  # every rank saw the global loss

    ref, two = _losses(one_process), _losses(two_process_ddp)
    assert [s for s, _ in two] == list(range(1, STEPS + 1))
    assert [l for _, l in two] == pytest.approx([l for _, l in ref], rel=LOSS_RTOL)
    diff = _max_diff(_weights(one_process, STEPS), _weights(two_process_ddp, STEPS))
    ema = _max_diff(DiTo.from_pretrained(one_process / "model").state_dict(),
                    DiTo.from_pretrained(two_process_ddp / "model").state_dict())
    assert diff < WEIGHT_ATOL and ema < WEIGHT_ATOL, (diff, ema)

    # the tolerance is discriminative: the same run with other noise (same init, same images)
    # moves the weights ~40x further (8e-3 here; the 2-process run differs by ~1e-5)
    monkeypatch.setattr(parallel, "NOISE_TAG", parallel.NOISE_TAG + 1)
    train(micro_run_config(**BASE), tmp_path / "other_noise", progress=False)
    assert _max_diff(_weights(one_process, STEPS), _weights(tmp_path / "other_noise", STEPS)) > 10 * WEIGHT_ATOL

    # rank 0 alone wrote files, with the per-rank throughput
    rec = [r for r in map(json.loads, (two_process_ddp / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    assert len(rec["images_per_s_per_rank"]) == 2 and rec["world_size"] == 2
    assert rec["images_per_s"] == pytest.approx(G / rec["step_time_s"])
    assert [e["event"] for e in _events(two_process_ddp)] == ["start", "checkpoint", "checkpoint", "checkpoint", "done"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_uneven_shares_with_micro_batches(mode, tmp_path):
    """Global batch 3 over 2 ranks (shares of 1 and 2 samples), micro-batches of 1 sample: still
    the 1-process trajectory. Under FSDP the rank with one sample runs a zero-weight padding pass
    so both ranks run the same collectives."""
    overrides = {"steps": 3, "batch_size": 3, "threads": 1, "micro_batch_size": 1, "parallel": mode}
    _ok(_torchrun([WORKER, tmp_path / "two", json.dumps(overrides)]))
    ref = train(micro_run_config(steps=3, batch_size=3), tmp_path / "one", progress=False)
    assert [l for _, l in _losses(tmp_path / "two")] == pytest.approx([l for _, l in ref.losses], rel=LOSS_RTOL)
    assert _max_diff(DiTo.from_pretrained(tmp_path / "two" / "model").state_dict(),
                     ref.model.state_dict()) < WEIGHT_ATOL
    rep = json.loads((tmp_path / "two" / "rank1.json").read_text())
    assert rep["images_seen"] == 9 and rep["replica_max_difference"] in (0.0, None)
    assert json.loads((tmp_path / "two" / "events.jsonl").read_text().splitlines()[0])["micro_batches"] == \
        ([1] if mode == "ddp" else [1, 1])


# --------------------------------------------------------------------------------------------
# fault tolerance


def test_worker_failure_restarts_and_resumes(two_process_ddp, tmp_path):
    """`python -m dito_fast.train` under torchrun --max-restarts=1; rank 1 os._exit()s after step 3
    (checkpoints at 2, 4, 6). torchrun restarts both workers, which resume from step 2 (a
    restart of the same job resumes by itself) and finish: same steps, images and weights as
    the uninterrupted run; steps 1-2 ran once, step 3 twice (it was after the last
    checkpoint), steps 4-6 once."""
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(to_dict(micro_run_config(**BASE))))
    out = tmp_path / "run"
    proc = _torchrun(["-m", "dito_fast.train", "--config", cfg_file, "--out", out], max_restarts=1,
                     env={FAULT_ENV: "after_step:3:1"})
    _ok(proc)
    assert "fault injection" in proc.stderr and "exits at after_step of step 3" in proc.stderr
    events = _events(out)
    # rank 0 logs its own end ("failed", step 3) when its peer's death reaches it as a collective
    # error before torchrun's SIGTERM does (which ends it without a word): either may come first
    ended = [e for e in events if e["event"] in ("failed", "interrupted")]
    assert [(e["event"], e["attempt"], e["step"]) for e in ended] in ([], [("failed", 0, 3)]), ended
    events = [e for e in events if e not in ended]
    assert [(e["event"], e["attempt"], e.get("step")) for e in events] == [
        ("start", 0, 0), ("checkpoint", 0, 2),
        ("resume", 1, 2), ("checkpoint", 1, 4), ("checkpoint", 1, 6), ("done", 1, 6)]
    assert events[2]["checkpoint"] == "step_00000002"
    assert events[-1]["images_seen"] == STEPS * G
    state = ckpt.load_torch(out / "checkpoints" / f"step_{STEPS:08d}" / "state.pt")
    assert state["step"] == STEPS and state["images_seen"] == STEPS * G and state["ema_updates"] == STEPS
    # the log holds every step once (lines past the checkpoint were dropped at the resume)
    assert _losses(out) == _losses(two_process_ddp)
    assert _max_diff(_weights(out, STEPS), _weights(two_process_ddp, STEPS)) == 0
    assert _max_diff(DiTo.from_pretrained(out / "model").state_dict(),
                     DiTo.from_pretrained(two_process_ddp / "model").state_dict()) == 0


def test_skipped_files_count_every_rank(tmp_path):
    """Files found unreadable while reading (no up-front check) are counted over all ranks in the
    training log, not rank 0's alone: 20 PNGs, 6 cut short, 6 steps of 4 over 2 ranks (every file
    is read in the first 5 steps)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    bad = {i for i in range(20) if i % 3 == 1}
    for i in range(20):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
        if i in bad:
            path.write_bytes(path.read_bytes()[:60])
    out = tmp_path / "run"
    overrides = {**BASE, "checkpoint_every_steps": 0, "val_images": 0,
                 "data": {"source": str(folder), "check_files": "none", "loader": "torch", "workers": 0}}
    _ok(_torchrun([WORKER, out, json.dumps(overrides)]))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [r["skipped_files"] for r in rows if "skipped_files" in r]
    assert counts[-1] == len(bad) and counts == sorted(counts)


def test_a_rank_with_other_settings_stops_the_job(tmp_path):
    """Rank 1 started with another seed (another node's command line): every rank refuses before
    training, naming the setting; it had trained on (other data on rank 1) and exited 0."""
    out = tmp_path / "run"
    proc = _torchrun([WORKER, out, json.dumps({**BASE, "rank_overrides": {"1": {"seed": 7}}})])
    assert proc.returncode != 0
    assert "different settings (train.seed: rank 0 0, rank 1 7)" in proc.stderr
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()


def test_ranks_that_find_other_samples_stop_the_job(tmp_path):
    """Rank 1 screens the files otherwise (data.check_files is a node's own setting; GIFs are kept
    with "none" only): 12 samples on one rank and 13 on the other had trained on without a word
    (other shuffles, samples repeated within an epoch); every rank refuses, naming the counts."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(13):
        Image.new("RGB", (36, 36), (20 * i, 40, 90)).save(folder / f"img{i:02d}.{'gif' if i == 0 else 'png'}")
    data = {"source": str(folder), "loader": "torch", "workers": 0}
    overrides = {**BASE, "val_images": 0, "data": {**data, "check_files": "header"},
                 "rank_overrides": {"1": {"data": {**data, "check_files": "none"}}}}
    proc = _torchrun([WORKER, tmp_path / "run", json.dumps(overrides)])
    assert proc.returncode != 0
    assert "the ranks found different training samples (rank 0: 12 samples" in proc.stderr
    assert "rank 1: 13 samples" in proc.stderr


# --------------------------------------------------------------------------------------------
# FSDP: sharded checkpoints, a kill while writing one, resume at another world size

FSDP_STEPS = 4


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 processes, FSDP, checkpoints at 2 and 4; rank 0 dies after writing step 4's shards and
    state but before committing the checkpoint; torchrun restarts the job (attempt 1), which
    resumes from step 2 and finishes."""
    out = tmp_path_factory.mktemp("fsdp2")
    overrides = {**BASE, "steps": FSDP_STEPS, "parallel": "fsdp"}
    proc = _torchrun([WORKER, out, json.dumps(overrides)], max_restarts=1, env={FAULT_ENV: "checkpoint_write:4:0"})
    _ok(proc)
    assert "exits at checkpoint_write of step 4" in proc.stderr
    return out


def test_kill_during_sharded_checkpoint_write_resumes_previous(fsdp_run, one_process):
    events = _events(fsdp_run)
    assert [(e["event"], e["attempt"], e.get("step")) for e in events] == [
        ("start", 0, 0), ("checkpoint", 0, 2), ("resume", 1, 2), ("checkpoint", 1, 4), ("done", 1, 4)]
    assert events[2]["checkpoint"] == "step_00000002"  # the interrupted step-4 checkpoint was not picked
    assert not list((fsdp_run / "checkpoints").glob(".step_*.tmp"))  # and its remains were pruned
    # FSDP follows the 1-process run
    assert [l for _, l in _losses(fsdp_run)] == pytest.approx([l for _, l in _losses(one_process)[:FSDP_STEPS]],
                                                              rel=LOSS_RTOL)


def test_fsdp_checkpoint_saved_by_two_loads_in_one(fsdp_run, one_process, tmp_path):
    step4 = fsdp_run / "checkpoints" / f"step_{FSDP_STEPS:08d}"
    assert ckpt.checkpoint_format(step4) == "dcp"
    assert {p.name for p in (step4 / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    state = ckpt.load_torch(step4 / "state.pt")
    assert state["world_size"] == 2 and state["images_seen"] == FSDP_STEPS * G
    # load the 2-rank shards into one unsharded model: the EMA equals the exported (gathered) model
    cfg = micro_run_config(**BASE)
    model, ema = DiTo(cfg.model), DiTo(cfg.model)
    pm = ParallelModel(model, ema, "single", DistContext(), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, fused=True)
    pm.load_sharded(step4 / "dcp", opt, state["optimizer_param_groups"])
    assert _max_diff(ema.state_dict(), DiTo.from_pretrained(fsdp_run / "model").state_dict()) == 0
    # ... and the trained weights match the 1-process run's at that step
    assert _max_diff(model.state_dict(), _weights(one_process, FSDP_STEPS)) < WEIGHT_ATOL
    # resume the 2-rank checkpoint of step 2 on one process: it continues the same run
    one = train(micro_run_config(**{**BASE, "steps": FSDP_STEPS, "parallel": "fsdp"}), tmp_path / "w1",
                resume=str(fsdp_run / "checkpoints" / "step_00000002"), progress=False)
    assert [l for _, l in one.losses] == pytest.approx([l for _, l in _losses(fsdp_run)[2:]], rel=LOSS_RTOL)
    assert _max_diff(one.model.state_dict(), ema.state_dict()) < WEIGHT_ATOL


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_restart_after_a_failed_set_up_still_resumes_by_itself(tmp_path, monkeypatch):
    """torchrun's environment emulated in this process (one worker, gloo): attempt 0 fails while
    building its data (a transient mount error), attempt 1 trains and crashes after its step-2
    checkpoint, attempt 2, started like the others without --resume, resumes from that checkpoint.
    The job marker must be written before the set-up that can fail (it had been moved after the
    data build, and attempt 2 then refused the folder as another run's)."""
    from dito_fast.train import trainer as trainer_mod

    from test_trainer import _OnRead, _simulated_crash  # the crash tests' helpers

    out, cfg = tmp_path / "run", micro_run_config(steps=6, checkpoint_every_steps=2, threads=1)
    real_build = trainer_mod.build_datasets

    def attempt(n: int, build):
        monkeypatch.setattr(trainer_mod, "build_datasets", build)
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port()), "TORCHELASTIC_RUN_ID": "job-7",
                           "TORCHELASTIC_RESTART_COUNT": str(n)}.items():
            monkeypatch.setenv(key, value)
        return train(cfg, out, resume=False, progress=False)

    def no_data(c):
        raise OSError("simulated transient data-mount error")

    def crash_at_step_4(c):
        ds, val = real_build(c)
        return _OnRead(ds, 2 * 3 + 1, _simulated_crash), val

    with pytest.raises(OSError, match="data-mount"):
        attempt(0, no_data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        attempt(1, crash_at_step_4)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002"]
    result = attempt(2, real_build)
    assert result.step == 6
    assert [(e["event"], e["attempt"]) for e in _events(out) if e["event"] in ("start", "resume")] == [
        ("start", 1), ("resume", 2)]
