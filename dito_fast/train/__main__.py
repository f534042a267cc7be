"""``python -m dito_fast.train``: the same flags as ``dito-fast train``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
