"""The CPUs this process may use, and the gate that keeps CPU-bound image work to that many
threads at once.

A download runs dozens of threads so that slow hosts overlap. Decoding, resizing and encoding
are CPU work: 32 threads doing it at once on two CPUs spent more CPU per image than two at a
time (working sets evicting each other from the caches, allocator arenas, GIL handoffs), and
in a full download held about 20 MB more at the peak. Threads past the gate wait on a
semaphore, which costs no CPU; fetches and stores go on meanwhile. BENCHMARKS.md ("Download")
has the figures.

Usage: ``with cpu_gate(): ...`` around CPU-bound work; ``available_cpus()``.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

#: cgroup v2's CPU quota of this process's group: "max 100000", or "200000 100000" for two CPUs.
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CPU_MAX) -> int:
    """CPUs this process may run on, not the machine's: its affinity (a container's cpuset),
    lowered to its cgroup's CPU quota (``docker run --cpus``, a Kubernetes CPU limit), rounded
    up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a line we do not know
        pass
    return cpus


def cpu_gate() -> threading.BoundedSemaphore:
    """The process-wide gate: one slot per available CPU."""
    return _GATE


# Made at import (imports are serialized): made on first use, threads arriving together could
# each make one and pass different gates.
_GATE = threading.BoundedSemaphore(available_cpus())
