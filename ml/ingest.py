"""Ingest: read a CSV of image URLs and labels, validate every row, write the canonical records.

Usage: ``ingest("data.csv", "s3://bucket/prefix")`` returns an :class:`IngestResult` whose
``dataset`` URI is what every later stage takes. Accepts the CrowdFlower export as it is
(bare-CR records, long column names) and plain files with ``url``/``label`` style columns.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from ml import csvsource
from ml.csvsource import SourceLimits
from ml.errors import PipelineError
from ml.labels import LABEL_INDEX, LABELS, normalize_label
from ml.layout import DatasetLayout
from ml.params import PARAMETERS
from ml.progress import Progress
from ml.redact import get_logger, redact_url
from ml.storage import ObjectStore, S3Uri

log = get_logger(__name__)

CROWDFLOWER_LABEL = "which_of_these_sentiment_scores_does_the_above_image_fit_into_best"

#: Accepted column names per role, most specific first (compared after normalization).
COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "url": (
        "imageurl",
        "image_url",
        "img_url",
        "url",
        "image_link",
        "photo_url",
        "picture_url",
        "image_uri",
        "uri",
        "image",
        "img",
        "link",
        "src",
    ),
    "label": (
        CROWDFLOWER_LABEL,
        "label",
        "sentiment",
        "sentiment_label",
        "class",
        "class_name",
        "category",
        "target",
        "labels",
        "y",
    ),
    "confidence": (
        f"{CROWDFLOWER_LABEL}:confidence",
        "confidence",
        "label_confidence",
        "sentiment_confidence",
        "label_score",
    ),
    "id": ("_unit_id", "id", "image_id", "img_id", "item_id", "unit_id", "uid"),
    "golden": ("_golden", "golden", "is_golden", "gold"),
}

#: Why a row was rejected (bad data) or filtered out (an option asked for it).
REJECT_REASONS = (
    "missing_label",
    "unknown_label",
    "empty_url",
    "invalid_url",
    "unsupported_scheme",
    "invalid_confidence",
    "duplicate_url",
    "conflicting_label",
)
FILTER_REASONS = ("below_min_confidence", "golden_excluded", "forgotten")

RECORD_COLUMNS = ("row", "id", "url", "label", "label_index", "confidence", "golden")
REJECTED_COLUMNS = ("row", "reason", "detail", "url", "label")
_RECORD_TYPES = {"row": "int64", "label_index": "int64", "confidence": "float64", "golden": "bool"}
#: Rows validated at a time: memory stays flat however long the CSV is.
CHUNK_ROWS = 100_000
_SHOW_REJECTED = 10
_TRUE = {"true", "1", "yes", "y", "t"}
_NAME_SEPARATORS = re.compile(r"[\s\-]+")


@dataclass(frozen=True)
class IngestResult:
    """What ingest wrote; ``to_json()`` is the CLI's summary line."""

    dataset: str
    rows: int
    labels: dict[str, int]
    rejected: dict[str, int]
    filtered: dict[str, int] = field(default_factory=dict)
    source: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    #: Rows with more fields than the header has columns (the extra fields are ignored).
    extra_fields: int = 0
    #: SHA-256 of the CSV's bytes as read (lineage: the exact file a model came from).
    source_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _normalize_name(name: str) -> str:
    return _NAME_SEPARATORS.sub("_", str(name).strip().lower())


def find_columns(columns: list[str], *, show: bool = True) -> dict[str, str]:
    """Map each role (url, label, confidence, id, golden) to the CSV column that plays it.

    ``show=False`` keeps the header's names out of the error (for fetched files, whose content
    must never be echoed).
    """
    by_norm = {_normalize_name(c): c for c in columns}
    found: dict[str, str] = {}
    for role, candidates in COLUMN_NAMES.items():
        for candidate in candidates:
            if candidate in by_norm:
                found[role] = by_norm[candidate]
                break
    for role in ("url", "label"):
        if role not in found:
            names = ", ".join(COLUMN_NAMES[role])
            among = f"among {list(columns)[:12]}" if show else f"among its {len(columns)} columns"
            raise PipelineError(
                f"no {role} column found {among}; name the column one of: {names} (case, "
                "spaces and hyphens do not matter)"
            )
    return found


