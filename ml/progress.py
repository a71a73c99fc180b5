"""Progress for long stages: a live bar on a terminal, periodic count lines in logs elsewhere."""

from __future__ import annotations

import sys
import time
from collections import Counter
from types import TracebackType
from typing import Any

from ml.redact import get_logger

log = get_logger(__name__)


class Progress:
    """Usage: ``with Progress(total, "download") as bar: bar.advance("ok")``. A total not known
    up front is 0, and :meth:`set_total` gives it once it is."""

    def __init__(self, total: int, description: str, *, log_every: float = 15.0) -> None:
        self.total = total
        self.description = description
        self.counts: Counter[str] = Counter()
        self._log_every = log_every
        self._last_log = time.monotonic()
        self._bar: Any = None
        self._task: Any = None
        self._entered = False
        self._make_bar()

    def _make_bar(self) -> None:
        """A live bar, on a terminal and once the total is known."""
        if sys.stderr.isatty() and self.total > 0:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[counts]}"),
                transient=False,
            )

    def __enter__(self) -> Progress:
        self._entered = True
        self._start_bar()
        return self

    def _start_bar(self) -> None:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, counts="")

    def set_total(self, total: int) -> None:
        """The total, once it is known: the bar (on a terminal) and the log lines count to it."""
        self.total = total
        if self._bar is None:
            self._make_bar()
            if self._entered:
                self._start_bar()
        elif self._task is not None:
            self._bar.update(self._task, total=total)

    def advance(self, status: str, count: int = 1) -> None:
        self.counts[status] += count
        if self._bar is not None:
            self._bar.update(self._task, advance=count, counts=self._summary())
        elif time.monotonic() - self._last_log >= self._log_every:
            self._last_log = time.monotonic()
            log.info("%s: %s done (%s)", self.description, self._done(), self._summary())

    def _summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.counts.most_common())

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        log.info(
            "%s: %s done (%s)", self.description, self._done(), self._summary() or "nothing to do"
        )

    def _done(self) -> str:
        """``n/total``, or ``n`` when the total is not known up front (``total=0``)."""
        done = self.counts.total()
        return f"{done}/{self.total}" if self.total else str(done)
