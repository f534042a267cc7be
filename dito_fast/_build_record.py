"""What a build of dito_fast._C records beside it (``_C.build.json``) and how its sources are
fingerprinted: shared by setup.py, which loads this file by path (it imports no torch and no
other part of the package), and dito_fast.ops._cpp, which checks the record when it loads the
extension."""

from __future__ import annotations

import hashlib
import os

RECORD_NAME = "_C.build.json"


def sources_digest(csrc: str) -> str:
    """sha256 (16 hex digits) of every file under ``csrc`` (names relative to it, and contents),
    editor leftovers (hidden, ``#x#``, ``x~``) left out."""
    names = sorted(os.path.relpath(os.path.join(d, n), csrc).replace(os.sep, "/") for d, _, files in os.walk(csrc)
                   for n in files if not n.startswith((".", "#")) and not n.endswith("~"))
    h = hashlib.sha256()
    for name in names:
        with open(os.path.join(csrc, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]
