"""The CPU allocator: keep freed memory in the process instead of returning it to the OS.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its mmap
threshold (adaptive, at most 32 MiB) with fresh ``mmap``'d pages, unmaps them on ``free`` and
trims the top of the heap, so the next allocation of that size is paid again as one page
fault per 4 KiB when it is first written. The UNet's activations are such blocks: one dito-B
decoder step at 256x256 (batch 1) faulted in 2.5 GB (614k minor faults) and took 5.67 s on the
2-core development machine, against no faults and 4.46 s with freed memory kept (1.27x;
``benchmarks/bench_decode.py::test_cpu_allocator``, 2026-12-01).

:func:`keep_freed_memory` turns both off (``mallopt``: no mmap for large blocks, no trimming),
for the whole process and for the rest of its life. The cost: the process keeps the heap its
peak needed, as PyTorch's CUDA caching allocator does on the GPU. The ``dito-fast`` command
line calls it when it runs on the CPU (``--no-keep-freed-memory`` leaves glibc's default); a
library does not change a process-wide setting on its own, so services that call
:func:`dito_fast.fast_decode` on the CPU call it once at start-up, before starting threads
(glibc documents ``mallopt`` as unsafe to call while other threads allocate).

Threads: the setting covers glibc's main arena. Blocks that other threads allocate come from
per-thread arenas, whose heaps are capped at 64 MiB and still trim, so a service decoding in a
thread pool keeps only part of the gain (measured here, blocks allocated again and again in a
thread: 100 MiB ones still faulted every page, 20 MiB ones an eighth); starting it with
``MALLOC_ARENA_MAX=1`` in the environment sends every thread to the main arena (then none).
Other allocators (jemalloc, tcmalloc via ``LD_PRELOAD``) keep freed memory by design and need
nothing.
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
    does not apply (not Linux, a C library without glibc's ``mallopt``, or glibc refusing the
    setting: logged as a warning); never raises.
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
    if not mallopt(_M_MMAP_THRESHOLD, big):  # refused by glibc versions that cap it at 32 MiB
        logger.warning("keep_freed_memory: glibc refused to stop mmap'ing large blocks; allocator left as it is")
        return False
    if not mallopt(_M_TRIM_THRESHOLD, big):
        logger.warning("keep_freed_memory: glibc refused to stop trimming the heap; large blocks are no longer "
                       "mmap'd, but freed memory at the heap's top is still returned to the OS")
        return False
    _KEPT = True
    logger.debug("keep_freed_memory: glibc keeps freed memory (no mmap'd blocks, no trimming)")
    return True
