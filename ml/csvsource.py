"""Read a user-supplied CSV safely: from a local path, an s3:// URI or an http(s) URL.

The CSV is untrusted input, and so is wherever its address points:

- http(s) goes through the download stage's :class:`~ml.fetch.Fetcher`: the address policy on
  every hop (redirects into internal addresses are refused), one deadline, a byte cap;
- every source is capped at ``max_bytes`` (``ML_CSV_MAX_BYTES``, default 512 MiB) before it is
  read whole;
- the text encoding is decided from the bytes: a BOM picks UTF-8, UTF-16 or UTF-32; without one
  the file must be valid UTF-8 (or the ``encoding`` given), and a byte that is not valid names
  the record it sits in. Nothing is silently replaced;
- no message ever quotes what was fetched (a URL or object can point at anything).

Usage: ``text = read_csv_bytes("https://host/images.csv", SourceLimits())`` returns UTF-8 bytes.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ml.errors import PipelineError
from ml.fetch import FetchConfig, Fetcher, FetchError, MiB
from ml.netpolicy import AddressPolicy, Resolver
from ml.redact import redact_url
from ml.statuses import Status
from ml.storage import ObjectStore, S3Uri

if TYPE_CHECKING:  # pandas loads when a CSV is parsed, not when the CLI builds its options
    import pandas as pd

DEFAULT_MAX_BYTES = 512 * MiB
_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_CHECK_BLOCK = 1 << 20


def default_max_bytes() -> int:
    """``ML_CSV_MAX_BYTES`` from the environment, else 512 MiB."""
    value = os.environ.get("ML_CSV_MAX_BYTES", "").strip()
    if not value:
        return DEFAULT_MAX_BYTES
    if not value.isdigit() or int(value) < 1:
        raise PipelineError(f"ML_CSV_MAX_BYTES must be a positive number of bytes, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SourceLimits:
    """How a CSV may be fetched: size, time, and which networks (deployment settings)."""

    max_bytes: int = field(default_factory=default_max_bytes)
    #: Total seconds for an http(s) CSV: connecting, every redirect, every byte.
    csv_deadline: float = 300.0
    allow_networks: tuple[str, ...] = ()
    resolver: Resolver | None = field(default=None, compare=False)


def describe(source: str) -> str:
    """How to name ``source`` in messages and summaries (credentials redacted)."""
    return redact_url(source)


def check_available(source: str) -> None:
    """Fail early for a local CSV that is not there (before any store or network work)."""
    if "://" not in source and not Path(source).is_file():
        raise PipelineError(
            f"CSV not found: {describe(source)} (give a local path, an http(s) URL or an s3:// URI)"
        )


def read_bytes(
    source: str, limits: SourceLimits | None = None, store: ObjectStore | None = None
) -> bytes:
    """The raw bytes of a CSV given as a local path, an http(s) URL or an s3:// URI."""
    limits = limits or SourceLimits()
    name = describe(source)
    if source.startswith("s3://"):
        return (store or ObjectStore()).get_bytes(S3Uri.parse(source), max_bytes=limits.max_bytes)
    if source.lower().startswith(("http://", "https://")):
        return _fetch(source, limits)
    if "://" in source:
        raise PipelineError(
            f"unsupported CSV address {name}: give a local path, an http(s) URL or an s3:// URI"
        )
    path = Path(source)
    if not path.is_file():
        raise PipelineError(
            f"CSV not found: {name} (give a local path, an http(s) URL or an s3:// URI)"
        )
    if path.stat().st_size > limits.max_bytes:
        raise PipelineError(too_large(name, limits.max_bytes))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"cannot read the CSV {name}: {exc.strerror}") from None


def too_large(name: str, limit: int) -> str:
    """The message for a CSV over the byte cap."""
    return (
        f"the CSV {name} is larger than the {limit} bytes allowed; raise ML_CSV_MAX_BYTES "
        "(or --max-csv-bytes) if that is intended"
    )


def _fetch(url: str, limits: SourceLimits) -> bytes:
    config = FetchConfig(
        connect_timeout=10.0,
        read_timeout=30.0,
        deadline=limits.csv_deadline,
        retries=2,
        max_bytes=limits.max_bytes,
        per_host=2,
        accept="text/csv, text/plain;q=0.9, */*;q=0.5",
    )
    try:
        policy = AddressPolicy.from_cidrs(limits.allow_networks, limits.resolver)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    fetcher = Fetcher(config, policy, num_pools=2)
    try:
        return fetcher.fetch(url).body
    except FetchError as exc:
        if exc.status == Status.TOO_LARGE:
            raise PipelineError(too_large(describe(url), limits.max_bytes)) from None
        raise PipelineError(
            f"could not download the CSV {describe(url)}: {exc.status}: {exc}"
        ) from None
    finally:
        fetcher.close()


