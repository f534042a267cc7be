"""setup.py's build switches, read without building: ``python setup.py --name`` runs the
extension configuration (which prints why CUDA kernels are skipped) and stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _setup(use_cuda: str, *command: str, **env_updates) -> subprocess.CompletedProcess:
    env = {**os.environ, "DITO_FAST_USE_CUDA": use_cuda, **env_updates}
    return subprocess.run([sys.executable, "setup.py", *(command or ["--name"])], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _without_torch(tmp_path) -> str:
    """A PYTHONPATH under which ``import torch`` fails, as in pip's isolated build environment."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch in this environment')\n")
    return str(tmp_path)


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false", "No"])
def test_cuda_off_spellings(value):
    out = _setup(value)
    assert out.returncode == 0, out.stderr
    assert f"CUDA kernels skipped: DITO_FAST_USE_CUDA={value}" in out.stderr


def test_cuda_unknown_value_is_an_error():
    out = _setup("sometimes")
    assert out.returncode != 0
    assert "DITO_FAST_USE_CUDA='sometimes': expected auto, 1/on/true/yes or 0/off/false/no" in out.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch's message")
@pytest.mark.parametrize("value", ["1", "ON", "yes"])
def test_cuda_on_without_cuda_torch_fails_with_the_reason(value, tmp_path):
    out = _setup(value, "build_ext", "-b", str(tmp_path), "-t", str(tmp_path))  # (metadata commands still work)
    assert out.returncode != 0
    assert "CUDA kernels skipped: this torch build has no CUDA" in out.stderr
    assert "DITO_FAST_USE_CUDA asks for CUDA kernels, but they cannot be built" in out.stderr
    assert _setup(value).returncode == 0


def test_sanitizer_builds_are_asked_for_by_name():
    """DITO_FAST_SANITIZE (scripts/sanitize_check.sh): the sanitizers named go into every unit's
    flags, at -O1 with line numbers; a misspelt one stops the build naming it."""
    out = _setup("0", DITO_FAST_SANITIZE="address, Undefined")
    assert out.returncode == 0, out.stderr
    assert "sanitizer build (-fsanitize=address,undefined -fno-sanitize-recover=all" in out.stderr
    out = _setup("0", DITO_FAST_SANITIZE="adress")
    assert out.returncode != 0
    assert "DITO_FAST_SANITIZE='adress': unknown sanitizer(s) adress" in out.stderr
    out = _setup("0", DITO_FAST_SANITIZE="thread,address")
    assert out.returncode != 0 and "thread cannot be combined with address or leak" in out.stderr
    assert "sanitizer build" not in _setup("0", DITO_FAST_SANITIZE="").stderr


def test_without_torch_the_build_stops_unless_asked_for_pure_python(tmp_path):
    """pip's default isolated build has no torch: it had installed the package without its C++
    kernels, saying so only in a log pip hides. The build stops, saying what to do; metadata
    commands still work, and DITO_FAST_PURE_PYTHON=1 builds without the extension on purpose."""
    path = _without_torch(tmp_path)
    out = _setup("auto", "build_ext", "-b", path, "-t", path, PYTHONPATH=path)
    assert out.returncode != 0
    assert "torch is not importable at build time" in out.stderr and "--no-build-isolation" in out.stderr
    assert _setup("auto", PYTHONPATH=path).returncode == 0
    out = _setup("auto", "build_ext", "-b", path, "-t", path, PYTHONPATH=path, DITO_FAST_PURE_PYTHON="1")
    assert out.returncode == 0 and "building the pure-Python package without dito_fast._C" in out.stderr


def test_an_older_torch_stops_the_build_with_the_reason(tmp_path):
    """A torch older than setup.py's MIN_TORCH: the extension's C++ was never built against it (and
    did not compile against torch 2.11 until 2026-12-04), so the build stops, naming both versions."""
    (tmp_path / "torch" / "utils").mkdir(parents=True)
    (tmp_path / "torch" / "__init__.py").write_text("__version__ = '2.10.1+cpu'\n")
    (tmp_path / "torch" / "utils" / "__init__.py").write_text("")
    (tmp_path / "torch" / "utils" / "cpp_extension.py").write_text("")
    path = str(tmp_path)
    out = _setup("auto", "build_ext", "-b", path, "-t", path, PYTHONPATH=path)
    assert out.returncode != 0
    assert "torch 2.10.1+cpu is older than 2.11" in out.stderr and "DITO_FAST_PURE_PYTHON=1" in out.stderr
    assert _setup("auto", PYTHONPATH=path).returncode == 0  # metadata commands still work


def test_sdist_carries_every_source_the_build_needs(tmp_path):
    """The sdist (made without torch, as an isolated build makes it) holds csrc/ whole (headers and
    the per-capability kernel units, which setuptools cannot see), CMakeLists.txt with the C++ unit
    tests it builds (tests/cpp) and the scripts: it had shipped 7 of csrc's files and failed to build."""
    import tarfile

    out = _setup("auto", "sdist", "-d", str(tmp_path / "dist"), PYTHONPATH=_without_torch(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = {str(p.relative_to(ROOT)) for d in ("csrc", "tests/cpp") for p in (ROOT / d).rglob("*") if p.is_file()}
    wanted |= {"CMakeLists.txt", "README.md", "setup.py", "scripts/check_cuda.sh", "dito_fast/__init__.py"}
    assert wanted <= names, sorted(wanted - names)
    assert not any(n.endswith((".so", ".o")) for n in names)

