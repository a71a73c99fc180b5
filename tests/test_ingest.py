from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ml.csvsource import SourceLimits
from ml.errors import PipelineError
from ml.ingest import (
    dataset_id,
    find_columns,
    ingest,
    parse_csv,
    stratified_sample,
    validate_rows,
)
from ml.layout import DatasetLayout
from ml.storage import ObjectStore, S3Uri
from tests.helpers import plain_csv

# Counts from ../shared/data/ANALYSIS.md.
REAL_LABELS = {
    "Positive": 8551,
    "Neutral": 4227,
    "Negative": 2119,
    "Highly positive": 433,
    "Highly negative": 283,
}


def _validate(data: bytes) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = parse_csv(data)
    return validate_rows(frame, find_columns(list(frame.columns)))


def test_bare_cr_records_with_newlines_inside_quotes() -> None:
    data = (
        b"imageurl,label,note\r"
        b'http://a.example/1.jpg,Positive,"two\nlines"\r'
        b"http://a.example/2.jpg,Negative,plain"
    )
    records, rejected = _validate(data)
    assert records["url"].tolist() == ["http://a.example/1.jpg", "http://a.example/2.jpg"]
    assert rejected.empty


@pytest.mark.parametrize(
    ("header", "url_col", "label_col"),
    [
        (["url", "label"], "url", "label"),
        (["Image URL", "Sentiment"], "Image URL", "Sentiment"),
        (["image_url", "class", "confidence", "id"], "image_url", "class"),
        (["id", "link", "category"], "link", "category"),
    ],
)
def test_find_columns_accepts_common_names(header: list[str], url_col: str, label_col: str) -> None:
    found = find_columns(header)
    assert found["url"] == url_col and found["label"] == label_col


def test_missing_url_column_is_a_clear_error() -> None:
    """The message names every accepted URL column name, as the code and the README do."""
    from ml.ingest import COLUMN_NAMES
    from tests.conftest import REPO

    with pytest.raises(PipelineError, match="no url column found") as refused:
        find_columns(["picture", "label"])
    readme = " ".join((REPO / "README.md").read_text().split())
    for name in COLUMN_NAMES["url"] + COLUMN_NAMES["label"][1:]:
        assert f"`{name}`" in readme, name
    for name in COLUMN_NAMES["url"]:
        assert name in str(refused.value), name


