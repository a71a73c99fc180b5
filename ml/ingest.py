"""Ingest: read a CSV of image URLs and labels, validate every row, write the canonical records.

Usage: ``ingest("data.csv", "s3://bucket/prefix")`` returns an :class:`IngestResult` whose
``dataset`` URI is what every later stage takes. Accepts the CrowdFlower export as it is
(bare-CR records, long column names) and plain files with ``url``/``label`` style columns.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import urllib3

from ml.errors import PipelineError
from ml.labels import LABEL_INDEX, LABELS, normalize_label
from ml.layout import DatasetLayout
from ml.progress import Progress
from ml.storage import ObjectStore, S3Uri

log = logging.getLogger(__name__)

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
)
FILTER_REASONS = ("below_min_confidence", "golden_excluded")

RECORD_COLUMNS = ("row", "id", "url", "label", "label_index", "confidence", "golden")
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _normalize_name(name: str) -> str:
    return _NAME_SEPARATORS.sub("_", str(name).strip().lower())


def find_columns(columns: list[str]) -> dict[str, str]:
    """Map each role (url, label, confidence, id, golden) to the CSV column that plays it."""
    by_norm = {_normalize_name(c): c for c in columns}
    found: dict[str, str] = {}
    for role, candidates in COLUMN_NAMES.items():
        for candidate in candidates:
            if candidate in by_norm:
                found[role] = by_norm[candidate]
                break
    for role in ("url", "label"):
        if role not in found:
            names = ", ".join(COLUMN_NAMES[role][:4])
            raise PipelineError(
                f"no {role} column found among {list(columns)[:12]}; "
                f"name the column one of: {names}"
            )
    return found


def read_source(source: str, store: ObjectStore | None = None) -> bytes:
    """The bytes of a CSV given as a local path, an http(s) URL or an s3:// URI."""
    if source.startswith("s3://"):
        return (store or ObjectStore()).get_bytes(S3Uri.parse(source))
    if source.startswith(("http://", "https://")):
        try:
            response = urllib3.request(
                "GET", source, timeout=urllib3.Timeout(connect=10, read=60), retries=3
            )
        except urllib3.exceptions.HTTPError as exc:
            raise PipelineError(f"could not download the CSV {source}: {exc}") from exc
        if response.status != 200:
            raise PipelineError(f"could not download the CSV {source}: HTTP {response.status}")
        return bytes(response.data)
    path = Path(source)
    if not path.is_file():
        raise PipelineError(
            f"CSV not found: {source} (give a local path, an http(s) URL or an s3:// URI)"
        )
    return path.read_bytes()


