"""``python -m ml`` with the CPU time of each download stage counted, thread by thread.

A sampling profiler counts a thread blocked in native code (a socket read, a Rust client
waiting on its runtime) as busy, so its shares mix CPU with waiting. This wrapper instead
reads each thread's own CPU clock (``time.thread_time``) around the stages of one URL (fetch,
normalize and its parts, store) and, at exit, writes one JSON object to the file named by
``CPU_PHASES_OUT``: calls and CPU seconds per stage, the CPU of the imports, and the process's
CPU (user and system) from ``getrusage``. Two more rows cut across the stages: the main
thread's own CPU after the imports (records, the pool's loop, manifest rows and parts) and the
garbage collector's, in whichever thread it ran. What no row covers is the threads the stages
start (the S3 client's runtime) and the download threads between stages.

Usage (``benchmarks/download.py --phases`` runs it and prints the table)::

    CPU_PHASES_OUT=/tmp/phases.json .venv/bin/python -m benchmarks.cpu_phases -q download ...
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

_START = time.process_time()

import ml.download  # noqa: E402  (the imports' CPU is measured from _START)
import ml.fetch  # noqa: E402
import ml.imaging  # noqa: E402
import ml.storage  # noqa: E402
from ml.cli import main  # noqa: E402

_IMPORTS = time.process_time() - _START
_MAIN_AFTER_IMPORTS = time.thread_time()  # the main thread's clock once the imports are done
_totals: dict[str, list[float]] = {}
_lock = threading.Lock()

#: (owner, attribute, stage name): the calls counted, outermost first.
STAGES = (
    (ml.download._Worker, "__call__", "one URL, all stages"),
    (ml.fetch.Fetcher, "fetch", "fetch (policy, HTTP, byte cap)"),
    (ml.download, "normalize_image", "normalize (checks, decode, resize, encode, hash)"),
    (ml.imaging, "_open_checked", "  header checks"),
    (ml.imaging, "_render", "  decode and resize"),
    (ml.imaging, "perceptual_hash", "  perceptual hash"),
    (ml.storage.ObjectStore, "put_bytes", "store (image PUTs, manifest parts)"),
)


def _counted(function: Callable[..., Any], stage: str) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            _add(stage, time.thread_time() - start)

    return counted


def _add(stage: str, seconds: float) -> None:
    """One more call of ``stage`` that took ``seconds`` of CPU."""
    with _lock:
        calls_and_seconds = _totals.setdefault(stage, [0, 0.0])
        calls_and_seconds[0] += 1
        calls_and_seconds[1] += seconds


_GC = "garbage collection (any thread)"
_collecting = threading.local()


def _collection(phase: str, info: dict[str, Any]) -> None:
    """A ``gc.callbacks`` entry: the collection's CPU on the thread that runs it."""
    if phase == "start":
        _collecting.since = time.thread_time()
        return
    now = time.thread_time()
    _add(_GC, now - getattr(_collecting, "since", now))


def _write() -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    main_thread = time.thread_time() - _MAIN_AFTER_IMPORTS  # atexit runs on the main thread
    gc_calls, gc_seconds = _totals.get(_GC, (0, 0.0))
    report = {
        "imports_s": _IMPORTS,
        "main_thread_s": main_thread,
        "gc": {"calls": int(gc_calls), "cpu_s": gc_seconds},
        "process_user_s": usage.ru_utime,
        "process_system_s": usage.ru_stime,
        "stages": {
            stage: {"calls": int(_totals[stage][0]), "cpu_s": _totals[stage][1]}
            for _, _, stage in STAGES
            if stage in _totals
        },
    }
    with open(os.environ["CPU_PHASES_OUT"], "w") as out:
        json.dump(report, out)


if __name__ == "__main__":
    for owner, attribute, stage in STAGES:
        setattr(owner, attribute, _counted(getattr(owner, attribute), stage))
    gc.callbacks.append(_collection)
    atexit.register(_write)
    raise SystemExit(main())
