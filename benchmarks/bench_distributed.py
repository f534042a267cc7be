"""Data-parallel training on this machine: scaling efficiency and the communication share of a step.

- ``test_scaling_efficiency``: the trainer (``python -m dito_fast.train``) on dito-tiny at 64x64,
  global batch 16, as 2 processes x 1 thread (torchrun, DDP, gloo on loopback) and as
  1 process x 2 threads (no torchrun). Steady-state images/s (median of the per-step figures
  after 3 warm-up steps, from metrics.jsonl) and the step-time split (data wait / forward /
  backward / optimizer). ``extra_info``: images_per_s_2x1, images_per_s_1x2,
  ``scaling_efficiency`` = images_per_s_2x1 / images_per_s_1x2 (1.0: two processes use the two
  cores as well as two threads do), the per-rank figures and both splits. The benchmark's own
  time is the wall time of both launches (start-up included): read the extra_info.
- ``test_communication_share``: this file as a torchrun worker (2 processes x 1 thread,
  per-rank batch 8): forward + backward through DDP with gradient synchronisation vs under
  ``no_sync`` (the same computation without communication), and a bare all-reduce of a buffer
  as large as the gradients. ``extra_info``: ``exposed_comm_share`` = (synced - unsynced) /
  synced (the communication the backward pass did not hide), ``allreduce_share`` = all-reduce
  alone / synced step (what it would cost with no overlap at all), and the three times.

What the numbers are: two cores shared by both configurations (and by anything else running),
gloo over loopback TCP, a 1.5 M-parameter model (5.8 MiB of fp32 gradients). On GPU clusters (NCCL over NVLink/InfiniBand)
neither figure transfers; there DDP's bucketed all-reduces (25 MB buckets) start while the
backward pass is still computing earlier layers, so the exposed share is what is left after
the last bucket. To check it on a cluster: compare ``backward_s`` in metrics.jsonl with
``train.parallel=ddp`` at world size N against world size 1 (same per-rank batch), or run this
file's worker under torchrun on the cluster (``python -m torch.distributed.run --nproc-per-node
8 benchmarks/bench_distributed.py --worker OUT --device cuda``), or profile a step with
torch.profiler and look for NCCL kernels overlapping the backward kernels.

Run: ``pytest benchmarks/bench_distributed.py --benchmark-json=bench_distributed.json`` and
``python benchmarks/report.py bench_distributed.json``. Smoke: ``--benchmark-disable`` (3 steps,
a handful of iterations; the figures are then not meaningful).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from dito_fast.testing import run_process_tree

REPO = Path(__file__).resolve().parents[1]
PRESET, SIZE = "dito-tiny", 64


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DITO_FAST_FAULT"}
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _launch(cmd: list[str], threads: int, timeout: float = 600) -> None:
    """Run ``cmd`` (a torchrun or trainer launch); on a timeout it and every process below it
    are killed (``dito_fast.testing.run_process_tree``) and the output so far is reported."""
    proc = run_process_tree(cmd, timeout=timeout, cwd=REPO, env=_env(threads))
    tail = f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, (f"launch failed (exit {proc.returncode}; -9: killed at the {timeout:.0f} s "
                                  f"timeout): {tail}")


def _train(out: Path, procs: int, threads: int, steps: int, batch: int) -> dict:
    """One trainer run; returns the steady-state figures from its metrics.jsonl."""
    args = ["-m", "dito_fast.train", "--preset", PRESET, "--data", "synthetic", "--image-size", str(SIZE),
            "--steps", str(steps), "--batch-size", str(batch), "--threads", str(threads), "--device", "cpu",
            "--out", str(out), "--set", "train.log_every_steps=1", "--set", "train.val_every_steps=0",
            "--set", "train.val_images=0", "--set", "train.checkpoint_every_steps=0", "--set", "train.precision=fp32",
            "--set", "data.num_synthetic_images=512"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args]
    else:
        cmd = [sys.executable, *args]
    _launch(cmd, threads)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    steady = recs[3:] or recs[-1:]
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    res = {"images_per_s": med("images_per_s"), "step_time_s": med("step_time_s"),
           "split_s": {k: med(f"{k}_s") for k in ("data_wait", "forward", "backward", "optimizer")}}
    if procs > 1:
        res["images_per_s_per_rank"] = [statistics.median(r["images_per_s_per_rank"][i] for r in steady)
                                        for i in range(procs)]
    return res


def test_scaling_efficiency(benchmark, tmp_path):
    smoke = benchmark.disabled
    steps, batch = (4, 4) if smoke else (16, 16)
    results = {}

    def launch():
        results["2x1"] = _train(tmp_path / "p2", procs=2, threads=1, steps=steps, batch=batch)
        results["1x2"] = _train(tmp_path / "p1", procs=1, threads=2, steps=steps, batch=batch)

    benchmark.pedantic(launch, rounds=1, iterations=1)
    two, one = results["2x1"], results["1x2"]
    benchmark.extra_info.update({
        "preset": PRESET, "image_size": SIZE, "global_batch": batch, "steps": steps,
        "images_per_s_2x1": two["images_per_s"], "images_per_s_1x2": one["images_per_s"],
        "scaling_efficiency": two["images_per_s"] / one["images_per_s"],
        "images_per_s_per_rank_2x1": two["images_per_s_per_rank"],
        "step_split_s_2x1": two["split_s"], "step_split_s_1x2": one["split_s"], "smoke": smoke})
    assert two["images_per_s"] > 0 and one["images_per_s"] > 0


def test_communication_share(benchmark, tmp_path):
    smoke = benchmark.disabled
    iters = 3 if smoke else 12
    out = tmp_path / "comm.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", str(out), "--iters", str(iters), "--batch", "8"]

    def launch():
        _launch(cmd, 1)

    benchmark.pedantic(launch, rounds=1, iterations=1)
    r = json.loads(out.read_text())
    benchmark.extra_info.update({**r, "exposed_comm_share": max(0.0, 1 - r["step_nosync_s"] / r["step_sync_s"]),
                                 "allreduce_share": r["allreduce_s"] / r["step_sync_s"], "smoke": smoke})
    assert r["step_sync_s"] > 0 and r["allreduce_s"] > 0


# --------------------------------------------------------------------------------------------
# torchrun worker (python -m torch.distributed.run ... bench_distributed.py --worker OUT)


def _worker(argv: list[str]) -> None:
    import argparse

    sys.path.insert(0, str(REPO))
    from dito_fast.train.distributed import setup, teardown

    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ctx, device = setup("auto", a.device)
    result = _measure(ctx, device, a.iters, a.batch)  # its DDP wrapper is gone before the group (see teardown)
    if ctx.rank == 0:
        Path(a.worker).write_text(json.dumps(result))
    teardown(ctx)


def _measure(ctx, device: torch.device, iters: int, batch: int) -> dict:
    import torch.distributed as dist

    from dito_fast.models.dito import DiTo
    from dito_fast.train.parallel import ParallelModel, sample_seeds

    torch.manual_seed(0)
    model = DiTo.from_preset(PRESET)
    pm = ParallelModel(model, None, "ddp", ctx, device)
    x = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(ctx.rank)).to(device) * 2 - 1
    seeds = sample_seeds(0, 0, ctx.rank * batch, (ctx.rank + 1) * batch)

    def sync_point():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(sync: bool) -> float:
        dist.barrier()
        sync_point()
        t0 = time.perf_counter()
        with contextlib.nullcontext() if sync else pm.step_module.no_sync():
            pm.step_module(x, seeds).sum().backward()
        sync_point()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt

    flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)

    def allreduce() -> float:
        dist.barrier()
        sync_point()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        sync_point()
        return time.perf_counter() - t0

    step(True), step(False), allreduce()  # warm-up
    synced, unsynced, reduce = [], [], []
    for _ in range(iters):  # interleaved, so drifts in machine load hit both alike
        synced.append(step(True))
        unsynced.append(step(False))
        reduce.append(allreduce())
    # the slowest rank sets the pace: take the max over ranks of each median
    med = torch.tensor([statistics.median(v) for v in (synced, unsynced, reduce)], dtype=torch.float64, device=device)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return {"step_sync_s": med[0].item(), "step_nosync_s": med[1].item(), "allreduce_s": med[2].item(),
            "grad_mb": flat.numel() * 4 / 2**20, "world_size": ctx.world_size, "batch_per_rank": batch,
            "backend": ctx.backend, "iters": iters}


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[1:])
elif __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
