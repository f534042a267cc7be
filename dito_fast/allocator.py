"""The CPU allocator: keep freed memory in the process instead of returning it to the OS.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its mmap
threshold (adaptive, at most 32 MiB) with fresh ``mmap``'d pages, unmaps them on ``free`` and
trims the top of the heap, so the next allocation of that size is paid again as one page
fault per 4 KiB when it is first written. The UNet's activations are such blocks: one dito-B
decoder step at 256x256 (batch 1) faulted in 2.4 GB (614k minor faults) and took 5.67 s on the
2-core development machine, against no faults and 4.46 s with freed memory kept (1.27x;
``benchmarks/bench_decode.py::test_cpu_allocator``, 2026-12-01).

:func:`keep_freed_memory` turns both off (``mallopt``: no mmap for large blocks, no trimming),
for the whole process and for the rest of its life. The cost: the process keeps the heap its
peak needed, as PyTorch's CUDA caching allocator does on the GPU. The ``dito-fast`` command
line calls it (``--no-keep-freed-memory`` leaves glibc's default); a library does not change a
process-wide setting on its own, so services that call :func:`dito_fast.fast_decode` on the CPU
call it once at start-up. Other allocators (jemalloc, tcmalloc via ``LD_PRELOAD``) keep freed
memory by design and need nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_KEPT = False


def keep_freed_memory() -> bool:
    """Keep freed CPU memory in this process (glibc ``mallopt``); see the module docstring.

    Returns True when the setting is in force (now or from an earlier call), False where it
    does not apply (not Linux, or a C library without glibc's ``mallopt``); never raises.
    """
    global _KEPT
    if _KEPT:
        return True
    if not sys.platform.startswith("linux"):
        logger.debug("keep_freed_memory: not Linux (%s); allocator left as it is", sys.platform)
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        logger.debug("keep_freed_memory: no glibc mallopt (%s); allocator left as it is", e)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    big = 2**31 - 1
    # Some glibc versions refuse an mmap threshold above half their heap size (32 MiB on 64-bit).
    _KEPT = bool(mallopt(_M_TRIM_THRESHOLD, big)) and bool(
        mallopt(_M_MMAP_THRESHOLD, big) or mallopt(_M_MMAP_THRESHOLD, 32 * 2**20))
    if _KEPT:
        logger.debug("keep_freed_memory: glibc keeps freed memory (no mmap'd blocks, no trimming)")
    else:
        logger.debug("keep_freed_memory: mallopt refused the setting; allocator left as it is")
    return _KEPT
