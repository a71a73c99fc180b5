"""Parquet tables written by pyarrow alone (ml.tables), and the manifest's fold over them."""

from __future__ import annotations

import io
import random
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ml.download import MANIFEST, MANIFEST_COLUMNS, _fold
from ml.statuses import Status

ROWS: list[dict[str, Any]] = [
    {
        "url": "http://h/a.jpg",
        "status": "ok",
        "http_status": 200,
        "bytes": 10,
        "sha256": "aa",
        "width": 3,
        "height": 4,
        "phash": "0f",
        "object_key": "k",
        "attempts": 1,
        "elapsed_s": 0.25,
        "error": "",
        "id": "7",
        "label": "Positive",
        "row": 2,
        "fetched_at": "2026-12-07T10:00:00+00:00",
    },
    {  # a failure: no size, hash or key, and no agreement (the parts never hold it)
        "url": "http://h/b.jpg",
        "status": "http_error",
        "http_status": 404,
        "bytes": 0,
        "attempts": 2,
        "elapsed_s": 0.5,
        "error": "HTTP 404",
        "id": "8",
        "label": "Negative",
        "row": 3,
        "fetched_at": "2026-12-07T10:00:01+00:00",
    },
]


def _parquet(write: Any) -> pd.DataFrame:
    buf = io.BytesIO()
    write(buf)
    return pd.read_parquet(io.BytesIO(buf.getvalue()))


def test_pandas_reads_a_pyarrow_table_as_the_frame_it_would_have_written() -> None:
    dtypes = {name: MANIFEST.dtypes[name] for name in MANIFEST_COLUMNS if name in MANIFEST.dtypes}
    numeric = {k: v for k, v in dtypes.items() if v != "str"}
    by_pandas = pd.DataFrame.from_records(ROWS, columns=list(MANIFEST_COLUMNS)).astype(numeric)
    ours = _parquet(lambda buf: pq.write_table(MANIFEST.table(ROWS), buf))
    theirs = _parquet(lambda buf: by_pandas.to_parquet(buf, index=False))
    pd.testing.assert_frame_equal(ours, theirs)
    assert str(ours["width"].dtype) == "Int64"  # without the metadata it would be float64
    assert ours["width"].isna().tolist() == [False, True]


def test_conform_fills_missing_columns_and_refuses_a_foreign_type() -> None:
    old = pa.table({"url": ["u"], "status": ["ok"], "row": [1], "fetched_at": ["t"]})
    conformed = MANIFEST.conform(old)
    assert conformed is not None and conformed.schema == MANIFEST.schema
    assert conformed.column("phash").to_pylist() == [None]
    assert MANIFEST.conform(old.set_column(2, "row", pa.array(["first"]))) is None
    assert MANIFEST.conform(old.append_column("extra", pa.array([1]))) == conformed


def test_a_part_pandas_wrote_before_the_phash_column_is_read_as_a_manifest_part() -> None:
    from ml.tables import read

    old_columns = [c for c in MANIFEST_COLUMNS if c != "phash"]
    failures = [{k: v for k, v in ROWS[1].items() if k in old_columns}]  # sha256 etc. all None
    frame = pd.DataFrame.from_records(failures, columns=old_columns)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    raw = read(buf.getvalue())
    # pandas typed the column of Nones by its values (float64 NaN here), not as text
    assert not pa.types.is_large_string(raw.schema.field("sha256").type)
    part = MANIFEST.conform(raw)
    assert part is not None and part.schema == MANIFEST.schema
    assert part.to_pylist()[0] | {"phash": None} == part.to_pylist()[0]
    assert part.column("row").to_pylist() == [3] and part.column("sha256").null_count == 1


def _expected(records: list[int], parts: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The fold by hand: per record, ok beats any other status, then the latest fetched_at
    (none is oldest), then the row written first."""
    best: dict[int, dict[str, Any]] = {}
    for part in parts:
        if part["row"] not in records:
            continue
        key = (part["status"] == "ok", part["fetched_at"] is not None, part["fetched_at"] or "")
        held = best.get(part["row"])
        if held is None or key > (
            held["status"] == "ok",
            held["fetched_at"] is not None,
            held["fetched_at"] or "",
        ):
            best[part["row"]] = part
    return best


def test_the_fold_keeps_each_records_best_row_and_marks_the_rest_pending() -> None:
    rng = random.Random(7)
    records = list(range(0, 400, 2))  # odd rows in the parts belong to no record
    parts = [
        {
            "url": f"http://user:secret@h/{n}.jpg",
            "status": rng.choice(["ok", "timeout", "http_error"]),
            "bytes": n,
            "attempts": 1,
            "elapsed_s": 0.1,
            "error": "",
            "id": str(n),
            "label": "Neutral",
            "row": rng.randrange(0, 300),  # rows 300-398 have no part: pending
            "fetched_at": rng.choice([None, "2026-12-01", "2026-12-02", "2026-12-03"]),
        }
        for n in range(1500)
    ]
    table = pa.table(
        {
            "row": records,
            "id": [str(r) for r in records],
            "url": [f"http://h/{r}.jpg" for r in records],
            "label": ["Neutral"] * len(records),
            "confidence": [r / 1000 for r in records],
        }
    )
    folded = _fold(table, MANIFEST.table(parts)).to_pylist()
    expected = _expected(set(records), parts)
    assert [r["row"] for r in folded] == records
    for row in folded:
        want = expected.get(row["row"])
        if want is None:
            assert row["status"] == Status.PENDING and row["url"] == f"http://h/{row['row']}.jpg"
        else:
            assert (row["bytes"], row["status"]) == (want["bytes"], want["status"])
            assert row["url"] == f"http://***@h/{want['bytes']}.jpg"  # redacted again
        assert row["agreement"] == row["row"] / 1000
    assert len(expected) < len(records)  # both kinds were met


def test_arrays_built_from_their_buffers_hold_the_values_and_nulls() -> None:
    from ml.tables import array, int64_array, int64_values

    cases = [
        (["a", None, "żółw 🐢", ""], pa.large_string()),
        ([1, None, -(2**62)], pa.int64()),
        ([0.5, None, 3], pa.float64()),
        ([True, None, False], pa.bool_()),
        ([], pa.int64()),
    ]
    for values, kind in cases:
        built = array(values, kind)
        built.validate(full=True)
        assert built.to_pylist() == values and built.type == kind
    lone = array(["a\ud800b"], pa.large_string())
    lone.validate(full=True)  # valid UTF-8: the surrogate became "?"
    assert lone.to_pylist() == ["a?b"]
    numbers = int64_values(pa.chunked_array([array([5, 6], pa.int64()), array([7], pa.int64())]))
    assert numbers.tolist() == [5, 6, 7]
    assert int64_values(array([1, 2, 3], pa.int64()).slice(1)).tolist() == [2, 3]
    assert int64_array(numbers).to_pylist() == [5, 6, 7]
