"""The ``triton`` backend: kernels in dito_fast/kernels/triton, loaded only when they can run.

Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, for tests).
Importing triton costs seconds, so on a machine without CUDA the modules are imported only if a
call could actually use them; with CUDA (or the interpreter) they are imported with dito_fast.ops
so that torch.compile never traces an import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ._dispatch import Backend, autograd_mode_reasons

MODULES = ("fm", "latent_layernorm", "group_norm_modulate_silu", "attention")
_loaded: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _module(name: str):
    if name not in _loaded:
        _loaded[name] = importlib.import_module(f"dito_fast.kernels.triton.{name}")
    return _loaded[name]


def _could_run(args) -> list[str]:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not any(t.device.type == "cuda" for t in tensors) and not _interpreting():
        return ["Triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"]
    if "triton" not in _loaded and importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    return []


def backend(module: str, fn_name: str, reasons_name: str = "unsupported_reasons") -> Backend:
    """A dispatcher entry for ``dito_fast.kernels.triton.<module>.<fn_name>``."""

    def reasons(*args, **kwargs) -> list[str]:
        early = _could_run(args) or autograd_mode_reasons()
        return early or getattr(_module(module), reasons_name)(*args, **kwargs)

    def fn(*args, **kwargs):
        op = getattr(_module(module), fn_name)
        # Triton launches on the current CUDA device and its stream: tensors on another GPU (a
        # model moved to cuda:1 without torch.cuda.set_device) make that device current for the
        # call. The backward runs on autograd's per-device thread, where it already is; compiled
        # graphs place their own device guards.
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"), None)
        if device is None or torch.compiler.is_compiling():
            return op(*args, **kwargs)
        with torch.cuda.device(device):
            return op(*args, **kwargs)

    return Backend("triton", fn, reasons)


if (torch.cuda.is_available() or _interpreting()) and importlib.util.find_spec("triton") is not None:
    for _name in MODULES:
        _module(_name)
    _loaded["triton"] = True
