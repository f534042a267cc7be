"""Decode throughput: the paper's decoding vs ``fast_decode`` (issue 6), on this machine.

- ``test_decode``: images/s for dito-tiny and dito-S at 64x64 and 128x128, batch 1 and 8:
  ``baseline`` mirrors the paper (``model.decode``: eager, the reference ops through
  DITO_FAST_BACKEND, 50 uniform Euler steps); ``fast`` is ``fast_decode`` with its defaults
  (sampler="auto": see benchmarks/results/sampler_study.md for its error to the converged ODE
  solution, no larger than the baseline's). extra_info: NFE, ms per NFE, GFLOP/s and its
  fraction of the measured fp32 matmul peak, and for ``fast`` the speed-up over the baseline
  measured in the same run.
- ``test_cpu_allocator``: one dito-B decoder step at 256x256 with glibc's default allocator and
  with ``dito_fast.keep_freed_memory()``, each in its own process (page faults and step time).
- ``test_peak_memory_1024``: peak resident memory of one dito-S decode step at 1024x1024, untiled
  vs tiled (512-px tiles), each in a fresh subprocess (VmHWM from /proc; the increase over the
  process's peak before decoding).

Weights are randomly initialised: throughput does not depend on them.

Run: ``pytest benchmarks/bench_decode.py --benchmark-json=bench_decode.json`` (about 13 minutes
on 2 cores, most of it the dito-S baselines), then ``python benchmarks/bench_decode.py
bench_decode.json`` for the table. With ``--benchmark-disable`` (smoke test, ~1 minute) every
case runs once with 1 step, and the memory test decodes 128x128 instead.
"""

from __future__ import annotations

import statistics
import textwrap
import time

import pytest
import torch

from conftest import PEAK_MIB_SOURCE, interleaved_medians, run_child
from dito_fast import DiTo, fast_decode
from dito_fast.decode import resolve_settings
from dito_fast.models.dito import decoder_gflops

REF_ENV = "fm_noise=ref,fm_loss=ref,latent_layernorm=ref,group_norm_modulate_silu=ref,conv3x3=ref"
BASELINE = {"sampler": "euler", "schedule": "uniform", "steps": 50}
_RESULTS: dict = {}  # (preset, size, batch, mode) -> seconds per decode, for same-run ratios


