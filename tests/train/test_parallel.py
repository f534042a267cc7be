"""In-process tests of the data-parallel machinery (dito_fast/train/parallel.py, distributed.py):
global-batch shares and micro-batches, per-sample noise (the basis of the 1-vs-N-process
equivalence), gradient accumulation, the DCP checkpoint format on one process, the restricted
DCP metadata reader, fault injection during a checkpoint write, restart detection.

The multi-process tests (torchrun, gloo) are in test_torchrun.py.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch

from conftest import MICRO_CLI_SETS
from dito_fast.config import FlowConfig, RunConfig, validate_run_config
from dito_fast.diffusion import flow
from dito_fast.models.dito import DiTo
from dito_fast.train import checkpoint as ckpt
from dito_fast.train import distributed, parallel, train
from dito_fast.train.distributed import DistContext
from dito_fast.train.parallel import (ParallelModel, TrainStep, find_micro_batch, micro_batch_sizes, plan_batches,
                                      sample_seeds)
from dito_fast.train.trainer import _resume_point

REPO = Path(__file__).resolve().parents[2]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --------------------------------------------------------------------------------------------
# shares, micro-batches, seeds


def test_micro_batch_sizes():
    assert micro_batch_sizes(8) == [8]
    assert micro_batch_sizes(8, micro_batch_size=3) == [3, 3, 2]
    assert micro_batch_sizes(7, micro_batch_size=2) == [2, 2, 2, 1]
    assert micro_batch_sizes(5, grad_accum_steps=3) == [2, 2, 1]
    assert micro_batch_sizes(2, grad_accum_steps=4) == [1, 1]  # never an empty micro-batch
    for n in range(1, 30):
        for m in range(1, 9):
            sizes = micro_batch_sizes(n, micro_batch_size=m)
            assert sum(sizes) == n and max(sizes) <= m and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least one sample"):
        micro_batch_sizes(0)


def test_plan_batches_cover_the_global_batch():
    G, W = 10, 4
    plans = [plan_batches(G, r, W) for r in range(W)]
    assert [(p.start, p.stop) for p in plans] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert all(p.slots == p.share and p.scale == W / G for p in plans)
    # FSDP: every rank runs the same passes (the largest share), padding the smaller shares
    eq = [plan_batches(G, r, W, micro_batch_size=2, equal_passes=True) for r in range(W)]
    assert {p.micro for p in eq} == {(2, 1)} and all(p.slots == 3 for p in eq)


def test_sample_seeds_depend_on_step_and_global_index_only():
    assert sample_seeds(0, 5, 2, 4) == sample_seeds(0, 5, 0, 4)[2:]
    assert len(set(sample_seeds(0, 5, 0, 64))) == 64
    assert sample_seeds(0, 5, 0, 4) != sample_seeds(0, 6, 0, 4) != sample_seeds(1, 5, 0, 4)


def test_find_micro_batch_halves_on_out_of_memory():
    tried = []

    def try_step(m):
        tried.append(m)
        if m > 3:
            raise torch.OutOfMemoryError("fake")

    assert find_micro_batch(try_step, 13) == 2 and tried == [13, 7, 4, 2]
    with pytest.raises(torch.OutOfMemoryError):
        find_micro_batch(lambda m: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), 4)


# --------------------------------------------------------------------------------------------
# per-sample noise: a sample's draws do not depend on the batch around it


@pytest.mark.parametrize("flow_cfg", [FlowConfig(), FlowConfig(noise_sync_prob=0.5, time_sampling="logit_normal")],
                         ids=["default", "noise_sync+logit_normal"])
def test_per_sample_draws_are_split_invariant(flow_cfg):
    seeds = sample_seeds(3, 7, 0, 5)
    whole = flow.draw_per_sample(seeds, (3, 8, 8), (4, 1, 1), flow_cfg)
    parts = [flow.draw_per_sample(seeds[a:b], (3, 8, 8), (4, 1, 1), flow_cfg) for a, b in ((0, 2), (2, 3), (3, 5))]
    for key, value in whole.items():
        if value is None:
            assert flow_cfg.noise_sync_prob == 0 and key.startswith("sync")
            continue
        assert torch.equal(value, torch.cat([p[key] for p in parts])), key
    assert whole["noise"].shape == (5, 3, 8, 8) and whole["time"].shape == (5,)


def test_train_step_losses_do_not_depend_on_the_split(micro_model):
    """The per-sample losses of 4 images computed as one batch or as two micro-batches agree to
    rounding: what a 2-rank run computes is what a 1-rank run computes."""
    micro_model.config.flow.noise_sync_prob = 0.5
    step = TrainStep(micro_model)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seeds = sample_seeds(0, 3, 0, 4)
    with torch.no_grad():
        whole = step(x, seeds)
        split = torch.cat([step(x[:2], seeds[:2]), step(x[2:], seeds[2:])])
        other = step(x, sample_seeds(0, 4, 0, 4))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, whole, rtol=1e-3)  # other noise, other losses


def test_flow_loss_with_draws_matches_generator_path_formulas():
    """flow_matching_loss(draws=...) applies the same formulas as the generator path: fed the
    draws the generator path makes (batch of one, same generator), the losses are equal."""
    cfg = FlowConfig(noise_sync_prob=1.0)
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    z = torch.randn(1, 4, 1, 1)
    dec = lambda x_t, t, zz: x_t * 0.5 + zz.mean()  # noqa: E731
    loss_g, info_g = flow.flow_matching_loss(dec, x, z, cfg, torch.Generator().manual_seed(9))
    draws = flow.draw_per_sample([9], (3, 4, 4), (4, 1, 1), cfg)
    loss_d, info_d = flow.flow_matching_loss(dec, x, z, cfg, draws=draws)
    assert torch.equal(loss_g, loss_d) and torch.equal(info_g["t"], info_d["t"])
    with pytest.raises(ValueError, match="draws are for images"):
        flow.flow_matching_loss(dec, torch.zeros(2, 3, 4, 4), z.repeat(2, 1, 1, 1), cfg, draws=draws)


# --------------------------------------------------------------------------------------------
# gradient accumulation (one process)


@pytest.mark.parametrize("setting", [{"micro_batch_size": 1}, {"grad_accum_steps": 3}], ids=["micro1", "accum3"])
def test_gradient_accumulation_matches_one_pass(make_run_config, tmp_path, setting):
    """Global batch 4 in one pass vs in micro-batches (4 x 1, or 2 + 1 + 1): the same losses and
    weights up to summation order. Tolerance: losses 1e-5 relative; weights 1e-4 absolute after
    3 AdamW steps of lr 1e-3 (a step moves a weight by up to ~1e-3; rounding differences in the
    gradient reach the weights through Adam's normalisation)."""
    base = dict(steps=3, batch_size=4, ema_decay=0.0)
    one = train(make_run_config(**base), tmp_path / "one", progress=False)
    acc = train(make_run_config(**base, **setting), tmp_path / "acc", progress=False)
    la, lb = [l for _, l in one.losses], [l for _, l in acc.losses]
    assert la == pytest.approx(lb, rel=1e-5)
    assert _max_diff(one.model.state_dict(), acc.model.state_dict()) < 1e-4
    assert _metrics(tmp_path / "acc")[0]["images_seen"] == 4


def test_parallel_settings_are_validated(make_run_config):
    for key, value, match in (("parallel", "zero3", "train.parallel"), ("dist_backend", "tcp", "dist_backend"),
                              ("grad_accum_steps", 0, "grad_accum_steps"),
                              ("micro_batch_size", -1, "micro_batch_size")):
        cfg = make_run_config(**{key: value})
        with pytest.raises(ValueError, match=match):
            validate_run_config(cfg)
    with pytest.raises(ValueError, match="not both"):
        validate_run_config(make_run_config(micro_batch_size=2, grad_accum_steps=2))
    assert RunConfig().train.parallel == "ddp" and RunConfig().train.dist_backend == "auto"


def test_backend_and_device_resolution():
    assert distributed.resolve_backend("auto", "cpu") == "gloo"
    assert distributed.resolve_backend("auto", "cuda") == "nccl"
    assert distributed.resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        distributed.resolve_backend("nccl", "cpu")
    with pytest.raises(ValueError, match="dist_backend"):
        distributed.resolve_backend("tcp", "cpu")
    assert distributed.rank_device("cpu", 1, True) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.rank_device("cuda", 0, True)


def test_single_process_context(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    ctx, dev = distributed.setup("auto", "cpu")
    assert ctx == DistContext() and not ctx.distributed and ctx.is_main and dev == torch.device("cpu")
    t = torch.ones(2)
    assert distributed.all_reduce_(t, ctx) is t and distributed.broadcast_object({"a": 1}, ctx) == {"a": 1}
    assert distributed.all_gather_rows([1.0, 2.0], ctx, dev) == [[1.0, 2.0]]
    assert distributed.replicas_agree(torch.nn.Linear(2, 2), ctx)
    distributed.barrier(ctx)
    distributed.teardown(ctx)


class _Wrapper:
    """Stands in for a DDP wrapper: module hooks put such objects in reference cycles."""

    def __init__(self):
        self.me = self


def test_teardown_frees_unreachable_wrappers_before_destroying_the_group(monkeypatch):
    # A DDP reducer that outlives the group destroys it holding the GIL and can deadlock with
    # gloo's worker threads at exit, so teardown must collect such garbage first.
    alive_at_destroy = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: alive_at_destroy.append(ref() is not None))
    was_enabled = gc.isenabled()
    gc.disable()  # only teardown's own collection may free the cycle
    try:
        ref = weakref.ref(_Wrapper())
        assert ref() is not None
        distributed.teardown(DistContext(world_size=2, backend="gloo", owns_group=True))
    finally:
        if was_enabled:
            gc.enable()
    assert alive_at_destroy == [False]


@pytest.mark.parametrize("chained", [False, True])
@pytest.mark.parametrize("owns_group", [True, False])
def test_failed_run_releases_its_locals_before_teardown(monkeypatch, make_run_config, tmp_path, chained,
                                                        owns_group):
    from dito_fast.train import trainer

    ctx = DistContext(world_size=2, backend="gloo", owns_group=owns_group)
    alive_at_teardown = []

    def step():
        wrapper = _Wrapper()
        wrapper.me = None  # no cycle: only this frame holds it
        refs.append(weakref.ref(wrapper))
        raise (ValueError if chained else RuntimeError)("step failed")

    def failing_train(*args):
        try:
            step()
        except ValueError:  # the first error's frames stay reachable through __context__
            raise RuntimeError("step failed, then the handler failed")

    refs: list = []
    monkeypatch.setattr(trainer.distributed, "setup", lambda backend, device, timeout: (ctx, torch.device("cpu")))
    monkeypatch.setattr(trainer.distributed, "teardown",
                        lambda c, ok: alive_at_teardown.append((ok, refs[0]() is not None)))
    monkeypatch.setattr(trainer, "_train", failing_train)
    with pytest.raises(RuntimeError, match="step failed"):
        train(make_run_config(), tmp_path / "run", progress=False)
    assert alive_at_teardown == [(False, False)]


def test_fault_point_spec(monkeypatch):
    ctx = DistContext()
    monkeypatch.setenv(distributed.FAULT_ENV, "after_step:3:1,checkpoint_write:4")
    assert distributed._fault_points() == [("after_step", 3, 1), ("checkpoint_write", 4, None)]
    distributed.fault_point("after_step", 3, ctx)  # rank 0: not this one
    distributed.fault_point("checkpoint_write", 4, DistContext(restart_count=1))  # restarted: never fires
    monkeypatch.setenv(distributed.FAULT_ENV, "bad")
    with pytest.raises(ValueError, match="<point>:<step>"):
        distributed.fault_point("after_step", 1, ctx)


def _marker(run_dir, run_id="job-a", start=None, held=()):
    """The marker an accepted first attempt of torchrun job ``run_id`` writes."""
    (run_dir / ".torchrun_job").write_text(json.dumps({"run_id": run_id, "start": start and str(start),
                                                       "held": list(held)}))


def _ctx(restart_count, run_id="job-a"):
    return DistContext(rank=0, world_size=2, backend="gloo", restart_count=restart_count, run_id=run_id)


def test_restart_of_the_same_job_resumes(tmp_path):
    _marker(tmp_path)
    assert _resume_point(tmp_path, False, _ctx(1)) == ("ok", None)  # nothing written yet: from the start
    ckpt.write_checkpoint(tmp_path, 2, {"config.json": {}})
    latest = tmp_path / "checkpoints" / "step_00000002"
    assert _resume_point(tmp_path, False, _ctx(1)) == ("ok", latest)
    assert _resume_point(tmp_path, False, _ctx(1, "job-b"))[0] == "FileExistsError"


def test_restart_of_a_job_started_from_a_checkpoint(tmp_path):
    """--resume <checkpoint>: a restart takes the newest checkpoint the job wrote in --out, or
    the given one before the job wrote any; checkpoints the folder already held are not its own."""
    given = tmp_path / "a"
    ckpt.write_checkpoint(given, 3, {"config.json": {}})
    given = given / "checkpoints" / "step_00000003"
    run = tmp_path / "b"
    ckpt.write_checkpoint(run, 1, {"config.json": {}})  # an older run's
    _marker(run, start=given, held=["step_00000001"])
    assert _resume_point(run, given, _ctx(1)) == ("ok", given)
    ckpt.write_checkpoint(run, 5, {"config.json": {}})
    assert _resume_point(run, given, _ctx(1)) == ("ok", run / "checkpoints" / "step_00000005")


def test_resume_from_a_checkpoint_into_a_folder_with_newer_ones_is_refused(tmp_path):
    """A rewind into the same folder (--resume .../step_300 with step_500 there): the newer ones
    would be taken for this run's by --resume and by pruning."""
    for step in (3, 4, 5):
        ckpt.write_checkpoint(tmp_path, step, {"config.json": {}})
    back = tmp_path / "checkpoints" / "step_00000003"
    status, msg = _resume_point(tmp_path, back, _ctx(0))
    assert status == "FileExistsError" and "newer than" in msg and "step_00000005" in msg
    assert _resume_point(tmp_path, tmp_path / "checkpoints" / "step_00000005", _ctx(0)) == (
        "ok", tmp_path / "checkpoints" / "step_00000005")


def test_a_refused_job_with_a_reused_run_id_stays_refused(tmp_path):
    """A new job aimed at an old run's folder with the old job's run id (a reused --rdzv-id, or
    "none" with a static rendezvous): its first attempt is refused and clears the old marker, so
    its restarts are refused too instead of taking the old run over."""
    ckpt.write_checkpoint(tmp_path, 2, {"config.json": {}})
    _marker(tmp_path)  # left by the old job
    assert _resume_point(tmp_path, False, _ctx(0))[0] == "FileExistsError"
    assert not (tmp_path / ".torchrun_job").exists()
    assert _resume_point(tmp_path, False, _ctx(1))[0] == "FileExistsError"


def test_a_refused_intruder_leaves_the_running_jobs_marker(tmp_path):
    """Another job, or a single process, started into a running job's folder by mistake is
    refused and does not touch that job's marker, so the job's own restarts still resume."""
    ckpt.write_checkpoint(tmp_path, 2, {"config.json": {}})
    _marker(tmp_path)
    assert _resume_point(tmp_path, False, _ctx(0, "job-b"))[0] == "FileExistsError"
    assert _resume_point(tmp_path, False, DistContext())[0] == "FileExistsError"
    assert _resume_point(tmp_path, False, _ctx(1)) == ("ok", tmp_path / "checkpoints" / "step_00000002")


@pytest.mark.parametrize("env, msg", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK=1, WORLD_SIZE=2 is set but LOCAL_RANK is not"),
    ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4 is set but RANK, LOCAL_RANK is not"),
    ({"RANK": "abc", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='abc' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "0 <= RANK < WORLD_SIZE"),
    ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "0 <= RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK >= 0"),
])
def test_launch_environment_is_checked(env, msg, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=msg):
        distributed.setup("gloo", "cpu")


