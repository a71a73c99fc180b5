"""Download: fetch every image of a dataset into the store, safely, in parallel, incrementally.

Work is split into batches (:func:`plan_batches`, at most 1024, so Airflow can map them);
:func:`download_batch` runs one batch on a bounded thread pool and appends manifest *parts*
as it goes; :func:`collect_manifest` folds all parts into one row per URL. :func:`download`
does all three in one process (the CLI). A rerun, or a rerun after a kill, fetches only URLs
without an ``ok`` row, and images are content-addressed with conditional writes, so an object
is never written twice.

Each URL's outcome is a :class:`~ml.statuses.Status` in the manifest's ``status`` column (the
one vocabulary, with the meaning of each value in ``ml.statuses.DESCRIPTIONS``); every per-URL
failure is a :class:`~ml.statuses.Rejected` turned into a row, never an exception that stops
the batch.
"""

from __future__ import annotations

import math
import queue
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ml import download_state
from ml.errors import PipelineError
from ml.fencing import StaleAttemptError
from ml.fetch import FetchConfig, Fetcher
from ml.forget import Forgotten
from ml.imaging import ImageConfig, normalize_image
from ml.layout import DatasetLayout, part_range
from ml.netpolicy import AddressPolicy, Resolver
from ml.params import DOWNLOAD, PARAMETERS, check_all
from ml.redact import get_logger, named_line, redact_url
from ml.statuses import Rejected, Status
from ml.storage import ObjectStore, S3Uri
from ml.tables import Columns, int64_array, int64_values, strings

if TYPE_CHECKING:
    import pandas as pd

log = get_logger(__name__)

STATUSES = tuple(Status)
#: One row per URL (the manifest, and each part a batch appends), with its pandas dtypes.
MANIFEST = Columns(
    {
        "url": "str",
        "status": "str",
        "http_status": "Int64",
        "bytes": "int64",
        "sha256": "str",
        "width": "Int64",
        "height": "Int64",
        "phash": "str",
        "object_key": "str",
        "attempts": "int64",
        "elapsed_s": "float64",
        "error": "str",
        "id": "str",
        "label": "str",
        "agreement": "float64",
        "row": "int64",
        "fetched_at": "str",
    }
)
MANIFEST_COLUMNS = MANIFEST.names
#: The records' columns a download reads.
_RECORDS = Columns(
    {"row": "int64", "id": "str", "url": "str", "label": "str", "confidence": "float64"}
)
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

    def add(self, row: dict[str, Any], stored_new: bool) -> None:
        self.statuses[row["status"]] += 1
        if row["status"] == Status.OK:
            self.downloaded += 1
            self.bytes += int(row["bytes"])
            self.stored_new += stored_new

    def to_json(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "downloaded": self.downloaded,
            "skipped_existing": self.skipped_existing,
            "bytes": self.bytes,
            "stored_new": self.stored_new,
        }


@dataclass
class Parts:
    """Manifest rows read from the parts, and the objects among them that could not be used."""

    table: pa.Table
    unreadable: list[str] = field(default_factory=list)

    @property
    def rows(self) -> pd.DataFrame:
        """The rows as a pandas frame."""
        return self.table.to_pandas()


def read_parts(
    layout: DatasetLayout,
    store: ObjectStore,
    window: tuple[int, int] | None = None,
    listing: list[tuple[str, int]] | None = None,
) -> Parts:
    """Every manifest row written so far (all attempts), optionally only parts overlapping
    the record window ``[start, stop)``; ``listing`` is the parts' listing when the caller has
    just taken it (it is taken here otherwise).

    Objects this project did not write (folder markers that S3 consoles create, empty files,
    junk or truncated Parquet, a part with other columns or types) are skipped and named in a
    warning; the rows they would have held are simply fetched again. A part written before a
    column existed (``phash``) has it empty.
    """
    tables = []
    unreadable: list[str] = []
    if listing is None:
        listing = store.list_objects(layout.download_parts)
    for key, size in listing:
        if key.endswith("/") and size == 0:
            continue  # a folder marker
        span = part_range(key)
        if window and span and (span[1] <= window[0] or span[0] >= window[1]):
            continue
        table = _read_part(store, S3Uri(layout.store.bucket, key), size)
        if table is None:
            unreadable.append(key)
        else:
            tables.append(table)
    if unreadable:
        log.warning(
            "skipped %d manifest part(s) that are not readable manifest Parquet (their URLs are "
            "fetched again): %s%s",
            len(unreadable),
            ", ".join(unreadable[:5]),
            " ..." if len(unreadable) > 5 else "",
        )
    return Parts(pa.concat_tables(tables) if tables else MANIFEST.empty(), unreadable)


