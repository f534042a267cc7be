"""benchmarks/report.py, the tables the README's Benchmarks section tells users to print: every
committed result renders, fast_decode's tables are among them, and rows of older or partial runs
print what they have instead of crashing or inventing figures."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402  (benchmarks/report.py)

RESULTS = sorted((BENCH / "results").glob("*.json"))


def _print(rows, tmp_path, capsys) -> str:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": rows}))
    report.main(str(path))
    return capsys.readouterr().out


@pytest.mark.parametrize("path", [p for p in RESULTS if "benchmarks" in json.loads(p.read_text())], ids=lambda p: p.name)
def test_every_committed_result_renders(path, capsys):
    report.main(str(path))
    assert "|" in capsys.readouterr().out


def test_decode_tables_are_printed(capsys):
    report.main(str(BENCH / "results" / "decode_2026-12-01.json"))
    out = capsys.readouterr().out
    assert "| preset | size | batch | mode | sampler | NFE | images/s" in out
    assert "one step: untiled" in out and "keep_freed_memory" in out


def test_gpu_tables_are_printed(capsys):
    """The GPU run's rows (bench_gpu.py): the model steps, fast_decode and an op row, with the
    figures of the JSON (ms to 4 places, ratios to 2)."""
    report.main(str(BENCH / "results" / "gpu_model_h200_2026-12-04.json"))
    out = capsys.readouterr().out
    assert "| dito-S | 64 | 64 | fp32 | decoder_step | 18.31 | 14.50 | 1.26x | 4414 |" in out
    assert "eager 121.2 ms, CUDA graph 85.1 ms (1.42x" in out
    report.main(str(BENCH / "results" / "gpu_ops_h200_2026-12-04.json"))
    out = capsys.readouterr().out
    assert "| group_norm_modulate_silu | B@256x16 L0 | float32 | fwd | 1.6701 | 1.5590 | 0.4690 | 0.4103 | 3.56x" in out


def _row(name):
    rows = json.loads((BENCH / "results" / "ops_model_2026-12-03.json").read_text())["benchmarks"]
    return copy.deepcopy(next(r for r in rows if r["name"].startswith(name)))


def test_missing_values_print_as_missing(tmp_path, capsys):
    profile = _row("test_profile_fused_share")
    del profile["extra_info"]["conv3x3_share"]  # runs before the conv3x3 share was recorded
    line = next(l for l in _print([profile], tmp_path, capsys).splitlines() if l.startswith("| train_step"))
    assert "| - |" in line and "0.0%" not in line


def test_op_rows_without_a_shape_label(tmp_path, capsys):
    # older rows had no extra_info["shape"]: the shape parameter (a list) names the row
    rows = [_row("test_group_norm_modulate_silu[S64-L0-fwd-ref]"), _row("test_group_norm_modulate_silu[S64-L0-fwd-cpp]")]
    for r in rows:
        del r["extra_info"]["shape"]
    out = _print(rows, tmp_path, capsys)
    assert "group_norm_modulate_silu" in out and "S@64 L0" in out


def test_command_line_usage():
    """A usage mistake gets argparse's message, not a traceback."""
    import subprocess

    out = subprocess.run([sys.executable, str(BENCH / "report.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "usage: report.py" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, str(BENCH / "report.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--benchmark-json" in out.stdout
