"""The process's heap setting for image work, made once and early.

By default glibc raises its mmap threshold after the first large free, and from then on large
decode buffers come from per-thread heaps that keep the memory: eight threads that decode one
large image each in turn would hold eight images' worth. A fixed threshold makes glibc serve
every buffer of 4 MiB and more with mmap, and give it back on free, so the decode budget
(:mod:`ml.imaging`) bounds what the process actually holds.

Made as the first thing a download process does: made after the S3 client's start (whose
service models are large and freed), the dynamic threshold has already risen and the heaps
grown, and the same download peaks about 20 MB higher.

Usage: ``return_large_buffers_to_the_os()`` (idempotent; nothing on other C libraries).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

MiB = 1024 * 1024
_M_MMAP_THRESHOLD = -3


@functools.cache
def return_large_buffers_to_the_os() -> None:
    """Serve buffers of 4 MiB and more with mmap, always (glibc); once per process."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 4 * MiB)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
