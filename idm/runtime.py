"""Process settings the ``idm`` command and the training scripts apply once at start-up.

:func:`keep_freed_memory` — CPU speed. PyTorch allocates CPU tensors with ``malloc``; glibc serves
blocks above ``M_MMAP_THRESHOLD`` (128 KiB, growing to at most 32 MiB) with fresh ``mmap`` pages
and gives them back on ``free``, so every new (B, 64, H, W) feature map page-faults its way into
memory again: a 26 MB buffer costs ~25 ms to allocate and fill, a 3×3 convolution on it ~95 ms.
Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse — what PyTorch's CPU
performance guide gets by preloading jemalloc or tcmalloc. Measured on the shipped ``idm-mri``
network (one 320² slice, one thread): 3.0 → 1.7 s. The price: memory freed by the process is
returned to the system at exit, not before (peak resident memory is unchanged).

Library users get it by calling the function themselves (or with the environment variables
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647``); ``IDM_KEEP_FREED_MEMORY=0``
turns it off for the command.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap (1 GiB; glibc before 2.26 accepts at most 32 MiB,
#: the fallback) ...
MMAP_THRESHOLDS = (1 << 30, 1 << 25)
#: ... and the heap keeps up to this much freed memory (the largest C int)
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (module doc); True when both were set. Does nothing (False)
    outside Linux, with another C library, or when ``IDM_KEEP_FREED_MEMORY=0``."""
    if not sys.platform.startswith("linux") or os.environ.get("IDM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap = any(mallopt(M_MMAP_THRESHOLD, value) for value in MMAP_THRESHOLDS)
    trim = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return mmap and trim
