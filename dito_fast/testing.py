"""Process helpers for tests and benchmarks that launch whole programs (torchrun, the CLI).

``run_process_tree`` is ``subprocess.run`` for launchers whose children outlive them: torchrun
starts each worker in a session of its own, so on a timeout killing torchrun (or its process
group) leaves the workers running, and a worker holding an output pipe would block the caller.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, from ``/proc/<pid>/task/*/children`` (Linux)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = [int(c) for c in children.read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
            found += kids
            todo += kids
    return found


def run_process_tree(cmd: list[str], *, timeout: float, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion with its output in temporary files (not pipes). On a timeout,
    ``cmd`` and every process below it are killed (SIGKILL) and the result has returncode -9,
    with the output written so far. Returns a CompletedProcess with text stdout and stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