def _read_part(store: ObjectStore, uri: S3Uri, size: int) -> pa.Table | None:
    if size == 0 or not uri.key.endswith(".parquet"):
        return None
    try:
        table = store.read_table(uri)
    except PipelineError:
        return None
    if not {"status", "row", "url", "fetched_at"} <= set(table.column_names):
        return None
    return MANIFEST.conform(table)


def _ok_rows(parts: pa.Table) -> set[int]:
    """Rows that are done: stored ok, or forgotten (never fetched again)."""
    done = pc.is_in(parts.column("status"), strings([Status.OK.value, Status.FORGOTTEN.value]))
    return set(parts.column("row").filter(done).to_pylist())


def read_records(layout: DatasetLayout, store: ObjectStore) -> pa.Table:
    """The dataset's records (the columns a download reads); one clear error when they are
    missing or unreadable."""
    hint = "run ingest again to rewrite it (the dataset id stays the same)"
    records = _RECORDS.conform(store.read_table(layout.records, hint=hint))
    if records is None or records.column("row").null_count:
        raise PipelineError(f"{layout.records} does not hold this pipeline's records; {hint}")
    return records


def plan_batches(
    dataset: str,
    *,
    batch_size: int = PARAMETERS["download_batch_size"].default,
    max_batches: int = MAX_BATCHES,
    store: ObjectStore | None = None,
) -> list[BatchSpec]:
    """The batches that still have URLs without an ok row (at most ``max_batches``)."""
    layout = DatasetLayout.parse(dataset)
    store = store or ObjectStore()
    records = read_records(layout, store)
    done = _ok_rows(read_parts(layout, store).table)
    size = max(1, batch_size, math.ceil(len(records) / max_batches))
    rows = records.column("row").to_pylist()
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
        name = f"{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        uri = self._layout.download_part(self._spec.start, self._spec.stop, name)
        self._store.write_parquet(uri, MANIFEST.table(self._rows))
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
        self,
        fetcher: Fetcher,
        store: ObjectStore,
        layout: DatasetLayout,
        image: ImageConfig,
        forgotten: Forgotten,
    ) -> None:
        self.fetcher, self.store, self.layout, self.image = fetcher, store, layout, image
        self.forgotten = forgotten

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            return self._run(record, started)
        except StaleAttemptError:  # a newer try owns this batch: stop, write nothing
            raise
        except Exception as exc:  # one bad URL must never stop the others
            log.exception("unexpected error on row %s", record["row"])
            return _row(record, Status.INTERNAL_ERROR, started, error=named_line(exc, 500))

    def _run(self, record: dict[str, Any], started: float) -> dict[str, Any]:
        url = record["url"]
        facts: dict[str, Any] = {}
        try:
            if not _fetchable(url):
                raise Rejected(Status.INVALID_URL, "not an http(s) URL with a host")
            if (seq := self.forgotten.url(url)) is not None:
                raise Rejected(Status.FORGOTTEN, Forgotten.message(seq))
            response = self.fetcher.fetch(url)
            facts = {
                "http_status": response.http_status,
                "bytes": len(response.body),
                "attempts": response.attempts,
            }
            image = normalize_image(response.body, self.image)
            if (seq := self.forgotten.image(image.sha256, image.phash)) is not None:
                raise Rejected(Status.FORGOTTEN, Forgotten.message(seq))
        except Rejected as exc:
            return _row(record, exc.status, started, error=str(exc), **{**facts, **exc.details})
        key = self.layout.image(image.sha256)
        try:
            written = self.store.put_bytes(
                key, image.data, content_type="image/jpeg", if_absent=True
            )
        except StaleAttemptError:
            raise
        except PipelineError as exc:
            return _row(record, Status.STORE_ERROR, started, error=str(exc), **facts)
        return _row(
            record,
            Status.OK,
            started,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
            phash=image.phash,
            object_key=key.key,
            stored_new=written,
            **facts,
        )


