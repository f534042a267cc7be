"""dito_fast.testing.run_process_tree: a timeout kills the whole process tree, including children
in sessions of their own (as torchrun's workers are), and keeps the output written so far."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dito_fast.testing import descendants, run_process_tree

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; only its parent has not reaped it yet


def test_timeout_kills_children_in_other_sessions(tmp_path):
    pid_file = tmp_path / "child.pid"
    t0 = time.monotonic()
    res = run_process_tree([sys.executable, "-c", PARENT, str(pid_file)], timeout=5)
    assert time.monotonic() - t0 < 30
    assert res.returncode == -9 and "started" in res.stdout
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the grandchild in its own session survived the timeout"


def test_normal_exit_and_output():
    res = run_process_tree([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                           timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")
    assert descendants(2**22 + 12345) == []  # no such process: nothing below it
