"""What a finished download saw, so that a rerun with nothing to do costs a few requests.

A download that leaves every record done (stored ok, or forgotten) writes
``downloads/state.json``: a fingerprint of what it read (the records object's ETag, and the
keys and sizes of every manifest part and every forget request) and the summary it printed. A
rerun first takes the same fingerprint; when it is unchanged and the manifest is still the one
that download wrote, nothing can have become missing, so the rerun answers from the state
without reading the records or the parts (and without loading pandas or pyarrow: the start of
the process is most of a no-op rerun's cost).

The fingerprint is taken *before* the data it covers is read. A change that lands between the
two is therefore missing from the fingerprint, and the next rerun does the full check: a race
can cost a full rerun, never a skipped one.

Usage::

    seen = observe(store, layout)            # before reading records and parts
    ...                                      # read, download, write the manifest
    remember(store, layout, seen, summary)   # only when every record is done
    already_done(store, layout)              # a rerun's summary, or None
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ml.errors import PipelineError
from ml.layout import DatasetLayout, StoreLayout
from ml.redact import get_logger
from ml.statuses import Status
from ml.storage import ObjectStore

log = get_logger(__name__)
#: Manifest statuses of a record that a rerun will never fetch again.
DONE = frozenset({Status.OK.value, Status.FORGOTTEN.value})
_VERSION = 1


@dataclass(frozen=True)
class Seen:
    """The fingerprint of a dataset's download inputs at one moment."""

    records_etag: str
    parts: str
    forget_requests: str

    @classmethod
    def of(
        cls,
        records_etag: str,
        store: ObjectStore,
        layout: DatasetLayout,
        parts: list[tuple[str, int]],
    ) -> Seen:
        """The fingerprint of records with ETag ``records_etag``, the manifest parts'
        listing ``parts`` (taken before they are read) and the forget requests listed now."""
        requests = store.list_objects(StoreLayout.parse(layout.store).forget_ledger)
        return cls(records_etag, _fingerprint(parts), _fingerprint(requests))

    def with_parts(
        self, store: ObjectStore, layout: DatasetLayout, parts: list[tuple[str, int]]
    ) -> Seen:
        """The same records, with ``parts`` and the forget requests listed again now."""
        return Seen.of(self.records_etag, store, layout, parts)

    def token(self) -> str:
        text = json.dumps([_VERSION, self.records_etag, self.parts, self.forget_requests])
        return hashlib.sha256(text.encode()).hexdigest()


def _fingerprint(listing: list[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def observe(store: ObjectStore, layout: DatasetLayout) -> Seen | None:
    """The fingerprint now; None when the records are missing (the read after says why)."""
    etag = store.etag(layout.records)
    if etag is None:
        return None
    return Seen.of(etag, store, layout, store.list_objects(layout.download_parts))


def remember(
    store: ObjectStore, layout: DatasetLayout, seen: Seen | None, summary: dict[str, Any]
) -> None:
    """Keep ``summary`` for reruns when every record is done; otherwise drop any older state
    (a rerun has work to do)."""
    done = set(summary["statuses"]) <= DONE
    if seen is None or not done:
        if store.exists(layout.download_state):
            store.delete(layout.download_state)
        return
    state = {
        "version": _VERSION,
        "token": seen.token(),
        "manifest_etag": store.etag(layout.download_manifest),
        "statuses": summary["statuses"],
        "images": summary["images"],
        "manifest": summary["manifest"],
    }
    store.write_json(layout.download_state, state)


def already_done(store: ObjectStore, layout: DatasetLayout) -> dict[str, Any] | None:
    """A rerun's summary when nothing changed since a download that left every record done
    (nothing is fetched or written); None when the full rerun has to look."""
    found = store.get_with_etag(layout.download_state)
    if found is None:
        return None
    try:
        state = json.loads(found[0])
        token, statuses = state["token"], dict(state["statuses"])
        unchanged = (
            state["version"] == _VERSION
            and (seen := observe(store, layout)) is not None
            and seen.token() == token
            and store.etag(layout.download_manifest) == state["manifest_etag"]
        )
    except (ValueError, KeyError, TypeError, PipelineError) as exc:
        log.info("download state not usable (%s): checking every record", type(exc).__name__)
        return None
    if not unchanged:
        return None
    done = sum(int(n) for n in statuses.values())
    log.info(
        "nothing to fetch: all %d records are downloaded or forgotten, and the records, the "
        "manifest parts and the forget requests are as the last download left them",
        done,
    )
    return {
        "statuses": statuses,
        "downloaded": 0,
        "skipped_existing": done,
        "bytes": 0,
        "stored_new": 0,
        "manifest": state["manifest"],
        "images": state["images"],
    }
