"""Download: fetch every image of a dataset into the store, safely, in parallel, incrementally.

Work is split into batches (:func:`plan_batches`, at most 1024, so Airflow can map them);
:func:`download_batch` runs one batch on a bounded thread pool and appends manifest *parts*
as it goes; :func:`collect_manifest` folds all parts into one row per URL. :func:`download`
does all three in one process (the CLI). A rerun, or a rerun after a kill, fetches only URLs
without an ``ok`` row, and images are content-addressed with conditional writes, so an object
is never written twice.

Statuses in the manifest (column ``status``):

==================== ==============================================================
``ok``               fetched, verified, normalized and stored
``invalid_url``      the URL cannot be parsed
``blocked``          the address policy refused the host or a redirect target (SSRF)
``connection_error`` DNS failure, refused or reset connection, TLS error
``timeout``          connect/read timeout or the per-image deadline ran out
``http_error``       the server answered a non-2xx status (see ``http_status``)
``too_many_redirects`` more than the allowed redirects, or a redirect loop
``too_large``        the body exceeds the byte cap
``not_image``        the bytes are not JPEG, PNG, WebP or GIF (whatever the Content-Type)
``too_many_pixels``  the image header declares more pixels (or decode memory) than allowed
``too_complex``      a JPEG with more scans than allowed (a CPU bomb), refused before decoding
``undecodable``      a supported format, but truncated or corrupt
``store_error``      the image could not be written to the object store
``internal_error``   an unexpected error in our code (a bug: please report it)
``pending``          not attempted yet (only in a manifest collected mid-way)
==================== ==============================================================
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from ml.errors import PipelineError
from ml.fetch import FetchConfig, Fetcher, FetchError
from ml.imaging import ImageConfig, ImageRejected, normalize_image
from ml.layout import DatasetLayout
from ml.netpolicy import AddressPolicy, Resolver
from ml.params import DOWNLOAD, PARAMETERS, check_all
from ml.redact import get_logger, redact_text, redact_url
from ml.storage import ObjectStore, S3Uri

log = get_logger(__name__)

STATUSES = (
    "ok",
    "invalid_url",
    "blocked",
    "connection_error",
    "timeout",
    "http_error",
    "too_many_redirects",
    "too_large",
    "not_image",
    "too_many_pixels",
    "too_complex",
    "undecodable",
    "store_error",
    "internal_error",
    "pending",
)
MANIFEST_COLUMNS = (
    "url",
    "status",
    "http_status",
    "bytes",
    "sha256",
    "width",
    "height",
    "object_key",
    "attempts",
    "elapsed_s",
    "error",
    "id",
    "label",
    "row",
    "fetched_at",
)
_DTYPES = {
    "http_status": "Int64",
    "bytes": "int64",
    "width": "Int64",
    "height": "Int64",
    "attempts": "int64",
    "elapsed_s": "float64",
    "row": "int64",
}
MAX_BATCHES = 1024


@dataclass(frozen=True)
class DownloadConfig:
    """The download stage's limits; each field a parameter of :mod:`ml.params`."""

    download_concurrency: int = PARAMETERS["download_concurrency"].default
    #: Networks the address policy opens (CIDR), e.g. ``127.0.0.0/8`` for a local server.
    allow_networks: tuple[str, ...] = ()
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    #: A manifest part is written after this many results or seconds, whichever comes first.
    flush_rows: int = PARAMETERS["flush_rows"].default
    flush_seconds: float = 20.0

    def __post_init__(self) -> None:
        PARAMETERS["download_concurrency"].check(self.download_concurrency)
        PARAMETERS["max_bytes"].check(self.fetch.max_bytes)

    @classmethod
    def from_values(
        cls, values: Mapping[str, Any], allow_networks: Sequence[str] = ()
    ) -> DownloadConfig:
        """The configuration the download parameters describe (defaults where absent)."""
        v = check_all(values, DOWNLOAD)
        fetch = FetchConfig(
            connect_timeout=v["connect_timeout"],
            read_timeout=v["read_timeout"],
            deadline=v["deadline"],
            retries=v["retries"],
            max_bytes=v["max_bytes"],
            per_host=v["per_host"],
        )
        return cls(
            download_concurrency=v["download_concurrency"],
            allow_networks=tuple(allow_networks),
            fetch=fetch,
            image=ImageConfig(max_side=v["max_side"], max_pixels=v["max_pixels"]),
            flush_rows=v["flush_rows"],
        )