def test_launch_environment_of_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.launch_ranks() is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.launch_ranks() is None  # a lone LOCAL_RANK (set by some schedulers): one process
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.launch_ranks() is None
    monkeypatch.setenv("RANK", "0")
    assert distributed.launch_ranks() == (0, 1, 0)


def test_cuda_device_per_rank(monkeypatch):
    """Without a GPU: torch.cuda's answers patched. One visible GPU per process (CUDA_VISIBLE_DEVICES
    per task) gives cuda:0; an explicit index other than LOCAL_RANK with several GPUs is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match="start at most one worker per GPU"):  # 2 workers, 1 GPU
        distributed.rank_device("cuda", 1, True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert distributed.rank_device("cuda", 3, True) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.rank_device("auto", 3, True) == torch.device("cuda", 3)
    assert distributed.rank_device("cuda:0", 0, True) == torch.device("cuda", 0)
    assert distributed.rank_device("cuda:2", 2, True) == torch.device("cuda", 2)  # --device cuda:$LOCAL_RANK
    with pytest.raises(ValueError, match="every worker of this node would use GPU 0"):
        distributed.rank_device("cuda:0", 1, True)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        distributed.rank_device("cuda", 5, True)
    assert distributed.rank_device("cuda:2", 0, False) == torch.device("cuda", 2)  # one process: as given


def test_metrics_split_step_time(make_run_config, tmp_path):
    train(make_run_config(steps=3, log_every_steps=3), tmp_path, progress=False)
    rec = [r for r in _metrics(tmp_path) if "loss" in r][0]
    for key in ("images_per_s", "images_per_s_rank", "step_time_s", "data_wait_s", "forward_s", "backward_s",
                "optimizer_s"):
        assert rec[key] >= 0, key
    assert rec["images_per_s"] == pytest.approx(rec["images_per_s_rank"])  # one rank
    assert rec["forward_s"] > 0 and rec["backward_s"] > 0
    split = rec["data_wait_s"] + rec["forward_s"] + rec["backward_s"] + rec["optimizer_s"]
    assert split <= rec["step_time_s"] * 1.001 and split > 0.5 * rec["step_time_s"]
    assert rec["images_seen"] == 3 * 2 and rec["world_size"] == 1
    events = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "checkpoint", "done"]


# --------------------------------------------------------------------------------------------
# the DCP (sharded) checkpoint format, on one process


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_dcp_format_resumes_exactly_and_loads_unsharded(make_run_config, tmp_path, memory_format):
    cfg = make_run_config(steps=4, checkpoint_every_steps=2, parallel="fsdp")
    cfg.data.memory_format = memory_format
    full = train(cfg, tmp_path / "full", progress=False)
    step4 = tmp_path / "full" / "checkpoints" / "step_00000004"
    assert ckpt.checkpoint_format(step4) == "dcp"
    assert {p.name for p in step4.iterdir()} == {"dcp", "state.pt", "config.json", "COMPLETE"}
    state = ckpt.load_torch(step4 / "state.pt")
    assert state["format"] == "dcp" and state["images_seen"] == 8 and "optimizer_param_groups" in state
    rest = train(cfg, tmp_path / "cut", resume=str(tmp_path / "full" / "checkpoints" / "step_00000002"),
                 progress=False)
    assert rest.losses == full.losses[2:]
    assert _max_diff(rest.model.state_dict(), full.model.state_dict()) == 0
    # the DCP checkpoint into a plain model: the same EMA weights as the exported model
    model, ema = DiTo(cfg.model), DiTo(cfg.model)
    pm = ParallelModel(model, ema, "single", DistContext(), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    pm.load_sharded(step4 / "dcp", opt, state["optimizer_param_groups"])
    assert _max_diff(ema.state_dict(), DiTo.from_pretrained(tmp_path / "full" / "model").state_dict()) == 0
    assert opt.param_groups[0]["lr"] == cfg.train.lr and int(opt.state[model.encoder.conv_in.weight]["step"]) == 4


def test_safetensors_checkpoint_resumes_in_dcp_mode(make_run_config, tmp_path):
    """A run can switch from the full format (DDP) to FSDP's DCP format at a resume."""
    full = train(make_run_config(steps=3, checkpoint_every_steps=2), tmp_path / "full", progress=False)
    rest = train(make_run_config(steps=3, parallel="fsdp"), tmp_path / "switch",
                 resume=str(tmp_path / "full" / "checkpoints" / "step_00000002"), progress=False)
    assert rest.losses == full.losses[2:]
    assert ckpt.checkpoint_format(tmp_path / "switch" / "checkpoints" / "step_00000003") == "dcp"


