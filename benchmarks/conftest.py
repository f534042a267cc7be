"""Shared benchmark settings: a fixed thread count (DITO_BENCH_THREADS, default 2), recorded in
every result's extra_info together with the torch version and the allocator setting.

Allocator (DITO_BENCH_REUSE_MEMORY, default 1): glibc serves large allocations with fresh mmap'd
pages and returns them on free, so every 8-32 MiB output pays a page fault per 4 KiB, which
dominated every provider's time when an op was timed alone, and costs a whole model step too
(see dito_fast/allocator.py and ``bench_decode.py::test_cpu_allocator``). The benchmarks keep
freed memory in the process (``dito_fast.keep_freed_memory``, as the CLI does), so they time the
kernels without those faults; DITO_BENCH_REUSE_MEMORY=0 times cold allocations instead (compare
the two runs to see the faults' share).
"""

import json
import os
import random
import subprocess
import sys
import time
from typing import Callable

import pytest
import torch

from dito_fast.allocator import keep_freed_memory

THREADS = int(os.environ.get("DITO_BENCH_THREADS", "2"))
REUSE_MEMORY = os.environ.get("DITO_BENCH_REUSE_MEMORY", "1") != "0"
MEMORY_REUSED = keep_freed_memory() if REUSE_MEMORY else False


@pytest.fixture(autouse=True)
def _pin_threads(request):
    torch.set_num_threads(THREADS)
    if "benchmark" in request.fixturenames:
        bench = request.getfixturevalue("benchmark")
        bench.extra_info.update({"threads": THREADS, "torch": torch.__version__, "memory_reused": MEMORY_REUSED})
    yield


def interleaved_medians(fns: dict, rounds: int, before: Callable | None = None) -> dict:
    """Median seconds of each function of ``fns``, timed in alternation so that drifts in machine
    load hit every variant alike. Each round runs every function once, in its own order (a
    shuffle with a fixed seed): with one fixed order each function always runs right after the
    same neighbour, whose footprint it pays. A small fused op timed right after the
    torch.compile'd provider took up to 2.4x as long as the very same call placed after the
    one-op floor in the runs of 2026-12-01/02 (``bench_ops.py::test_interleaving_order_bias``),
    1.04x / 1.17x (forward+backward / forward) in ``results/ops_model_2026-12-03.json``.
    ``before(name)`` runs untimed before each call (e.g. to select a backend)."""
    names = list(fns)
    order_rng = random.Random(0)
    times = {name: [] for name in names}
    for _ in range(rounds):
        order_rng.shuffle(names)
        for name in names:
            if before is not None:
                before(name)
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


# For scripts run by run_child: this process's peak resident set (VmHWM; ru_maxrss would include
# the parent's before exec).
PEAK_MIB_SOURCE = """
def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
"""


def run_child(script: str, *args, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run ``script`` in a fresh interpreter (this process's environment, updated with ``env``)
    and return the JSON object it prints last."""
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=os.environ | (env or {}), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
