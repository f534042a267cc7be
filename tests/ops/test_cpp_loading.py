"""The package without its C++ extension: it imports, warns once, and says which case it is."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("case", ["missing", "unloadable"])
def test_without_the_extension_the_warning_names_the_case(tmp_path, case):
    pkg = _copy_without_extension(tmp_path)
    if case == "unloadable":  # e.g. built against another torch: the file is there but does not load
        (pkg / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"not a shared object")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == str(pkg / "__init__.py")  # the copy, not the installed package
    if case == "missing":
        assert "LOAD_ERROR=not built" in out.stdout
        assert "dito_fast._C is not built; fused ops use other backends" in out.stderr
        assert "circular import" not in out.stderr
    else:
        assert "LOAD_ERROR=built but cannot be loaded:" in out.stdout
        assert out.stderr.count("dito_fast._C is built but cannot be loaded") == 1
