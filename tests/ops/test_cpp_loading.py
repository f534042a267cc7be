"""The package without its C++ extension: it imports, warns once, and says which case it is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# The editable install's finder maps dito_fast._C to the checkout's build whatever dito_fast.__path__
# says: the probe sets it aside, as for a copy installed without the extension.
PROBE = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
         "import logging; logging.basicConfig(level=logging.WARNING); import dito_fast; "
         "from dito_fast.ops import _cpp; print(dito_fast.__file__); print('LOAD_ERROR=' + _cpp.LOAD_ERROR)")


def _copy_without_extension(dest: Path) -> Path:
    shutil.copytree(ROOT / "dito_fast", dest / "dito_fast", ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd",
                                                                                           "__pycache__"))
    return dest / "dito_fast"


@pytest.mark.parametrize("case", ["missing", "unloadable", "other_torch", "registered", "stale"])
def test_without_the_extension_the_warning_names_the_case(tmp_path, case):
    pkg = _copy_without_extension(tmp_path)
    if case != "missing":  # a file that is not a loadable extension
        (pkg / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"not a shared object")
    if case in ("other_torch", "stale"):  # what setup.py records next to the extension it builds
        built = {"torch": "0.0.1" if case == "other_torch" else torch.__version__, "sources_digest": "0" * 16,
                 "source_dir": str(tmp_path / "csrc")}
        (pkg / "_C.build.json").write_text(json.dumps(built))
        (tmp_path / "csrc").mkdir()
        (tmp_path / "csrc" / "a.cpp").write_text("// changed since the build")
    probe = PROBE
    if case == "registered":  # another library (a CMake build) registered the ops first
        probe = "import torch; torch.library.define('dito_fast::fm_noise', '(Tensor x) -> Tensor'); " + PROBE
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == str(pkg / "__init__.py")  # the copy, not the installed package
    if case == "missing":
        assert "LOAD_ERROR=not built" in out.stdout
        assert "dito_fast._C is not built; fused ops use other backends" in out.stderr
        assert "circular import" not in out.stderr
    elif case == "other_torch":  # refused before it is loaded (its symbols may resolve with wrong layouts)
        assert f"LOAD_ERROR=built against torch 0.0.1, but this is torch {torch.__version__}: rebuild it" in out.stdout
    elif case == "registered":  # (loading it as well would abort the process)
        assert "LOAD_ERROR=not loaded: the dito_fast ops are registered already, by another library" in out.stdout
    else:
        assert "LOAD_ERROR=built but cannot be loaded:" in out.stdout
        assert out.stderr.count("dito_fast._C is built but cannot be loaded") == 1
        assert ("is older than the sources in" in out.stderr) == (case == "stale")
