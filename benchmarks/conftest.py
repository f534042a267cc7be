"""Shared benchmark settings: a fixed thread count (DITO_BENCH_THREADS, default 2), recorded in
every result's extra_info together with the torch version and the allocator setting.

Allocator (DITO_BENCH_REUSE_MEMORY, default 1): glibc serves large allocations with fresh mmap'd
pages and returns them on free, so an op timed alone pays a page fault per 4 KiB of every
output, up to 5x its compute time for the 8-32 MiB activations here (measured: group_norm_
modulate_silu on 8x64x64x64, 2 threads, forward 0.84 ms -> 0.58 ms). Inside a training or
decoding step the allocator reuses memory and no such faults occur (the model-level figures do
not change with this setting: dito-S train step 3219 vs 3192 ms). So the op benchmarks keep freed
memory in the process (mallopt M_TRIM_THRESHOLD and M_MMAP_THRESHOLD), which times the kernels
as the model runs them; set DITO_BENCH_REUSE_MEMORY=0 to time cold allocations instead.
"""

import ctypes
import os
import sys

import pytest
import torch

THREADS = int(os.environ.get("DITO_BENCH_THREADS", "2"))
REUSE_MEMORY = os.environ.get("DITO_BENCH_REUSE_MEMORY", "1") != "0"


def _keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the heap (no trimming, no mmap for large blocks)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_threshold, 2**31 - 1))


MEMORY_REUSED = _keep_freed_memory() if REUSE_MEMORY else False


@pytest.fixture(autouse=True)
def _pin_threads(request):
    torch.set_num_threads(THREADS)
    if "benchmark" in request.fixturenames:
        bench = request.getfixturevalue("benchmark")
        bench.extra_info.update({"threads": THREADS, "torch": torch.__version__, "memory_reused": MEMORY_REUSED})
    yield
