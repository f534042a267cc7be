"""dito_fast.keep_freed_memory: repeated large allocations stop faulting in fresh pages.

The setting is process-wide and permanent, so each measurement runs in its own interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_keep_freed_memory_is_idempotent_and_declines_off_linux(monkeypatch):
    monkeypatch.setattr(allocator, "_KEPT", False)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert dito_fast.keep_freed_memory() is False
    monkeypatch.setattr(allocator, "_KEPT", True)
    assert dito_fast.keep_freed_memory() is True  # already in force: no second mallopt


@pytest.mark.parametrize("argv, calls", [(["info"], 1), (["--no-keep-freed-memory", "info"], 0)])
def test_cli_keeps_freed_memory_unless_told_not_to(monkeypatch, capsys, argv, calls):
    seen = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: seen.append(1) or True)
    assert cli.main(argv) == 0
    assert len(seen) == calls