def test_dcp_metadata_reader_refuses_foreign_objects(make_run_config, tmp_path):
    train(make_run_config(steps=1, parallel="fsdp"), tmp_path, progress=False)
    dcp_dir = tmp_path / "checkpoints" / "step_00000001" / "dcp"

    class CallsAFunction:  # unpickling it would call os.getcwd: arbitrary code in a real attack
        def __reduce__(self):
            return (os.getcwd, ())

    (dcp_dir / ".metadata").write_bytes(pickle.dumps(CallsAFunction()))
    with pytest.raises(ValueError, match="refusing DCP checkpoint .*getcwd, which a checkpoint should not hold"):
        parallel.load_dcp({"x": torch.zeros(1)}, dcp_dir)
    # a dotted name under an allowed module (protocol 4 resolves it attribute by attribute):
    # torch.distributed.checkpoint.filesystem imports os, so this would call os.getcwd()
    def short(text):
        return b"\x8c" + bytes([len(text)]) + text.encode()
    dotted = b"\x80\x04" + short("torch.distributed.checkpoint.filesystem") + short("os.getcwd") + b"\x93)R."
    (dcp_dir / ".metadata").write_bytes(dotted)
    with pytest.raises(ValueError, match="filesystem.os.getcwd, which a checkpoint should not hold"):
        parallel.load_dcp({"x": torch.zeros(1)}, dcp_dir)


