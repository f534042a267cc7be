"""dito_fast.keep_freed_memory: repeated large allocations stop faulting in fresh pages.

The setting is process-wide and permanent, so each measurement runs in its own interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dito_fast
from dito_fast import allocator, cli

_PROBE = r"""
import json, resource, sys
import torch
import dito_fast
kept = dito_fast.keep_freed_memory() if sys.argv[1] == "keep" else None
n = 40 * 2**20 // 4  # a 40 MiB float32 tensor: above glibc's largest adaptive mmap threshold
for _ in range(8):  # first touches fault in either setting, until the heap has grown to fit
    torch.empty(n).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(n).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults, "pages": 8 * n * 4 // 4096}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _probe("default"), _probe("keep")
    if default["faults"] < default["pages"] // 2:
        pytest.skip(f"glibc's default already avoids the faults here ({default['faults']} for "
                    f"{default['pages']} pages: huge pages or another allocator)")
    assert kept["kept"] is True
    assert kept["faults"] < kept["pages"] // 20, kept  # the default faulted once per page: ~16k here


class _FakeLibc:
    """libc whose mallopt records its calls and accepts or refuses them."""

    def __init__(self, accept=(True, True)):
        self.calls, self.accept = [], dict(zip((-3, -1), accept))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

        def mallopt(param, value):
            self.calls.append((param, value))
            return int(self.accept[param])
        self.mallopt = mallopt


@pytest.fixture
def fresh_allocator(monkeypatch):
    monkeypatch.setattr(allocator, "_KEPT", False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    libs = []

    def install(lib):
        libs.append(lib)
        monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: lib)
        return lib
    return install


def test_keep_freed_memory_sets_both_thresholds_once(fresh_allocator):
    lib = fresh_allocator(_FakeLibc())
    assert dito_fast.keep_freed_memory() is True
    assert sorted(lib.calls) == [(-3, 2**31 - 1), (-1, 2**31 - 1)]
    assert dito_fast.keep_freed_memory() is True and len(lib.calls) == 2  # in force: no second mallopt


@pytest.mark.parametrize("accept", [(False, True), (True, False)])
def test_keep_freed_memory_reports_a_refusal(fresh_allocator, caplog, accept):
    fresh_allocator(_FakeLibc(accept))
    assert dito_fast.keep_freed_memory() is False
    assert "refused" in caplog.text and allocator._KEPT is False


def test_keep_freed_memory_declines_off_linux(fresh_allocator, monkeypatch):
    lib = fresh_allocator(_FakeLibc())
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert dito_fast.keep_freed_memory() is False and lib.calls == []


@pytest.mark.parametrize("argv, cuda, calls", [
    (["info"], False, 1), (["--no-keep-freed-memory", "info"], False, 0), (["info"], True, 0),
])
def test_cli_keeps_freed_memory_when_on_the_cpu(monkeypatch, capsys, argv, cuda, calls):
    seen = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: seen.append(1) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert cli.main(argv) == 0
    assert len(seen) == calls


def test_cli_device_decides():
    args = cli.build_parser().parse_args(["encode", "model", "x.png", "--out", "o", "--device", "cpu"])
    assert cli._runs_on_cpu(args)
    args = cli.build_parser().parse_args(["encode", "model", "x.png", "--out", "o", "--device", "cuda:1"])
    assert not cli._runs_on_cpu(args)
