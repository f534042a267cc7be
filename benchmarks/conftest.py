"""Shared benchmark settings: a fixed thread count (DITO_BENCH_THREADS, default 2), recorded in
every result's extra_info together with the torch version."""

import os

import pytest
import torch

THREADS = int(os.environ.get("DITO_BENCH_THREADS", "2"))


@pytest.fixture(autouse=True)
def _pin_threads(request):
    torch.set_num_threads(THREADS)
    if "benchmark" in request.fixturenames:
        bench = request.getfixturevalue("benchmark")
        bench.extra_info.update({"threads": THREADS, "torch": torch.__version__})
    yield