def read_source(
    source: str, store: ObjectStore | None = None, limits: SourceLimits | None = None
) -> bytes:
    """The bytes of a CSV given as a local path, an http(s) URL or an s3:// URI (see
    :mod:`ml.csvsource` for the limits that apply)."""
    return csvsource.read_bytes(source, limits, store)


def parse_csv(data: bytes, source: str = "CSV", encoding: str | None = None) -> pd.DataFrame:
    """Every field as a string; bare-CR, LF and CRLF records alike; never raises a traceback."""
    name = csvsource.describe(source)
    return csvsource.parse_all(csvsource.to_utf8(data, name, encoding), name)


def _read_chunks(
    data: bytes, name: str, usecols: list[str], chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """UTF-8 CSV bytes as frames of ``chunk_rows`` rows, only ``usecols``, every field a string."""
    try:
        reader = pd.read_csv(
            io.BytesIO(data),
            dtype=str,
            keep_default_na=False,
            encoding="utf-8",
            usecols=usecols,
            chunksize=chunk_rows,
        )
        with reader:
            yield from reader
    except (pd.errors.ParserError, ValueError) as exc:
        raise PipelineError(
            f"could not parse {name} as CSV: {csvsource._parser_problem(exc)}"
        ) from None


def _check_url(url: str) -> tuple[str, str] | None:
    """The (reason, detail) that makes ``url`` unusable, or None."""
    if not url:
        return "empty_url", "the URL is empty"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        return "invalid_url", f"cannot parse URL: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return "unsupported_scheme", f"scheme {parts.scheme or '(none)'!r} is not http or https"
    if not parts.hostname or any(ch.isspace() for ch in url):
        return "invalid_url", "the URL has no host or contains whitespace"
    return None


def validate_rows(
    frame: pd.DataFrame,
    columns: dict[str, str],
    on_row: Callable[[str], None] | None = None,
    *,
    first_row: int = 1,
    check_duplicates: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split raw rows into canonical records and rejected rows (row number, reason, detail).

    ``first_row`` numbers the frame's first row (chunks of a large file); ``on_row`` hears
    "ok" or the rejection reason of each row (progress). With ``check_duplicates`` a URL seen
    in an earlier row of the frame is rejected (:class:`SeenUrls` does it across chunks).
    """
    cells = _Cells(frame, columns)
    good: dict[str, list[Any]] = {name: [] for name in RECORD_COLUMNS}
    bad: dict[str, list[Any]] = {name: [] for name in REJECTED_COLUMNS}
    for i in range(len(frame)):
        number = first_row + i
        problem = cells.problem(i)
        if on_row is not None:
            on_row(problem[0] if problem else "ok")
        if problem is not None:
            values = (number, problem[0], problem[1], redact_url(cells.urls[i]), cells.raw[i])
            for key, item in zip(REJECTED_COLUMNS, values, strict=True):
                bad[key].append(item)
            continue
        for key, item in zip(RECORD_COLUMNS, cells.record(i, number), strict=True):
            good[key].append(item)
    records = pd.DataFrame(good, columns=list(RECORD_COLUMNS)).astype(_RECORD_TYPES)
    rejected = pd.DataFrame(bad, columns=list(REJECTED_COLUMNS)).astype({"row": "int64"})
    if check_duplicates:
        records, repeated = SeenUrls().split(records)
        rejected = _by_row([rejected, repeated])
    return records, rejected


class _Cells:
    """A frame's cells in the five roles, as plain lists (fast to walk row by row)."""

    def __init__(self, frame: pd.DataFrame, columns: dict[str, str]) -> None:
        def strings(role: str) -> list[str] | None:
            name = columns.get(role)
            return frame[name].astype(str).str.strip().tolist() if name else None

        self.urls = strings("url") or []
        self.raw = frame[columns["label"]].astype(str).tolist()
        self.labels = [normalize_label(raw) for raw in self.raw]
        self.ids = strings("id")
        golden = strings("golden")
        self.golden = [g.lower() in _TRUE for g in golden] if golden else None
        given = strings("confidence")
        self.confidence_given = [bool(c) for c in given] if given else [False] * len(frame)
        self.confidence = (
            pd.to_numeric(pd.Series(given), errors="coerce").to_numpy(dtype="float64")
            if given
            else np.full(len(frame), np.nan)
        )

    def problem(self, i: int) -> tuple[str, str] | None:
        """Why row ``i`` cannot be used: (reason, detail), or None."""
        raw = self.raw[i]
        if not raw.strip():
            return "missing_label", "the label is empty"
        if self.labels[i] is None:
            shown = raw if len(raw) <= 40 else raw[:37] + "..."
            return "unknown_label", f"label {shown!r} is not one of {', '.join(LABELS)}"
        problem = _check_url(self.urls[i])
        if problem is None and self.confidence_given[i]:
            value = float(self.confidence[i])
            if not 0.0 <= value <= 1.0:
                return "invalid_confidence", "the confidence is not a number in [0, 1]"
        return problem

    def record(self, i: int, number: int) -> tuple[Any, ...]:
        """Row ``i`` as a canonical record (in RECORD_COLUMNS order)."""
        label = str(self.labels[i])
        row_id = self.ids[i] if self.ids is not None and self.ids[i] else str(number)
        golden = bool(self.golden[i]) if self.golden is not None else False
        return (
            number,
            row_id,
            self.urls[i],
            label,
            LABEL_INDEX[label],
            float(self.confidence[i]),
            golden,
        )


class SeenUrls:
    """The URLs of the valid rows so far, with the row and label of each one's first row. A
    later row with the same URL is rejected: ``duplicate_url`` when it gives the same label,
    ``conflicting_label`` when it gives another (the first row is kept either way)."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[int, str]] = {}

    def split(self, records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(the records whose URL is new, the rejected rows of the others)."""
        keep = np.ones(len(records), dtype=bool)
        bad: dict[str, list[Any]] = {name: [] for name in REJECTED_COLUMNS}
        rows, urls, labels = (records[c].tolist() for c in ("row", "url", "label"))
        for i, (row, url, label) in enumerate(zip(rows, urls, labels, strict=True)):
            seen = self.first.setdefault(url, (row, label))
            if seen[0] == row:
                continue
            keep[i] = False
            if seen[1] == label:
                reason, detail = "duplicate_url", f"same URL as row {seen[0]}"
            else:
                reason = "conflicting_label"
                detail = f"row {seen[0]} gives the same URL the label {seen[1]} (kept)"
            for key, item in zip(
                REJECTED_COLUMNS, (row, reason, detail, redact_url(url), label), strict=True
            ):
                bad[key].append(item)
        rejected = pd.DataFrame(bad, columns=list(REJECTED_COLUMNS)).astype({"row": "int64"})
        return records.loc[keep].reset_index(drop=True), rejected


def _by_row(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Rejected rows of several chunks, in row order."""
    bad = pd.concat(parts, ignore_index=True) if parts else _empty_rejected()
    return bad.sort_values("row", kind="stable").reset_index(drop=True).astype({"row": "int64"})


def _empty_records() -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in RECORD_COLUMNS}).astype(_RECORD_TYPES)


def _empty_rejected() -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in REJECTED_COLUMNS}).astype({"row": "int64"})


def stratified_sample(records: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows with label proportions kept (largest remainder; every label at least once)."""
    if n >= len(records):
        return records
    counts = records["label"].value_counts()
    exact = counts * n / len(records)
    quota = np.floor(exact).astype(int)
    for label in (exact - quota).sort_values(ascending=False, kind="stable").index:
        if quota.sum() >= n:
            break
        quota[label] += 1
    if n >= len(counts):
        for label in quota.index[quota == 0]:
            donor = quota.idxmax()
            quota[donor] -= 1
            quota[label] = 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in LABELS:
        if label in quota.index and quota[label] > 0:
            index = records.index[records["label"] == label].to_numpy()
            chosen.extend(rng.choice(index, size=int(quota[label]), replace=False).tolist())
    return records.loc[sorted(chosen)].reset_index(drop=True)


def dataset_id(records: pd.DataFrame, chunk_rows: int = 50_000) -> str:
    """A short id derived from the records' content: same rows, same id (hashed in chunks,
    so a large dataset never becomes one big string)."""
    digest = hashlib.sha256()
    columns = ["id", "url", "label", "confidence", "golden"]
    for start in range(0, max(1, len(records)), chunk_rows):
        part = records[columns].iloc[start : start + chunk_rows]
        digest.update(part.to_csv(index=False, header=start == 0).encode())
    return "ds-" + digest.hexdigest()[:16]


def read_records(
    data: bytes,
    name: str,
    *,
    show_columns: bool = True,
    chunk_rows: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str], int]:
    """Validate UTF-8 CSV bytes chunk by chunk (memory grows with the valid records only):
    (records, rejected, the columns found, the number of data rows)."""
    header = csvsource.read_header(data, name)
    columns = find_columns(header, show=show_columns)
    good: list[pd.DataFrame] = []
    bad: list[pd.DataFrame] = []
    seen = SeenUrls()
    total = 0
    with Progress(0, "ingest") as bar:  # counts as final as the summary's (before filters)
        usecols = sorted(set(columns.values()))
        for chunk in _read_chunks(data, name, usecols, chunk_rows or CHUNK_ROWS):
            records, rejected = validate_rows(
                chunk, columns, first_row=total + 1, check_duplicates=False
            )
            records, repeated = seen.split(records)
            total += len(chunk)
            bar.advance("valid", len(records))
            if len(rejected) + len(repeated):
                bar.advance("rejected", len(rejected) + len(repeated))
            good += [records]
            bad += [rejected, repeated]
    if total == 0:
        raise PipelineError(f"{name} has a header but no data rows")
    all_good = pd.concat(good, ignore_index=True) if good else _empty_records()
    return all_good, _by_row(bad), columns, total


def _log_rejected(rejected: pd.DataFrame) -> None:
    for item in rejected.head(_SHOW_REJECTED).itertuples():
        log.warning("row %d rejected (%s): %s", item.row, item.reason, item.detail)
    if len(rejected) > _SHOW_REJECTED:
        log.warning("... and %d more rejected rows", len(rejected) - _SHOW_REJECTED)


def _leave_out_forgotten(
    records: pd.DataFrame, store: ObjectStore, root: S3Uri
) -> tuple[pd.DataFrame, int]:
    """Rows whose URL was forgotten on request (``python -m ml forget``) are left out."""
    from ml.forget import Forgotten

    forgotten = Forgotten.load(store, root)
    if not forgotten or records.empty:
        return records, 0
    gone = records["url"].map(lambda url: forgotten.url(str(url)) is not None)
    if gone.any():
        log.info("%d rows name images forgotten on request: left out", int(gone.sum()))
    return records[~gone].reset_index(drop=True), int(gone.sum())


def _filter(
    records: pd.DataFrame, min_confidence: float | None, exclude_golden: bool
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows the options leave out (not bad data): low confidence, golden rows; with counts."""
    filtered: Counter[str] = Counter()
    if min_confidence is not None:
        keep = records["confidence"].isna() | (records["confidence"] >= min_confidence)
        filtered["below_min_confidence"] = int((~keep).sum())
        records = records[keep]
    if exclude_golden:
        filtered["golden_excluded"] = int(records["golden"].sum())
        records = records[~records["golden"]]
    return records.reset_index(drop=True), {k: v for k, v in filtered.items() if v}


def ingest(
    source: str,
    store_uri: str,
    *,
    min_confidence: float | None = None,
    sample: int | None = None,
    seed: int = PARAMETERS["seed"].default,
    exclude_golden: bool = PARAMETERS["exclude_golden"].default,
    encoding: str | None = None,
    limits: SourceLimits | None = None,
    store: ObjectStore | None = None,
) -> IngestResult:
    """Validate the CSV at ``source`` and write its canonical records under ``store_uri``.

    ``limits`` bounds how the CSV is fetched (bytes, time, networks: see :mod:`ml.csvsource`).
    """
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise PipelineError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
    if sample is not None and sample < 1:
        raise PipelineError(f"--sample must be a positive number of rows, got {sample}")
    root = S3Uri.parse(store_uri)
    csvsource.check_available(source)
    store = store or ObjectStore()
    store.check_bucket(root)
    name = csvsource.describe(source)
    raw = read_source(source, store, limits)
    source_sha256 = hashlib.sha256(raw).hexdigest()
    data = csvsource.to_utf8(raw, name, encoding)
    del raw
    local = "://" not in source
    records, rejected, columns, total = read_records(data, name, show_columns=local)
    extra = csvsource.rows_with_extra_fields(data, len(csvsource.read_header(data, name)))
    del data
    log.info("read %s: %d rows; columns %s", name, total, columns)
    _warn_extra_fields(extra)
    _log_rejected(rejected)
    valid = len(records)
    records, filtered = _filter(records, min_confidence, exclude_golden)
    records, filtered["forgotten"] = _leave_out_forgotten(records, store, root)
    filtered = {k: v for k, v in filtered.items() if v}
    kept = len(records)
    if sample is not None:
        records = stratified_sample(records, sample, seed)
    records = records.reset_index(drop=True)
    if records.empty:
        raise PipelineError(
            f"no usable rows left in {name} ({len(rejected)} rejected, "
            f"{sum(filtered.values())} filtered out); see the reasons above"
        )

    layout = DatasetLayout(root, dataset_id(records))
    counts = records["label"].value_counts()
    result = IngestResult(
        dataset=layout.uri,
        rows=len(records),
        labels={label: int(counts.get(label, 0)) for label in LABELS},
        rejected={k: int(v) for k, v in rejected["reason"].value_counts().items()},
        filtered=filtered,
        source=name,
        columns=columns,
        extra_fields=len(extra),
        source_sha256=source_sha256,
    )
    store.write_parquet(layout.records, records)
    store.write_parquet(layout.rejected, rejected)
    store.write_json(
        layout.info,
        {
            **result.to_json(),
            "options": {
                "min_confidence": min_confidence,
                "sample": sample,
                "seed": seed,
                "exclude_golden": exclude_golden,
                "encoding": encoding,
            },
        },
    )
    left_out = [valid - kept, kept - len(records)]
    log.info(
        "ingested %d rows into %s: of %d rows, %d rejected, %d valid%s",
        len(records),
        layout.uri,
        total,
        len(rejected),
        valid,
        "".join(
            f", {n} {what}"
            for n, what in zip(left_out, ("filtered out", "left out by the sample"), strict=True)
            if n
        ),
    )
    return result


def _warn_extra_fields(rows: list[int]) -> None:
    if rows:
        shown = ", ".join(str(row) for row in rows[:10]) + (", ..." if len(rows) > 10 else "")
        log.warning(
            "%d rows have more fields than the header has columns (rows %s): their extra "
            "fields were ignored; check the file's quoting",
            len(rows),
            shown,
        )