def to_utf8(data: bytes, name: str = "the CSV", encoding: str | None = None) -> bytes:
    """``data`` as UTF-8 without a BOM; a clear error for bytes the encoding cannot read."""
    if encoding:
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise PipelineError(f"unknown --encoding {encoding!r}") from None
        return _transcode(data, codec, name)
    for bom, codec in _BOMS:
        if data.startswith(bom):
            body = data[len(bom) :]
            return _check_utf8(body, name) if codec == "utf-8" else _transcode(body, codec, name)
    if b"\x00" in data[:4096]:
        raise PipelineError(
            f"{name} has NUL bytes and no byte-order mark: it looks like UTF-16 or UTF-32 "
            "without a BOM; save it as UTF-8 or name its encoding (--encoding utf-16-le)"
        )
    return _check_utf8(data, name)


def _check_utf8(data: bytes, name: str) -> bytes:
    """``data`` itself when it is valid UTF-8 (checked block by block, no copy)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    for start in range(0, len(data), _CHECK_BLOCK):
        block = view[start : start + _CHECK_BLOCK]
        pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
        try:
            decoder.decode(block, final=start + _CHECK_BLOCK >= len(data))
        except UnicodeDecodeError as exc:
            offset = start - pending + exc.start
            raise PipelineError(_bad_bytes(data, max(0, offset), "utf-8", name)) from None
    return data


def _transcode(data: bytes, codec: str, name: str) -> bytes:
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        raise PipelineError(_bad_bytes(data, exc.start, codec, name)) from None
    return text.lstrip("\ufeff").encode("utf-8")


def _bad_bytes(data: bytes, offset: int, codec: str, name: str) -> str:
    row = _record_at(data, offset)
    where = "in its header" if row == 0 else f"in data record {row}"
    return (
        f"{name} is not valid {codec}: byte {offset} ({where}) cannot be decoded; save the file "
        "as UTF-8, or name its encoding (--encoding, for example cp1252 or latin-1)"
    )


def _record_at(data: bytes, offset: int) -> int:
    """The number of CSV records before ``offset`` minus the header (0 means the header)."""
    prefix = data[:offset].decode("latin-1")
    records = sum(1 for _ in csv.reader(io.StringIO(prefix, newline="")))
    return max(0, records - 1)


def read_header(data: bytes, name: str = "the CSV") -> list[str]:
    """The column names of UTF-8 CSV bytes."""
    import pandas as pd

    try:
        frame = pd.read_csv(io.BytesIO(data), nrows=0, dtype=str, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{name} is empty: it has no header row") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise PipelineError(f"could not parse {name} as CSV: {_parser_problem(exc)}") from None
    return [str(c) for c in frame.columns]


def rows_with_extra_fields(data: bytes, width: int) -> list[int]:
    """The data rows (numbered from 1, blank lines skipped as the parser skips them) with more
    fields than the header's ``width``: the parser keeps the named columns and drops the rest
    silently, which usually means a quoting mistake."""
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="")
    rows: list[int] = []
    try:
        records = (fields for fields in csv.reader(text) if fields)
        rows.extend(n for n, fields in enumerate(records) if n and len(fields) > width)
    except csv.Error:  # a field beyond csv's size limit: the parser has the last word
        pass
    text.detach()
    return rows


def _parser_problem(exc: Exception) -> str:
    """pandas' parser message, which names lines and field counts but never cell contents."""
    import pandas as pd

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pd.errors.ParserError) and "Error tokenizing data" in text:
        return text
    return type(exc).__name__


def parse_all(data: bytes, name: str = "the CSV") -> pd.DataFrame:
    """Every field of UTF-8 CSV bytes as a string (for small inputs such as predict's list)."""
    import pandas as pd

    read_header(data, name)
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, ValueError) as exc:
        raise PipelineError(f"could not parse {name} as CSV: {_parser_problem(exc)}") from None
    if frame.empty:
        raise PipelineError(f"{name} has a header but no data rows")
    return frame
