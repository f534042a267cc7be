"""Triton kernels for the fused ops, one module per op (DESIGN.md §3).

Every module imports without triton installed; its ``unsupported_reasons`` then answers
``["triton is not installed"]``. The public op functions are registered with
``torch.library.triton_op`` (namespace ``dito_fast_triton``) and launch their kernels through
``torch.library.wrap_triton``, so autograd and ``torch.compile(fullgraph=True)`` see them.

Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
these modules were imported (the tests use this): ``@triton.jit`` chooses the interpreter when a
kernel is defined. Loads are converted to float32 and reductions, normalisation and softmax
statistics run in float32, whatever the storage dtype (float32, float16, bfloat16); attention's
matrix products take their operands in the storage dtype (P and dS rounded to it) with float32
accumulation, and float32 products may use TF32 where torch allows it.
"""

import os

import torch

try:
    import triton  # noqa: F401  (absolute import: the top-level triton package)
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the package must import without triton
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest grid along axes 1 and 2 on CUDA.
MAX_GRID_YZ = 65535


# Whether the kernels below were defined for Triton's CPU interpreter: the variable counts when
# they are defined, at import (set later, the reasons would accept CPU tensors that the compiled
# kernels then fail to launch with "0 active drivers").
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def tensor_reasons(optional: tuple[str, ...] = (), **tensors) -> list[str]:
    """Reasons shared by every Triton op: triton present, tensors on a usable device, dtype.

    ``tensors`` maps argument names to tensors; names listed in ``optional`` may also be None.
    """
    if not HAS_TRITON:
        return ["triton is not installed"]
    reasons = []
    devices = set()
    for name, t in tensors.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            reasons.append(f"{name} is not a tensor")
            continue
        devices.add(t.device)
        if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
            reasons.append(f"{name} is on {t.device.type}, not cuda"
                           + ("" if t.device.type != "cpu" else
                              " (CPU needs TRITON_INTERPRET=1 set before dito_fast's Triton kernels are imported)"))
        if t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if len(devices) > 1:
        reasons.append(f"inputs are on different devices: {sorted(str(d) for d in devices)}")
    return reasons


# Element offsets up to this fit the kernels' 32-bit index arithmetic; beyond it they are launched
# with IDX64=True and compute offsets in int64 (a few more integer instructions per address, so
# only where needed). Tests lower it to run the 64-bit path on small tensors.
INT32_OFFSET_LIMIT = 2**31 - 1


def needs_int64(*tensors, lead: int = 1) -> bool:
    """True when, within one index of the ``lead`` leading dims (batch, or batch and head, whose
    offsets the kernels compute in int64), an element of one of ``tensors`` (None skipped) lies
    more than INT32_OFFSET_LIMIT elements from the first."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[lead:], t.stride()[lead:])) > INT32_OFFSET_LIMIT
               for t in tensors if t is not None and t.numel() > 0)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_channels_last(t: torch.Tensor) -> bool:
    """4-D tensor laid out NHWC and not also plain contiguous (C == 1 or H == W == 1 are both)."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def dense_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with the memory layout of ``ref`` (contiguous or channels_last), copying if needed."""
    if is_channels_last(ref):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()
