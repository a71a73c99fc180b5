"""The CPUs this process may use, and the gate that keeps CPU-bound image work to that many
threads at once.

A download runs dozens of threads so that slow hosts overlap. Decoding, resizing and encoding
are CPU work: 32 threads doing it at once on two CPUs spend more CPU per image than two at a
time (working sets evicting each other from the caches, allocator arenas, GIL handoffs) and
finish later. Threads past the gate wait on a semaphore, which costs no CPU; fetches and
stores go on meanwhile. BENCHMARKS.md ("Download") has the figures.

Usage: ``with cpu_gate(): ...`` around CPU-bound work; ``available_cpus()``.
"""

from __future__ import annotations

import functools
import os
import threading


def available_cpus() -> int:
    """CPUs this process may run on (its affinity: a container's cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.cache
def cpu_gate() -> threading.BoundedSemaphore:
    """The process-wide gate: one slot per available CPU."""
    return threading.BoundedSemaphore(available_cpus())
