"""``python -m dito_fast.train``: the same flags as ``dito-fast train``, and the command's global
flags (``-v``, ``--[no-]keep-freed-memory``) anywhere on the line."""

import sys

from ..cli import main

GLOBAL_FLAGS = ("-v", "--verbose", "--keep-freed-memory", "--no-keep-freed-memory")

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main([*(a for a in argv if a in GLOBAL_FLAGS), "train", *(a for a in argv if a not in GLOBAL_FLAGS)]))