@dataclass(frozen=True)
class BatchSpec:
    """A slice ``[start, stop)`` of a dataset's records; small enough for an XCom."""

    dataset: str
    batch: int
    start: int
    stop: int
    pending: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> BatchSpec:
        return cls(**payload)


@dataclass
class BatchResult:
    statuses: Counter[str] = field(default_factory=Counter)
    downloaded: int = 0
    skipped_existing: int = 0
    bytes: int = 0
    stored_new: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "downloaded": self.downloaded,
            "skipped_existing": self.skipped_existing,
            "bytes": self.bytes,
            "stored_new": self.stored_new,
        }


def _part_range(key: str) -> tuple[int, int] | None:
    folder = key.rsplit("/", 2)[-2]
    start, _, stop = folder.partition("-")
    return (int(start), int(stop)) if start.isdigit() and stop.isdigit() else None


@dataclass
class Parts:
    """Manifest rows read from the parts, and the objects among them that could not be used."""

    rows: pd.DataFrame
    unreadable: list[str] = field(default_factory=list)


def read_parts(
    layout: DatasetLayout, store: ObjectStore, window: tuple[int, int] | None = None
) -> Parts:
    """Every manifest row written so far (all attempts), optionally only parts overlapping
    the record window ``[start, stop)``.

    Objects this project did not write (folder markers that S3 consoles create, empty files,
    junk or truncated Parquet, a part with other columns) are skipped and named in a warning;
    the rows they would have held are simply fetched again.
    """
    frames = []
    unreadable: list[str] = []
    for key, size in store.list_objects(layout.download_parts):
        if key.endswith("/") and size == 0:
            continue  # a folder marker
        span = _part_range(key)
        if window and span and (span[1] <= window[0] or span[0] >= window[1]):
            continue
        frame = _read_part(store, S3Uri(layout.store.bucket, key), size)
        if frame is None:
            unreadable.append(key)
        else:
            frames.append(frame)
    if unreadable:
        log.warning(
            "skipped %d manifest part(s) that are not readable manifest Parquet (their URLs are "
            "fetched again): %s%s",
            len(unreadable),
            ", ".join(unreadable[:5]),
            " ..." if len(unreadable) > 5 else "",
        )
    if not frames:
        return Parts(pd.DataFrame(columns=list(MANIFEST_COLUMNS)), unreadable)
    return Parts(pd.concat(frames, ignore_index=True), unreadable)


def _read_part(store: ObjectStore, uri: S3Uri, size: int) -> pd.DataFrame | None:
    if size == 0 or not uri.key.endswith(".parquet"):
        return None
    try:
        frame = store.read_parquet(uri)
    except PipelineError:
        return None
    if not {"status", "row", "url", "fetched_at"} <= set(frame.columns):
        return None
    return frame


def _ok_rows(parts: pd.DataFrame) -> set[int]:
    return {int(r) for r in parts.loc[parts["status"] == "ok", "row"]}


def read_records(layout: DatasetLayout, store: ObjectStore) -> pd.DataFrame:
    """The dataset's records; one clear error when they are missing or unreadable."""
    return store.read_parquet(
        layout.records, hint="run ingest again to rewrite it (the dataset id stays the same)"
    )


def plan_batches(
    dataset: str,
    *,
    batch_size: int = 500,
    max_batches: int = MAX_BATCHES,
    store: ObjectStore | None = None,
) -> list[BatchSpec]:
    """The batches that still have URLs without an ok row (at most ``max_batches``)."""
    layout = DatasetLayout.parse(dataset)
    store = store or ObjectStore()
    records = read_records(layout, store)
    done = _ok_rows(read_parts(layout, store).rows)
    size = max(1, batch_size, math.ceil(len(records) / max_batches))
    rows = records["row"].tolist()
    batches = []
    for number, start in enumerate(range(0, len(rows), size)):
        stop = min(start + size, len(rows))
        pending = sum(1 for row in rows[start:stop] if row not in done)
        if pending:
            batches.append(BatchSpec(dataset, number, start, stop, pending))
    log.info(
        "planned %d batches of up to %d URLs (%d URLs already ok)", len(batches), size, len(done)
    )
    return batches