_UNPICKLED = []


def _record(*args):
    _UNPICKLED.append(args)
    return 0


class _RecordsWhenUnpickled:
    def __reduce__(self):
        return (_record, ("unpickled",))


def test_dcp_entries_stored_as_objects_are_refused(tmp_path):
    # DCP writes a non-tensor value as a pickled blob (BytesStorageMetadata) and its loader
    # unpickles it with torch.load(weights_only=False): arbitrary code from a crafted checkpoint,
    # past the metadata reader. The trainer stores tensors only, so such entries are refused.
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": _RecordsWhenUnpickled(), "b": torch.ones(2)}},
                 storage_writer=dcp.FileSystemWriter(str(tmp_path / "dcp")), no_dist=True)
    template = {"model": {"w": torch.zeros(3), "b": torch.zeros(2)}}
    with pytest.raises(ValueError, match=r"refusing DCP checkpoint .*\['model.w'\] are stored as pickled objects"):
        parallel.load_dcp(template, tmp_path / "dcp")
    assert _UNPICKLED == [] and torch.equal(template["model"]["w"], torch.zeros(3))


# --------------------------------------------------------------------------------------------
# a process killed while writing a checkpoint


def test_kill_during_checkpoint_write_keeps_previous(make_run_config, tmp_path):
    """`python -m dito_fast.train` killed (os._exit) after writing step 4's files but before
    committing them: step 2 stays the latest complete checkpoint, loads, and the resumed run
    ends where an uninterrupted run ends."""
    argv = [sys.executable, "-m", "dito_fast.train", "--preset", "dito-tiny", "--data", "synthetic",
            "--image-size", "32", "--steps", "5", "--batch-size", "2", "--threads", "1", "--device", "cpu",
            "--out", str(tmp_path / "run"), *[a for s in MICRO_CLI_SETS for a in ("--set", s)],
            "--set", "train.checkpoint_every_steps=2", "--set", "train.val_every_steps=0",
            "--set", "train.val_images=0", "--set", "data.num_synthetic_images=16", "--set", "train.lr=1e-3",
            "--set", "train.precision=fp32"]
    env = {**os.environ, distributed.FAULT_ENV: "checkpoint_write:4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == distributed.FAULT_EXIT_CODE, proc.stderr[-3000:]
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.latest_checkpoint(tmp_path / "run") == root / "step_00000002"
    assert (root / "latest").read_text().strip() == "step_00000002"
    leftovers = list(root.glob(".step_00000004.*.tmp"))
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    assert not (leftovers[0] / "COMPLETE").exists()
    w = ckpt.load_weights(root / "step_00000002" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
    assert ckpt.load_torch(root / "step_00000002" / "state.pt")["step"] == 2
    # resume (no fault): the same end as an uninterrupted run
    env.pop(distributed.FAULT_ENV)
    proc = subprocess.run([*argv, "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not leftovers[0].exists()  # stale temporaries are pruned
    ref = subprocess.run([*argv[:argv.index("--out") + 1], str(tmp_path / "ref"), *argv[argv.index("--out") + 2:]],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr[-3000:]
    a = ckpt.load_weights(root / "step_00000005" / "model.safetensors")
    b = ckpt.load_weights(tmp_path / "ref" / "checkpoints" / "step_00000005" / "model.safetensors")
    assert _max_diff(a, b) == 0


def test_loaded_optimizer_moments_take_their_parameters_layout(make_micro_config):
    """A checkpoint whose Adam moments are channels_last (runs that trained a channels_last model)
    resumes with contiguous moments for contiguous parameters: the same values, no copies per step."""
    model = DiTo(make_micro_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for st in opt.state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            if st[k].dim() == 4:
                st[k] = st[k].contiguous(memory_format=torch.channels_last)
    saved = opt.state_dict()
    assert any(not s["exp_avg"].is_contiguous() for s in saved["state"].values())
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ParallelModel(model, None, "single", DistContext(), torch.device("cpu")).load_full_optimizer_state(fresh, saved)
    for i, p in enumerate(model.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            loaded = fresh.state[p][k]
            assert loaded.stride() == p.stride() and torch.equal(loaded, saved["state"][i][k])
