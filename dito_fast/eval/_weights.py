"""Reading the weight files of the metrics' pretrained networks (supplied by the user)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def read_state_dict(path: str | os.PathLike, what: str) -> dict:
    """The tensors of a state-dict file: ``.safetensors``, or a ``torch.save`` file read with
    ``weights_only=True`` (nothing is unpickled). ``what`` names the file in errors:
    FileNotFoundError when missing, ValueError when unreadable or not a dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path}: cannot be read ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {path}: not a state dict of tensors")
    return state