def _fetchable(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def download_batch(
    spec: BatchSpec,
    config: DownloadConfig | None = None,
    *,
    store: ObjectStore | None = None,
    resolver: Resolver | None = None,
    on_result: Callable[[str], None] | None = None,
    known: tuple[pa.Table, Parts] | None = None,
) -> BatchResult:
    """Download the URLs of one batch that have no ok row yet; append manifest parts.
    ``known``: the dataset's records and manifest parts, when the caller has just read them."""
    config = config or DownloadConfig()
    layout = DatasetLayout.parse(spec.dataset)
    store = store or ObjectStore(max_pool_connections=config.download_concurrency + 4)
    try:
        policy = AddressPolicy.from_cidrs(config.allow_networks, resolver)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    if known is None:
        records = read_records(layout, store).slice(spec.start, spec.stop - spec.start)
        done = _ok_rows(read_parts(layout, store, (spec.start, spec.stop)).table)
    else:
        records = known[0].slice(spec.start, spec.stop - spec.start)
        done = _ok_rows(known[1].table)
    todo = [r for r in records.to_pylist() if r["row"] not in done]
    result = BatchResult(skipped_existing=len(records) - len(todo))
    if not todo:
        return result

    def on_row(row: dict[str, Any]) -> None:
        stored_new = bool(row.pop("stored_new", False))
        result.add(row, stored_new)
        writer.add(row)
        if on_result:
            on_result(row["status"])

    fetcher = Fetcher(config.fetch, policy)
    writer = _PartWriter(store, layout, spec, config)
    try:
        forgotten = Forgotten.load(store, layout.store)
        worker = _Worker(fetcher, store, layout, config.image, forgotten)
        _run_pool(worker, todo, config, on_row)
    finally:
        writer.flush()
        fetcher.close()
    if result.statuses[Status.STORE_ERROR]:
        raise PipelineError(
            f"{result.statuses[Status.STORE_ERROR]} images could not be written to the store "
            f"(manifest rows kept); check the store and rerun: only missing images are fetched"
        )
    return result


def _run_pool(
    worker: _Worker,
    todo: list[dict[str, Any]],
    config: DownloadConfig,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    """Every record through ``worker`` on a bounded pool; results in completion order. Each
    future puts itself on a queue when it finishes, so taking the next result costs the same
    however many are in flight (``wait(FIRST_COMPLETED)`` visits every one of them)."""
    pool = ThreadPoolExecutor(
        max_workers=config.download_concurrency, thread_name_prefix="download"
    )
    finished: queue.SimpleQueue[Future[dict[str, Any]]] = queue.SimpleQueue()
    inflight = 0
    try:
        for record in todo:
            if inflight >= 2 * config.download_concurrency:  # bounded queue: flat memory
                on_row(finished.get().result())
                inflight -= 1
            pool.submit(worker, record).add_done_callback(finished.put)
            inflight += 1
        while inflight:
            on_row(finished.get().result())
            inflight -= 1
    finally:
        pool.shutdown(wait=not inflight, cancel_futures=True)


def collect_manifest(
    dataset: str,
    *,
    store: ObjectStore | None = None,
    known: tuple[pa.Table, Parts] | None = None,
) -> dict[str, Any]:
    """Fold every manifest part into one row per record (an ok row wins, else the latest).
    ``known``: the records and every part, when the caller has just read them."""
    layout = DatasetLayout.parse(dataset)
    store = store or ObjectStore()
    records, found = known or (read_records(layout, store), read_parts(layout, store))
    manifest = _fold(records, found.table)
    manifest = _mark_forgotten(manifest, store, layout)
    store.write_parquet(layout.download_manifest, manifest)
    statuses = Counter(manifest.column("status").to_pylist())
    ok = pc.is_in(manifest.column("status"), strings([Status.OK.value]))
    summary: dict[str, Any] = {
        "manifest": str(layout.download_manifest),
        "statuses": dict(statuses.most_common()),
        "images": pc.count_distinct(manifest.column("sha256").filter(ok)).as_py(),
        "urls": len(manifest),
    }
    if found.unreadable:
        summary["unreadable_parts"] = found.unreadable
    return summary


def _fold(records: pa.Table, parts: pa.Table) -> pa.Table:
    """One row per record, in row order: its best part row (ok first, then the latest
    ``fetched_at``; the first written among equals), or a ``pending`` row when it has none.
    Columnar, so a few million rows fold in seconds."""
    parts = parts.filter(pc.is_in(parts.column("row"), records.column("row")))
    order = pc.sort_indices(  # stable: among equals, the part and the row written first
        parts.append_column("ok", pc.is_in(parts.column("status"), strings([Status.OK.value]))),
        sort_keys=[("ok", "descending", "at_end"), ("fetched_at", "descending", "at_end")],
    )
    ranked = parts.take(order)
    _, first = np.unique(int64_values(ranked.column("row")), return_index=True)
    best = ranked.take(int64_array(first))  # the first of each row, in row order
    missing = records.filter(pc.invert(pc.is_in(records.column("row"), best.column("row"))))
    pending = MANIFEST.from_columns(
        {
            "url": missing.column("url"),
            "status": [Status.PENDING.value] * len(missing),
            "bytes": [0] * len(missing),
            "attempts": [0] * len(missing),
            "elapsed_s": [0.0] * len(missing),
            "error": [""] * len(missing),
            "id": missing.column("id"),
            "label": missing.column("label"),
            "row": missing.column("row"),
        }
    )
    manifest = pa.concat_tables([best, pending])
    manifest = manifest.take(pc.sort_indices(manifest, sort_keys=[("row", "ascending")]))
    # redacted again: parts written before redaction; the annotators' agreement on each
    # label comes from the records (parts may predate the column)
    urls = _redacted(manifest.column("url"))
    at = pc.index_in(manifest.column("row"), records.column("row"))
    agreement = records.column("confidence").take(at)
    columns = {name: manifest.column(name) for name in MANIFEST.names}
    return MANIFEST.from_columns({**columns, "url": urls, "agreement": agreement})


def _redacted(urls: pa.ChunkedArray) -> pa.Array:
    """:func:`~ml.redact.redact_url` of each URL. It returns a URL without user info, query or
    fragment unchanged, so only those holding an "@", "?" or "#" go through Python."""
    urls = urls.combine_chunks()
    risky = pc.coalesce(pc.match_substring_regex(urls, "[@?#]"), pc.is_valid(urls))
    if not pc.any(risky).as_py():
        return urls
    changed = strings([redact_url(u) for u in urls.filter(risky).to_pylist()])
    return pc.replace_with_mask(urls, risky, changed)


def _mark_forgotten(manifest: pa.Table, store: ObjectStore, layout: DatasetLayout) -> pa.Table:
    """Rows stored before their image was forgotten become ``forgotten`` (object gone)."""
    forgotten = Forgotten.load(store, layout.store)
    if not forgotten:
        return manifest
    columns = {name: manifest.column(name) for name in MANIFEST.names}  # passed on as Arrow
    status, error, key = (columns[name].to_pylist() for name in ("status", "error", "object_key"))
    urls, shas = (columns[name].to_pylist() for name in ("url", "sha256"))
    for i, (url, sha) in enumerate(zip(urls, shas, strict=True)):
        seq = forgotten.url(url)
        if seq is None and sha:
            seq = forgotten.image(sha)
        if seq is not None:
            status[i], error[i], key[i] = Status.FORGOTTEN.value, Forgotten.message(seq), None
    return MANIFEST.from_columns(columns | {"status": status, "error": error, "object_key": key})


def download(
    dataset: str,
    config: DownloadConfig | None = None,
    *,
    store: ObjectStore | None = None,
    resolver: Resolver | None = None,
    on_total: Callable[[int], None] | None = None,
    on_result: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Download every image of ``dataset`` in this process; the CLI's ``download`` stage.
    ``on_total`` hears the number of records once they are read; ``on_result`` each URL's
    status."""
    config = config or DownloadConfig()
    layout = DatasetLayout.parse(dataset)
    store = store or ObjectStore(max_pool_connections=config.download_concurrency + 4)
    store.check_bucket(layout.store)
    seen = download_state.observe(store, layout)  # before the reads it fingerprints
    known = (read_records(layout, store), read_parts(layout, store))
    total = len(known[0])
    if on_total:
        on_total(total)
    spec = BatchSpec(dataset, 0, 0, total, total)
    result = download_batch(
        spec, config, store=store, resolver=resolver, on_result=on_result, known=known
    )
    if result.statuses:  # rows were written: fold the new parts in too
        listing = store.list_objects(layout.download_parts)
        seen = seen and seen.with_parts(store, layout, listing)
        known = (known[0], read_parts(layout, store, listing=listing))
    summary = collect_manifest(dataset, store=store, known=known)
    download_state.remember(store, layout, seen, summary)
    log.info("download: %s", summary["statuses"])
    return {
        **result.to_json(),
        "statuses": summary["statuses"],
        "manifest": summary["manifest"],
        "images": summary["images"],
    }