@pytest.mark.integration
def test_the_counts_said_while_reading_are_the_counts_at_the_end(
    store_uri: str,
    store: ObjectStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The progress line's counts already hold the duplicates (a URL found again in a later
    chunk too); the final line says what the filter and the sample left out; a row with more
    fields than the header is counted and warned about, never silently cut."""
    import logging

    header = "url,label,confidence\r"
    lines = [f"http://a.example/{i}.jpg,Positive,0.9" for i in range(4)]
    lines += ["http://a.example/9.jpg,Negative,0.2"]  # filtered out by min_confidence
    lines += ["http://a.example/0.jpg,Negative,0.9"]  # conflicting label, in a later chunk
    lines += ["http://a.example/5.jpg,Neutral,0.9,stray field"]  # one field too many
    lines += ["http://a.example/1.jpg,Positive,0.9", "ftp://a.example/x.jpg,Neutral,0.9"]
    csv_path = tmp_path / "messy.csv"
    csv_path.write_bytes((header + "\r".join(lines) + "\r").encode())
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("ml.ingest.CHUNK_ROWS", 3)  # duplicates across chunks
    result = ingest(str(csv_path), store_uri, min_confidence=0.5, store=store)
    said = [r.getMessage() for r in caplog.records]
    progress = next(m for m in said if m.startswith("ingest: "))
    assert progress == "ingest: 9 done (valid 6, rejected 3)", said
    assert result.rows == 5 and result.extra_fields == 1
    assert result.rejected == {"conflicting_label": 1, "duplicate_url": 1, "unsupported_scheme": 1}
    final = next(m for m in said if m.startswith("ingested "))
    assert final.endswith("of 9 rows, 3 rejected, 6 valid, 1 filtered out"), final
    warned = next(m for m in said if "more fields than the header" in m)
    assert warned.startswith("1 rows have more fields") and "(rows 7)" in warned


def test_rejections_have_row_numbers_and_reasons() -> None:
    data = plain_csv(
        [
            ("http://a.example/1.jpg", "positive", "0.9"),
            ("http://a.example/2.jpg", "meh", "0.9"),
            ("", "Neutral", "0.9"),
            ("ftp://a.example/3.jpg", "Neutral", "0.9"),
            ("http://a.example/1.jpg", "Negative", "0.9"),
            ("http://a.example/4.jpg", "Negative", "1.7"),
            ("http://a.example/5.jpg", "", "0.5"),
            ("http:///nohost.jpg", "Negative", "0.5"),
            ("http://a.example/6.jpg", "HIGHLY_NEGATIVE", ""),
            ("http://a.example/6.jpg", "highly negative", "0.4"),
        ],
        header=("url", "label", "confidence"),
    )
    records, rejected = _validate(data)
    assert records["label"].tolist() == ["Positive", "Highly negative"]
    assert records["row"].tolist() == [1, 9]
    reasons = dict(zip(rejected["row"], rejected["reason"], strict=True))
    assert reasons == {
        2: "unknown_label",
        3: "empty_url",
        4: "unsupported_scheme",
        5: "conflicting_label",  # row 1's URL with another label: row 1 is kept, and it says so
        6: "invalid_confidence",
        7: "missing_label",
        8: "invalid_url",
        10: "duplicate_url",  # row 9's URL and label again
    }
    details = rejected.set_index("row")["detail"]
    assert details[5] == "row 1 gives the same URL the label Positive (kept)"
    assert details[10] == "same URL as row 9"


def test_stratified_sample_keeps_proportions_and_every_label() -> None:
    labels = (
        ["Positive"] * 550
        + ["Neutral"] * 270
        + ["Negative"] * 140
        + ["Highly positive"] * 25
        + ["Highly negative"] * 15
    )
    records = pd.DataFrame({"url": [f"u{i}" for i in range(1000)], "label": labels})
    sample = stratified_sample(records, 100, seed=1)
    counts = sample["label"].value_counts().to_dict()
    assert len(sample) == 100
    assert counts["Positive"] == 55 and counts["Neutral"] == 27
    assert counts["Highly negative"] >= 1 and counts["Highly positive"] >= 2
    assert sample.equals(stratified_sample(records, 100, seed=1))
    assert not sample.equals(stratified_sample(records, 100, seed=2))
    tiny = stratified_sample(records, 5, seed=0)
    assert sorted(tiny["label"].unique()) == sorted(set(labels))


def test_dataset_id_depends_only_on_content() -> None:
    a = pd.DataFrame(
        {"id": ["1"], "url": ["u"], "label": ["Neutral"], "confidence": [1.0], "golden": [False]}
    )
    assert dataset_id(a) == dataset_id(a.copy())
    assert dataset_id(a) != dataset_id(a.assign(label="Positive"))


@pytest.mark.integration
def test_real_csv_ingests_all_rows(real_csv: Path, store_uri: str, store: ObjectStore) -> None:
    result = ingest(str(real_csv), store_uri, store=store)
    assert result.rows == 15613
    assert result.labels == {k: REAL_LABELS[k] for k in result.labels}
    assert result.rejected == {}
    layout = DatasetLayout.parse(result.dataset)
    records = store.read_parquet(layout.records)
    assert len(records) == 15613 and records["url"].is_unique
    assert int(records["golden"].sum()) == 613
    assert records.loc[records["id"] == "694561523", "confidence"].item() == 1.0
    # Same content, same dataset id: a rerun overwrites the same keys.
    assert ingest(str(real_csv), store_uri, store=store).dataset == result.dataset


@pytest.mark.integration
def test_real_csv_options(real_csv: Path, store_uri: str, store: ObjectStore) -> None:
    result = ingest(
        str(real_csv),
        store_uri,
        store=store,
        exclude_golden=True,
        min_confidence=0.6,
        sample=500,
        seed=3,
    )
    # Expected counts read independently of our code, with the csv module (ANALYSIS.md: records
    # end with a bare CR, which csv handles with newline="").
    with real_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    confidence = "which_of_these_sentiment_scores_does_the_above_image_fit_into_best:confidence"
    kept = [r for r in rows if float(r[confidence]) >= 0.6]
    assert result.rows == 500
    assert result.filtered == {
        "below_min_confidence": len(rows) - len(kept),  # 1,724: the low-agreement rows
        "golden_excluded": sum(r["_golden"] == "TRUE" for r in kept),  # 412 of the 613
    }
    assert result.filtered["golden_excluded"] == 412
    assert all(v >= 1 for v in result.labels.values())
    records = store.read_parquet(DatasetLayout.parse(result.dataset).records)
    assert not records["golden"].any()
    assert (records["confidence"] >= 0.6).all()


@pytest.mark.integration
def test_csv_from_s3_and_rejected_rows_are_stored(store_uri: str, store: ObjectStore) -> None:
    data = plain_csv(
        [
            ("http://a.example/1.jpg", "positive"),
            ("nope", "Neutral"),
            ("http://a.example/2.jpg", "bad"),
        ]
    )
    source = S3Uri.parse(store_uri).child("in.csv")
    store.put_bytes(source, data)
    result = ingest(str(source), store_uri, store=store)
    assert result.rows == 1
    assert result.rejected == {"unsupported_scheme": 1, "unknown_label": 1}
    rejected = store.read_parquet(DatasetLayout.parse(result.dataset).rejected)
    assert rejected["row"].tolist() == [2, 3]
    info = store.read_json(DatasetLayout.parse(result.dataset).info)
    assert info["rows"] == 1 and info["options"]["sample"] is None


@pytest.mark.integration
def test_nothing_usable_is_an_error(store_uri: str, store: ObjectStore, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(plain_csv([("http://a.example/1.jpg", "so-so")]))
    with pytest.raises(PipelineError, match="no usable rows"):
        ingest(str(path), store_uri, store=store)


@pytest.mark.integration
def test_missing_bucket_is_a_clear_error(store: ObjectStore, tmp_path: Path) -> None:
    path = tmp_path / "ok.csv"
    path.write_bytes(plain_csv([("http://a.example/1.jpg", "Positive")]))
    with pytest.raises(PipelineError, match="bucket 'no-such-bucket' does not exist"):
        ingest(str(path), "s3://no-such-bucket/x", store=store)


@pytest.mark.integration
def test_cli_prints_one_json_line(real_csv: Path, store_uri: str, s3_endpoint: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml",
            "ingest",
            str(real_csv),
            "--store",
            store_uri,
            "--sample",
            "50",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["rows"] == 50 and sum(summary["labels"].values()) == 50
    assert summary["dataset"].startswith(store_uri + "/datasets/ds-")
    assert summary["rejected"] == {}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "/no/such/file.csv", "--store", "s3://b/p"], "CSV not found"),
        (["ingest", "x.csv", "--store", "b/p"], "expected an s3://BUCKET/PREFIX URI"),
        (["split", "--dataset", "s3://b/p/datasets/x", "--ratios", "0.5,0.5,0.5"], "sum to 1"),
        (["download", "--dataset", "s3://b/not-a-dataset"], "not a dataset URI"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str, s3_endpoint: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ml", "-q", *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().startswith("error: ") and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_refuses_bad_parameters() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml",
            "download",
            "--dataset",
            "s3://b/d",
            "--download-concurrency",
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "--download-concurrency: must be at least 1 and at most 512, got '0'" in done.stderr


@pytest.mark.integration
def test_csv_from_an_http_url(store_uri: str, store: ObjectStore, tmp_path: Path) -> None:
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from tests.helpers import serving

    (tmp_path / "images.csv").write_bytes(
        plain_csv([("http://a.example/1.jpg", "neutral"), ("http://a.example/2.jpg", "Positive")])
    )
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[method-assign, assignment]
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as base:
        loopback = SourceLimits(allow_networks=("127.0.0.0/8",))
        result = ingest(f"{base}/images.csv", store_uri, store=store, limits=loopback)
        assert result.rows == 2 and result.labels["Neutral"] == 1
        with pytest.raises(PipelineError, match="HTTP 404"):
            ingest(f"{base}/missing.csv", store_uri, store=store, limits=loopback)
        # The CSV's address obeys the address policy like every image does.
        with pytest.raises(PipelineError, match="blocked"):
            ingest(f"{base}/images.csv", store_uri, store=store)