def parse_csv(data: bytes, source: str = "CSV") -> pd.DataFrame:
    """Every field as a string; bare-CR, LF and CRLF records alike; never raises a traceback."""
    try:
        frame = pd.read_csv(
            io.BytesIO(data),
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",
            encoding_errors="replace",
        )
    except pd.errors.EmptyDataError as exc:
        raise PipelineError(f"{source} is empty: it has no header row") from exc
    except (pd.errors.ParserError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"could not parse {source} as CSV: {message}") from exc
    if frame.empty:
        raise PipelineError(f"{source} has a header but no data rows")
    return frame


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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split raw rows into canonical records and rejected rows (row number, reason, detail);
    ``on_row`` hears "ok" or the rejection reason of each row (progress)."""
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    url_col, label_col = columns["url"], columns["label"]
    conf_col, id_col, golden_col = (columns.get(k) for k in ("confidence", "id", "golden"))
    for number, raw in enumerate(frame.to_dict("records"), start=1):
        url = str(raw[url_col]).strip()
        raw_label = str(raw[label_col])
        problem: tuple[str, str] | None = None
        label = normalize_label(raw_label)
        if not raw_label.strip():
            problem = ("missing_label", "the label is empty")
        elif label is None:
            problem = ("unknown_label", f"label {raw_label!r} is not one of {', '.join(LABELS)}")
        else:
            problem = _check_url(url)
        confidence = float("nan")
        if problem is None and conf_col and str(raw[conf_col]).strip():
            try:
                confidence = float(raw[conf_col])
            except ValueError:
                confidence = float("nan")
            if not 0.0 <= confidence <= 1.0:
                problem = ("invalid_confidence", f"confidence {raw[conf_col]!r} is not in [0, 1]")
        if problem is None and url in seen:
            problem = ("duplicate_url", f"same URL as row {seen[url]}")
        if on_row is not None:
            on_row(problem[0] if problem else "ok")
        if problem is not None:
            rejected.append(
                {
                    "row": number,
                    "reason": problem[0],
                    "detail": problem[1],
                    "url": url,
                    "label": raw_label,
                }
            )
            continue
        assert label is not None
        seen[url] = number
        records.append(
            {
                "row": number,
                "id": str(raw[id_col]).strip()
                if id_col and str(raw[id_col]).strip()
                else str(number),
                "url": url,
                "label": label,
                "label_index": LABEL_INDEX[label],
                "confidence": confidence,
                "golden": bool(golden_col) and str(raw[golden_col]).strip().lower() in _TRUE,
            }
        )
    good = pd.DataFrame.from_records(records, columns=list(RECORD_COLUMNS))
    bad = pd.DataFrame.from_records(rejected, columns=["row", "reason", "detail", "url", "label"])
    return good.astype(
        {"row": "int64", "label_index": "int64", "confidence": "float64", "golden": "bool"}
    ), bad


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


def dataset_id(records: pd.DataFrame) -> str:
    """A short id derived from the records' content: same rows, same id."""
    canonical = records[["id", "url", "label", "confidence", "golden"]].to_csv(index=False)
    return "ds-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def ingest(
    source: str,
    store_uri: str,
    *,
    min_confidence: float | None = None,
    sample: int | None = None,
    seed: int = 0,
    exclude_golden: bool = False,
    store: ObjectStore | None = None,
) -> IngestResult:
    """Validate the CSV at ``source`` and write its canonical records under ``store_uri``."""
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise PipelineError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
    if sample is not None and sample < 1:
        raise PipelineError(f"--sample must be a positive number of rows, got {sample}")
    root = S3Uri.parse(store_uri)
    store = store or ObjectStore()
    frame = parse_csv(read_source(source, store), source)
    store.check_bucket(root)
    columns = find_columns(list(frame.columns))
    log.info("reading %s: %d rows; columns %s", source, len(frame), columns)
    with Progress(len(frame), "ingest") as bar:
        records, rejected = validate_rows(frame, columns, bar.advance)
    for item in rejected.head(_SHOW_REJECTED).itertuples():
        log.warning("row %d rejected (%s): %s", item.row, item.reason, item.detail)
    if len(rejected) > _SHOW_REJECTED:
        log.warning("... and %d more rejected rows", len(rejected) - _SHOW_REJECTED)

    filtered: Counter[str] = Counter()
    if min_confidence is not None:
        keep = records["confidence"].isna() | (records["confidence"] >= min_confidence)
        filtered["below_min_confidence"] = int((~keep).sum())
        records = records[keep]
    if exclude_golden:
        filtered["golden_excluded"] = int(records["golden"].sum())
        records = records[~records["golden"]]
    if sample is not None:
        records = stratified_sample(records.reset_index(drop=True), sample, seed)
    records = records.reset_index(drop=True)
    if records.empty:
        raise PipelineError(
            f"no usable rows left in {source} ({len(rejected)} rejected, "
            f"{sum(filtered.values())} filtered out); see the reasons above"
        )

    layout = DatasetLayout(root, dataset_id(records))
    labels = {name: int((records["label"] == name).sum()) for name in LABELS}
    result = IngestResult(
        dataset=layout.uri,
        rows=len(records),
        labels=labels,
        rejected={k: int(v) for k, v in rejected["reason"].value_counts().items()},
        filtered={k: v for k, v in filtered.items() if v},
        source=source,
        columns=columns,
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
            },
        },
    )
    log.info("ingested %d rows into %s (%d rejected)", len(records), layout.uri, len(rejected))
    return result