@pytest.fixture(scope="module")
def matmul_peak() -> float:
    """fp32 matmul GFLOP/s at the benchmark's thread count (median of 5, 2048^3)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / sorted(times)[2] / 1e9


def _model(preset):
    torch.manual_seed(0)
    return DiTo.from_preset(preset).eval()


@pytest.mark.parametrize("mode", ["baseline", "fast"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("preset", ["dito-tiny", "dito-S"])
def test_decode(benchmark, monkeypatch, matmul_peak, preset, size, batch, mode):
    smoke = benchmark.disabled
    model = _model(preset)
    f = model.latent_factor
    z = torch.randn(batch, model.latent_channels, size // f, size // f, generator=torch.Generator().manual_seed(0))
    if mode == "baseline":
        monkeypatch.setenv("DITO_FAST_BACKEND", REF_ENV)
        settings = resolve_settings(BASELINE["sampler"], 1 if smoke else BASELINE["steps"], BASELINE["schedule"])

        def run():
            with torch.inference_mode():
                model.decode(z, steps=settings.steps, sampler=settings.sampler, schedule=settings.schedule, seed=0)
    else:
        monkeypatch.delenv("DITO_FAST_BACKEND", raising=False)
        settings = resolve_settings("auto", 1 if smoke else None)

        def run():
            fast_decode(model, z, seed=0, steps=settings.steps)

    if not smoke:
        with torch.inference_mode():  # warm-up: one network evaluation (oneDNN primitive creation)
            model.velocity(torch.zeros(batch, 3, size, size), torch.full((batch,), 0.5), z)
    heavy = preset == "dito-S" and (size == 128 or batch == 8)
    benchmark.pedantic(run, rounds=1 if heavy else 3, warmup_rounds=0, iterations=1)
    if smoke:
        return
    med = benchmark.stats.stats.median
    _RESULTS[(preset, size, batch, mode)] = med
    nfe = settings.nfe
    gflop = decoder_gflops(model.config, size) * batch * nfe
    info = {"mode": mode, "preset": preset, "image_size": size, "batch": batch, "sampler": settings.sampler,
            "schedule": settings.schedule, "steps": settings.steps, "nfe": nfe, "images_per_s": batch / med,
            "ms_per_nfe": med / nfe * 1e3, "gflops_per_s": gflop / med, "matmul_peak_gflops": matmul_peak,
            "peak_fraction": gflop / med / matmul_peak}
    base = _RESULTS.get((preset, size, batch, "baseline"))
    if mode == "fast" and base is not None:
        info["speedup_vs_baseline"] = base / med
        info["speedup_per_nfe"] = (base / BASELINE["steps"]) / (med / nfe)  # caching + fused ops alone
    benchmark.extra_info.update(info)


def test_decode_channels_last(benchmark):
    """fast_decode of dito-S, 64x64, batch 8, 4 Euler steps, with channels_last off and on (the
    CPU default), timed in alternation. extra_info: both medians and the speed-up."""
    smoke = benchmark.disabled
    model = _model("dito-tiny" if smoke else "dito-S")
    z = torch.randn(8, model.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    steps, rounds = (1, 1) if smoke else (4, 5)
    runs = {cl: (lambda cl=cl: fast_decode(model, z, steps=steps, sampler="euler", seed=0, channels_last=cl))
            for cl in (False, True)}
    for run in runs.values():
        run()  # warm-up
    med = interleaved_medians(runs, rounds)
    benchmark.pedantic(runs[True], rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"steps": steps, "batch": 8, "image_size": 64, "nchw_ms": med[False] * 1e3,
                                 "channels_last_ms": med[True] * 1e3, "channels_last_speedup": med[False] / med[True]})


_MEMORY_SCRIPT = PEAK_MIB_SOURCE + textwrap.dedent("""
    import json, sys, torch
    from dito_fast import DiTo, fast_decode

    size, tile, threads = int(sys.argv[1]), (None if sys.argv[2] == "none" else int(sys.argv[2])), int(sys.argv[3])
    overlap = int(sys.argv[4])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DiTo.from_preset("dito-S").eval()
    z = torch.randn(1, 4, size // 8, size // 8)
    before = peak_mib()
    fast_decode(model, z, steps=1, sampler="euler", seed=0, tile=tile, tile_overlap=overlap)
    after = peak_mib()
    print(json.dumps({"peak_mib": after, "decode_mib": after - before}))
""")


def test_peak_memory_1024(benchmark):
    """One decode step (the peak does not depend on the number of steps) of dito-S."""
    smoke = benchmark.disabled
    size, tile, overlap = (128, 64, 16) if smoke else (1024, 512, 96)
    threads = torch.get_num_threads()
    result = {}
    for name, t in (("untiled", None), ("tiled", tile)):
        t0 = time.perf_counter()
        result[name] = run_child(_MEMORY_SCRIPT, size, t or "none", threads, overlap) | {
            "seconds": time.perf_counter() - t0}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"memory_reused": False, "image_size": size, "tile": tile, "tile_overlap": overlap,
                                 "preset": "dito-S",
                                 "untiled_decode_mib": result["untiled"]["decode_mib"],
                                 "tiled_decode_mib": result["tiled"]["decode_mib"],
                                 "untiled_peak_mib": result["untiled"]["peak_mib"],
                                 "tiled_peak_mib": result["tiled"]["peak_mib"],
                                 "untiled_step_s": result["untiled"]["seconds"],
                                 "tiled_step_s": result["tiled"]["seconds"]})
    if not smoke:  # at 128x128 the decode stays below the model's own start-up peak
        assert result["tiled"]["decode_mib"] < result["untiled"]["decode_mib"]


_ALLOCATOR_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, torch
    import dito_fast
    from dito_fast import DiTo, fast_decode
    mode, preset, size, reps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if mode == "keep":
        assert dito_fast.keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DiTo.from_preset(preset).eval()
    z = torch.randn(1, model.latent_channels, size // model.latent_factor, size // model.latent_factor)
    times, faults = [], []
    for i in range(reps + 1):  # the first decode (oneDNN set-up, the heap growing) is not counted
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        fast_decode(model, z, steps=1, sampler="euler", seed=0)
        if i:
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"times": times, "faults": faults}))
""")


def test_cpu_allocator(benchmark):
    """One decoder step (fast_decode, 1 Euler step) of dito-B at 256x256, batch 1, with glibc's
    default allocator and with ``dito_fast.keep_freed_memory()`` (what the CLI does), each in its
    own process (the setting is process-wide), launched in alternation. extra_info: the median
    step time and minor page faults per step of each, and the speed-up."""
    smoke = benchmark.disabled
    preset, size, reps, launches = ("dito-tiny", 64, 1, 1) if smoke else ("dito-B", 256, 3, 2)
    res = {"default": {"times": [], "faults": []}, "keep": {"times": [], "faults": []}}

    def launch_all():
        for _ in range(launches):
            for mode in res:
                for k, v in run_child(_ALLOCATOR_SCRIPT, mode, preset, size, reps, torch.get_num_threads()).items():
                    res[mode][k] += v

    benchmark.pedantic(launch_all, rounds=1, iterations=1)
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in res.items()}
    benchmark.extra_info.update({"memory_reused": "default / keep: one child process each", "preset": preset,
                                 "image_size": size, "batch": 1, "steps_timed": reps * launches,
                                 "default_step_s": med["default"]["times"], "keep_step_s": med["keep"]["times"],
                                 "default_faults_per_step": med["default"]["faults"],
                                 "keep_faults_per_step": med["keep"]["faults"],
                                 "keep_speedup": med["default"]["times"] / med["keep"]["times"]})