class _PartWriter:
    """Appends manifest rows to the store in parts, so a kill loses at most one part."""

    def __init__(
        self, store: ObjectStore, layout: DatasetLayout, spec: BatchSpec, config: DownloadConfig
    ) -> None:
        self._store, self._layout, self._spec, self._config = store, layout, spec, config
        self._rows: list[dict[str, Any]] = []
        self._last = time.monotonic()
        self.parts = 0

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if (
            len(self._rows) >= self._config.flush_rows
            or time.monotonic() - self._last >= self._config.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._rows:
            return
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        folder = f"{self._spec.start:08d}-{self._spec.stop:08d}"
        uri = self._layout.download_parts.child(folder, f"{stamp}-{uuid.uuid4().hex[:8]}.parquet")
        frame = pd.DataFrame.from_records(self._rows, columns=list(MANIFEST_COLUMNS))
        self._store.write_parquet(uri, frame.astype(_DTYPES))
        self._rows = []
        self.parts += 1


def _row(record: dict[str, Any], status: str, started: float, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(
        url=redact_url(record["url"]),
        id=record["id"],
        label=record["label"],
        row=record["row"],
        status=status,
        bytes=0,
        attempts=0,
        error="",
    )
    row.update(values)
    row["elapsed_s"] = round(time.monotonic() - started, 4)
    row["fetched_at"] = datetime.now(UTC).isoformat()
    return row


class _Worker:
    """Fetch, verify, normalize and store one URL; every failure becomes a status, not a raise."""

    def __init__(
        self, fetcher: Fetcher, store: ObjectStore, layout: DatasetLayout, image: ImageConfig
    ) -> None:
        self.fetcher, self.store, self.layout, self.image = fetcher, store, layout, image

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            return self._run(record, started)
        except Exception as exc:  # one bad URL must never stop the others
            log.exception("unexpected error on row %s", record["row"])
            message = redact_text(f"{type(exc).__name__}: {exc}")
            return _row(record, "internal_error", started, error=message)

    def _run(self, record: dict[str, Any], started: float) -> dict[str, Any]:
        url = record["url"]
        try:
            parts = urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            return _row(record, "invalid_url", started, error="not an http(s) URL with a host")
        try:
            response = self.fetcher.fetch(url)
        except FetchError as exc:
            return _row(
                record,
                exc.status,
                started,
                http_status=exc.http_status,
                attempts=exc.attempts,
                error=str(exc),
            )
        common = {
            "http_status": response.http_status,
            "bytes": len(response.body),
            "attempts": response.attempts,
        }
        try:
            image = normalize_image(response.body, self.image)
        except ImageRejected as exc:
            return _row(record, exc.status, started, error=str(exc), **common)
        key = self.layout.image(image.sha256)
        try:
            written = self.store.put_bytes(
                key, image.data, content_type="image/jpeg", if_absent=True
            )
        except PipelineError as exc:
            return _row(record, "store_error", started, error=str(exc), **common)
        return _row(
            record,
            "ok",
            started,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
            object_key=key.key,
            stored_new=written,
            **common,
        )


def download_batch(
    spec: BatchSpec,
    config: DownloadConfig | None = None,
    *,
    store: ObjectStore | None = None,
    resolver: Resolver | None = None,
    on_result: Callable[[str], None] | None = None,
) -> BatchResult:
    """Download the URLs of one batch that have no ok row yet; append manifest parts."""
    config = config or DownloadConfig()
    layout = DatasetLayout.parse(spec.dataset)
    store = store or ObjectStore(max_pool_connections=config.download_concurrency + 4)
    try:
        policy = AddressPolicy.from_cidrs(config.allow_networks, resolver)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    records = read_records(layout, store).iloc[spec.start : spec.stop]
    done = _ok_rows(read_parts(layout, store, (spec.start, spec.stop)).rows)
    todo = [r for r in records.to_dict("records") if r["row"] not in done]
    result = BatchResult(skipped_existing=len(records) - len(todo))
    if not todo:
        return result
    fetcher = Fetcher(config.fetch, policy)
    worker = _Worker(fetcher, store, layout, config.image)
    writer = _PartWriter(store, layout, spec, config)

    def handle(future: Future[dict[str, Any]]) -> None:
        row = future.result()
        stored_new = bool(row.pop("stored_new", False))
        result.statuses[row["status"]] += 1
        if row["status"] == "ok":
            result.downloaded += 1
            result.bytes += int(row["bytes"])
            result.stored_new += stored_new
        writer.add(row)
        if on_result:
            on_result(row["status"])

    pool = ThreadPoolExecutor(
        max_workers=config.download_concurrency, thread_name_prefix="download"
    )
    inflight: set[Future[dict[str, Any]]] = set()
    try:
        for record in todo:
            if len(inflight) >= 2 * config.download_concurrency:  # bounded queue: flat memory
                finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for future in finished:
                    handle(future)
            inflight.add(pool.submit(worker, record))
        for future in _as_completed(inflight):
            handle(future)
        inflight = set()
    finally:
        pool.shutdown(wait=not inflight, cancel_futures=True)
        writer.flush()
        fetcher.close()
    if result.statuses["store_error"]:
        raise PipelineError(
            f"{result.statuses['store_error']} images could not be written to the store "
            f"(manifest rows kept); check the store and rerun: only missing images are fetched"
        )
    return result


def _as_completed(futures: Iterable[Future[dict[str, Any]]]) -> Iterable[Future[dict[str, Any]]]:
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        yield from finished


def collect_manifest(dataset: str, *, store: ObjectStore | None = None) -> dict[str, Any]:
    """Fold every manifest part into one row per record (an ok row wins, else the latest)."""
    layout = DatasetLayout.parse(dataset)
    store = store or ObjectStore()
    records = read_records(layout, store)
    found = read_parts(layout, store)
    parts = found.rows[found.rows["row"].isin(records["row"])]
    parts = parts.assign(_ok=parts["status"] == "ok").sort_values(
        ["_ok", "fetched_at"], ascending=False, kind="stable"
    )
    best = parts.drop_duplicates("row").drop(columns="_ok")
    best = best.assign(url=best["url"].map(redact_url))  # parts written before redaction
    missing = records.loc[~records["row"].isin(best["row"])]
    pending = pd.DataFrame(
        {
            "url": [redact_url(u) for u in missing["url"]],
            "status": "pending",
            "bytes": 0,
            "attempts": 0,
            "elapsed_s": 0.0,
            "error": "",
            "id": missing["id"],
            "label": missing["label"],
            "row": missing["row"],
        }
    )
    frames = [f for f in (best, pending) if not f.empty]
    manifest = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=list(MANIFEST_COLUMNS))
    )
    manifest = manifest.sort_values("row", kind="stable")[list(MANIFEST_COLUMNS)]
    manifest = manifest.astype(_DTYPES).reset_index(drop=True)
    store.write_parquet(layout.download_manifest, manifest)
    statuses = {k: int(v) for k, v in manifest["status"].value_counts().items()}
    ok = manifest["status"] == "ok"
    summary: dict[str, Any] = {
        "manifest": str(layout.download_manifest),
        "statuses": statuses,
        "images": int(manifest.loc[ok, "sha256"].nunique()),
        "urls": len(manifest),
    }
    if found.unreadable:
        summary["unreadable_parts"] = found.unreadable
    return summary


def download(
    dataset: str,
    config: DownloadConfig | None = None,
    *,
    store: ObjectStore | None = None,
    resolver: Resolver | None = None,
    on_result: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Download every image of ``dataset`` in this process; the CLI's ``download`` stage."""
    config = config or DownloadConfig()
    layout = DatasetLayout.parse(dataset)
    store = store or ObjectStore(max_pool_connections=config.download_concurrency + 4)
    store.check_bucket(layout.store)
    total = len(read_records(layout, store))
    spec = BatchSpec(dataset, 0, 0, total, total)
    result = download_batch(spec, config, store=store, resolver=resolver, on_result=on_result)
    summary = collect_manifest(dataset, store=store)
    log.info("download: %s", summary["statuses"])
    return {
        **result.to_json(),
        "statuses": summary["statuses"],
        "manifest": summary["manifest"],
        "images": summary["images"],
    }
