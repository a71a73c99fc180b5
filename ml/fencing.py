"""Fencing by attempt: a stale attempt of a task can never write.

A worker that loses its heartbeat (a network partition, a stalled node, a task orphaned by a
killed worker) may keep running after the orchestrator has started the task's next try. Each
attempt therefore takes the task's **lease**, one small object in the store, with a conditional
write (``If-Match`` / ``If-None-Match``, so two attempts taking it at once cannot both win), and
every write the process makes afterwards checks first that the lease is still its own: object
store writes (:class:`ml.storage.ObjectStore`: checkpoints, manifest parts, images, results),
MLflow logging (:mod:`ml.tracking`) and registration (:mod:`ml.registry`). A newer try takes
the lease over; an older one cannot take it back. The attempt that lost it stops at its next
write with one line (:class:`StaleAttemptError`) and writes nothing more.

One attempt per process (an Airflow task runs in a process of its own): the held lease is this
process's, and it travels to torchrun's ranks in ``ML_ATTEMPT``. Without a lease (the CLI, the
tests) nothing is checked.

    with fencing.attempt(store, lease_uri, try_number=ti.try_number, task="train"):
        fine_tune(config)
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ml import storage
from ml.errors import PipelineError
from ml.redact import get_logger
from ml.storage import ObjectStore
from ml.uri import S3Uri

log = get_logger(__name__)

#: How the held lease reaches processes the attempt starts (torchrun's ranks).
ENVIRONMENT = "ML_ATTEMPT"

#: Content-addressed writes (images: the same bytes whoever writes them) check the lease at
#: most this often; every other write checks it each time.
IDEMPOTENT_CHECK_S = 1.0


class StaleAttemptError(PipelineError):
    """Another, newer attempt of this task holds its lease: this one must write nothing."""


@dataclass(frozen=True)
class Attempt:
    """One attempt of one task: its lease object, its try number and a token of its own."""

    lease: S3Uri
    try_number: int
    task: str
    owner: str

    def to_json(self) -> dict[str, Any]:
        return {
            "lease": str(self.lease),
            "try_number": self.try_number,
            "task": self.task,
            "owner": self.owner,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attempt:
        return cls(S3Uri.parse(data["lease"]), int(data["try_number"]), data["task"], data["owner"])

    def stale(self, holder: dict[str, Any]) -> StaleAttemptError:
        return StaleAttemptError(
            f"try {self.try_number} of {self.task} was superseded by try "
            f"{holder.get('try_number', '?')} (its lease {self.lease} is taken): this attempt "
            "stops here and writes nothing more; the newer try carries the task on"
        )


class _Held:
    """The attempt this process works for, and when its lease was last confirmed."""

    def __init__(self) -> None:
        self.attempt: Attempt | None = None
        self.store: ObjectStore | None = None
        self.confirmed = 0.0
        self.lost: StaleAttemptError | None = None
        self.lock = threading.Lock()


_held = _Held()


def take(store: ObjectStore, lease: S3Uri, try_number: int, task: str) -> Attempt:
    """Take ``lease`` for try ``try_number`` of ``task``: a lease held by an older try (or by
    this try's earlier delivery) is taken over; one held by a newer try is refused."""
    mine = Attempt(lease, try_number, task, uuid.uuid4().hex)
    body = json.dumps({**mine.to_json(), "taken_at": time.time()}).encode()
    for _ in range(20):  # conditional writes: two takers at once cannot both win
        found = store.get_with_etag(lease)
        if found is not None:
            holder = json.loads(found[0])
            if int(holder.get("try_number", 0)) > try_number:
                raise mine.stale(holder)
        written = store.put_bytes(
            lease,
            body,
            content_type="application/json",
            if_absent=found is None,
            if_match=found[1] if found is not None else None,
            fenced=False,
        )
        if written:
            if found is not None and json.loads(found[0]).get("owner") != mine.owner:
                log.info("%s try %d takes over its lease from an earlier try", task, try_number)
            return mine
    raise PipelineError(f"could not take the lease {lease}: it changed 20 times in a row")


def install(attempt: Attempt | None, store: ObjectStore | None = None) -> None:
    """Make ``attempt`` the one this process writes for (None: no fencing)."""
    with _held.lock:
        _held.attempt, _held.store, _held.confirmed, _held.lost = attempt, store, 0.0, None
    if attempt is None:
        os.environ.pop(ENVIRONMENT, None)
    else:
        os.environ[ENVIRONMENT] = json.dumps(attempt.to_json())


def install_from_environment() -> None:
    """In a process started by an attempt (a torchrun rank): check its lease too."""
    raw = os.environ.get(ENVIRONMENT, "")
    if raw and _held.attempt is None:
        install(Attempt.from_json(json.loads(raw)))


def held() -> Attempt | None:
    return _held.attempt


def check(*, idempotent: bool = False) -> None:
    """Before a write: raise :class:`StaleAttemptError` unless this process's attempt still holds
    its lease (nothing to do without one). Once lost, every later check fails at once."""
    attempt = _held.attempt
    if attempt is None:
        return
    if _held.lost is not None:
        raise _held.lost
    if idempotent and time.monotonic() - _held.confirmed < IDEMPOTENT_CHECK_S:
        return
    store = _held.store
    if store is None:
        store = _held.store = ObjectStore()
    found = store.get_with_etag(attempt.lease)
    holder = json.loads(found[0]) if found is not None else {}
    if holder.get("owner") != attempt.owner:
        _held.lost = attempt.stale(holder)
        log.error("%s", _held.lost)
        raise _held.lost
    _held.confirmed = time.monotonic()


@contextmanager
def attempt(
    store: ObjectStore, lease: S3Uri | None, try_number: int, task: str
) -> Iterator[Attempt | None]:
    """Hold ``lease`` for this attempt while inside (no lease: nothing is fenced)."""
    if lease is None:
        yield None
        return
    taken = take(store, lease, try_number, task)
    install(taken, store)
    try:
        yield taken
    finally:
        install(None)


storage.WRITE_CHECKS.append(check)  # every fenced store write asks the lease first
