"""Download stage against the real local S3 endpoint and the image server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from devkit.imageserver import ImageServer
from ml.download import (
    MANIFEST_COLUMNS,
    STATUSES,
    BatchSpec,
    DownloadConfig,
    collect_manifest,
    download,
    download_batch,
    plan_batches,
    read_parts,
)
from ml.errors import PipelineError
from ml.fastput import FastPut
from ml.fetch import FetchConfig
from ml.ingest import ingest
from ml.layout import DatasetLayout
from ml.storage import ObjectStore, S3Uri
from tests.helpers import labelled_urls, plain_csv

pytestmark = pytest.mark.integration

LOOPBACK = ("127.0.0.0/8",)
FAST = FetchConfig(
    connect_timeout=1.0,
    read_timeout=1.0,
    deadline=2.5,
    retries=1,
    backoff_base=0.05,
    max_retry_after=1.0,
    max_bytes=2 * 1024 * 1024,
)
CONFIG = DownloadConfig(download_concurrency=8, allow_networks=LOOPBACK, fetch=FAST, flush_rows=10)

FAULTS = {
    "http_error": {"fault": "404"},
    "timeout": {"fault": "slow", "interval": "0.3"},
    "too_large": {"fault": "oversized", "size": str(3 * 1024 * 1024)},
    "not_image": {"fault": "html"},
    "too_many_pixels": {"fault": "huge"},
    "too_complex": {"fault": "scans", "repeats": "500"},
    "timeout ": {"fault": "slow-headers", "interval": "0.3"},
    "undecodable": {"fault": "truncated"},
    "too_many_redirects": {"fault": "redirect-loop"},
    "blocked": {"fault": "redirect-blocked"},
    "connection_error": {"fault": "reset"},
}


def _ingest(store_uri: str, store: ObjectStore, tmp_path: Path, rows: list[tuple[str, str]]) -> str:
    path = tmp_path / "in.csv"
    path.write_bytes(plain_csv(rows))
    return ingest(str(path), store_uri, store=store).dataset


def _manifest(store: ObjectStore, dataset: str) -> pd.DataFrame:
    return store.read_parquet(DatasetLayout.parse(dataset).download_manifest)


def _images(store: ObjectStore, dataset: str) -> list[str]:
    layout = DatasetLayout.parse(dataset)
    return store.list_keys(layout.store.child("images"))


def test_each_fault_gets_its_status(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    good = labelled_urls(image_server, {"Positive": 3, "Negative": 2}, prefix="faults-ok")
    bad = [
        (image_server.url(f"faults/{i}-{status.strip()}.jpg", **query), "Neutral")
        for i, (status, query) in enumerate(FAULTS.items())
    ]
    dataset = _ingest(store_uri, store, tmp_path, good + bad)
    summary = download(dataset, CONFIG, store=store)

    manifest = _manifest(store, dataset)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert set(manifest["status"]) <= set(STATUSES)
    by_url = manifest.set_index("url")["status"].to_dict()
    for url, _ in good:
        assert by_url[url] == "ok"
    for (url, _), status in zip(bad, FAULTS, strict=True):
        assert by_url[url] == status.strip(), (url, manifest.set_index("url").loc[url, "error"])
    assert summary["statuses"]["ok"] == 5 and summary["downloaded"] == 5
    assert summary["manifest"] == str(DatasetLayout.parse(dataset).download_manifest)

    ok = manifest[manifest["status"] == "ok"]
    assert (ok["http_status"] == 200).all() and (ok["bytes"] > 0).all()
    assert (ok["width"] > 0).all() and (ok["attempts"] >= 1).all()
    for row in ok.itertuples():
        data = store.get_bytes(S3Uri(S3Uri.parse(store_uri).bucket, row.object_key))
        assert hashlib.sha256(data).hexdigest() == row.sha256
        assert row.object_key.endswith(f"images/{row.sha256[:2]}/{row.sha256}.jpg")
    failed = manifest[manifest["status"] != "ok"]
    assert (failed["error"].str.len() > 0).all()
    assert failed.set_index("status").loc["http_error", "http_status"] == 404


def test_invalid_url_in_records_is_a_status(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    # Ingest rejects such URLs; records written by other tools still get a status, not a crash.
    dataset = _ingest(store_uri, store, tmp_path, labelled_urls(image_server, {"Neutral": 1}))
    layout = DatasetLayout.parse(dataset)
    records = store.read_parquet(layout.records)
    records.loc[len(records)] = {**records.iloc[0].to_dict(), "url": "ftp://x/y.jpg", "row": 2}
    store.write_parquet(layout.records, records)
    result = download(dataset, CONFIG, store=store)
    assert result["statuses"] == {"ok": 1, "invalid_url": 1}


def test_rerun_fetches_only_what_is_missing(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    good = labelled_urls(image_server, {"Positive": 6, "Neutral": 4}, prefix="rerun")
    missing = (image_server.url("rerun/missing.jpg", fault="404"), "Neutral")
    dataset = _ingest(store_uri, store, tmp_path, [*good, missing])
    first = download(dataset, CONFIG, store=store)
    assert first["downloaded"] == 10 and first["stored_new"] == 10
    hits = dict(image_server.hits)

    second = download(dataset, CONFIG, store=store)
    assert second["downloaded"] == 0 and second["skipped_existing"] == 10
    assert second["statuses"] == {"ok": 10, "http_error": 1}
    requested = {p for p, n in image_server.hits.items() if n != hits.get(p, 0)}
    assert requested == {missing[0].removeprefix(image_server.base_url)}
    assert len(_images(store, dataset)) == 10


def test_same_picture_at_two_urls_is_stored_once(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    rows = [(image_server.url(f"dup/{i}.jpg", content="shared"), "Positive") for i in range(3)]
    dataset = _ingest(store_uri, store, tmp_path, rows)
    result = download(dataset, CONFIG, store=store)
    assert result["downloaded"] == 3 and result["stored_new"] == 1 and result["images"] == 1
    assert _manifest(store, dataset)["sha256"].nunique() == 1
    assert len(_images(store, dataset)) == 1


def test_conditional_put_never_overwrites(store_uri: str, store: ObjectStore) -> None:
    key = S3Uri.parse(store_uri).child("images/x.jpg")
    assert store.put_bytes(key, b"first", if_absent=True) is True
    assert store.put_bytes(key, b"second", if_absent=True) is False
    assert store.get_bytes(key) == b"first"


def test_new_objects_take_the_fast_path_and_fall_back_to_boto3(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conditional PUTs of new objects go through obstore's client (written, or already there);
    when that client cannot tell (here: pointed at a closed port), boto3's path writes it, and
    a store that is really down is reported in boto3's words."""
    answers: list[bool | None] = []
    put_new = FastPut.put_new

    def spy(self: FastPut, *args: Any) -> bool | None:
        answers.append(put_new(self, *args))
        return answers[-1]

    monkeypatch.setattr(FastPut, "put_new", spy)
    store = ObjectStore()
    key = S3Uri.parse(store_uri).child("images/fast.jpg")
    assert store.put_bytes(key, b"first", content_type="image/jpeg", if_absent=True) is True
    assert store.put_bytes(key, b"second", content_type="image/jpeg", if_absent=True) is False
    assert answers == [True, False]
    head = store.client.head_object(Bucket=key.bucket, Key=key.key)
    assert head["ContentType"] == "image/jpeg" and store.get_bytes(key) == b"first"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    fast = store._fast()
    store._fast_put = FastPut(closed, fast.region, fast.credentials)
    other = S3Uri.parse(store_uri).child("images/fallback.jpg")
    assert store.put_bytes(other, b"third", content_type="image/jpeg", if_absent=True) is True
    assert answers[-1] is None and store.get_bytes(other) == b"third"

    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    down = ObjectStore()
    with pytest.raises(PipelineError, match="cannot reach the object store"):
        down.put_bytes(other, b"fourth", if_absent=True)
    assert answers[-1] is None  # the fast path was tried first


def test_batches_cover_the_dataset_and_merge(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    rows = labelled_urls(image_server, {"Positive": 12, "Negative": 9}, prefix="batches")
    dataset = _ingest(store_uri, store, tmp_path, rows)
    plan = plan_batches(dataset, batch_size=5, store=store)
    assert [b.stop - b.start for b in plan] == [5, 5, 5, 5, 1]
    assert plan[0].start == 0 and plan[-1].stop == 21
    assert sum(b.pending for b in plan) == 21
    assert len(plan_batches(dataset, batch_size=1, max_batches=4, store=store)) == 4
    assert BatchSpec.from_json(json.loads(json.dumps(plan[1].to_json()))) == plan[1]

    for spec in plan[:3]:
        assert download_batch(spec, CONFIG, store=store).downloaded == 5
    assert [b.batch for b in plan_batches(dataset, batch_size=5, store=store)] == [3, 4]
    for spec in plan[3:]:
        download_batch(spec, CONFIG, store=store)
    assert plan_batches(dataset, batch_size=5, store=store) == []
    summary = collect_manifest(dataset, store=store)
    assert summary["statuses"] == {"ok": 21} and summary["urls"] == 21


def test_concurrency_is_bounded(store_uri: str, store: ObjectStore, tmp_path: Path) -> None:
    with ImageServer() as server:
        rows = labelled_urls(server, {"Positive": 24}, prefix="bounded", delay="0.05")
        dataset = _ingest(store_uri, store, tmp_path, rows)
        config = DownloadConfig(download_concurrency=3, allow_networks=LOOPBACK, fetch=FAST)
        assert download(dataset, config, store=store)["downloaded"] == 24
        assert server.peak == 3


def test_store_down_is_a_clear_error(
    store_uri: str,
    store: ObjectStore,
    tmp_path: Path,
    image_server: ImageServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = _ingest(store_uri, store, tmp_path, labelled_urls(image_server, {"Neutral": 2}))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(PipelineError, match="cannot reach the object store at http://127.0.0.1:9"):
        download(dataset, CONFIG, store=ObjectStore())


def test_killed_run_resumes_without_losing_rows(
    store_uri: str, store: ObjectStore, tmp_path: Path, s3_endpoint: str
) -> None:
    with ImageServer() as server:
        rows = labelled_urls(
            server, {"Positive": 30, "Negative": 30}, prefix="killed", delay="0.15"
        )
        dataset = _ingest(store_uri, store, tmp_path, rows)
        layout = DatasetLayout.parse(dataset)
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ml",
                "-q",
                "download",
                "--dataset",
                dataset,
                "--allow-network",
                "127.0.0.0/8",
                "--download-concurrency",
                "2",
                "--flush-rows",
                "4",
            ],
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while len(store.list_keys(layout.download_parts)) < 2:
            assert child.poll() is None and time.monotonic() < deadline, "download ended early"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait()
        parts_before = store.list_keys(layout.download_parts)
        done_before = set(read_parts(layout, store).rows.query("status == 'ok'")["url"])
        objects_before = len(_images(store, dataset))
        assert 8 <= len(done_before) < 60
        hits_before = dict(server.hits)

        result = download(
            dataset,
            DownloadConfig(download_concurrency=8, allow_networks=LOOPBACK, fetch=FAST),
            store=store,
        )

        assert result["statuses"] == {"ok": 60}
        assert result["skipped_existing"] == len(done_before)
        refetched = {p for p, n in server.hits.items() if n != hits_before.get(p, 0)}
        assert not {u.removeprefix(server.base_url) for u in done_before} & refetched
        # Images stored by the killed run but not yet in its manifest are not written again.
        assert result["stored_new"] == 60 - objects_before
        assert set(parts_before) <= set(store.list_keys(layout.download_parts))


def test_cli_download_prints_summary(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    dataset = _ingest(
        store_uri, store, tmp_path, labelled_urls(image_server, {"Positive": 3}, prefix="cli")
    )
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "ml",
            "download",
            "--dataset",
            dataset,
            "--allow-network",
            "127.0.0.0/8",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["statuses"] == {"ok": 3} and summary["downloaded"] == 3
    assert summary["bytes"] > 0 and summary["skipped_existing"] == 0
    assert "download: 3/3 done" in done.stderr
    # pyarrow alone reads and writes the records, parts and manifest: pandas's import cost
    # 0.2 s of CPU a process (ml.tables)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "pyarrow.parquet" in imported and "pandas" not in imported


def _cli_download(dataset: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ml", "download", "--dataset", dataset, *extra],
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_rerun_with_nothing_to_do_answers_from_the_download_state(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    """Once every record is done, a rerun reads no records or parts (it proves nothing changed
    from listings); any change to the records, the parts, the forget requests or the manifest
    sends it back through the full check."""
    from ml.forget import forget_ledger

    rows = labelled_urls(image_server, {"Positive": 3}, prefix="state")
    dataset = _ingest(store_uri, store, tmp_path, rows)
    layout = DatasetLayout.parse(dataset)
    allow = ("--allow-network", "127.0.0.0/8")
    first = _cli_download(dataset, *allow)
    assert first.returncode == 0, first.stderr
    assert store.exists(layout.download_state)
    hits = sum(image_server.hits.values())

    again = _cli_download(dataset, *allow)
    assert again.returncode == 0, again.stderr
    assert "nothing to fetch: all 3 records" in again.stderr
    summary = json.loads(again.stdout)
    assert summary["statuses"] == {"ok": 3} and summary["downloaded"] == 0
    assert summary["skipped_existing"] == 3 and summary["images"] == 3
    assert sum(image_server.hits.values()) == hits

    # a wrong option is still refused, with its message, on the short path
    bad = _cli_download(dataset, "--allow-network", "not-a-network")
    assert bad.returncode != 0 and "not a CIDR network" in bad.stderr

    def full_check(expect: dict[str, int]) -> None:
        done = _cli_download(dataset, *allow)
        assert done.returncode == 0, done.stderr
        assert "nothing to fetch" not in done.stderr
        assert json.loads(done.stdout)["statuses"] == expect
        short = _cli_download(dataset, *allow)  # and the full check left a state again
        assert "nothing to fetch" in short.stderr, short.stderr

    store.delete(layout.download_manifest)  # the manifest is gone: rebuilt
    full_check({"ok": 3})
    assert store.exists(layout.download_manifest)
    # another attempt's manifest part appeared
    part = store.list_keys(layout.download_parts)[0]
    store.put_bytes(
        layout.download_part(0, 3, "copy.parquet"), store.get_bytes(S3Uri(layout.root.bucket, part))
    )
    full_check({"ok": 3})
    # a forget request for one of the URLs: the full check marks it
    forget_ledger(store, layout.store).add({"urls": [rows[0][0]], "sha256s": [], "phashes": []})
    full_check({"ok": 2, "forgotten": 1})
    # the records changed (a row more): the new one is fetched
    records = store.read_parquet(layout.records)
    ((url, _),) = labelled_urls(image_server, {"Neutral": 1}, prefix="state-more")
    row = int(records["row"].max()) + 1
    records.loc[len(records)] = {**records.iloc[0].to_dict(), "url": url, "row": row}
    store.write_parquet(layout.records, records)
    done = _cli_download(dataset, *allow)
    assert done.returncode == 0 and "nothing to fetch" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["downloaded"] == 1


def test_without_allow_network_loopback_is_blocked(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    rows = labelled_urls(image_server, {"Positive": 2}, prefix="noallow")
    dataset = _ingest(store_uri, store, tmp_path, rows)
    hits = sum(image_server.hits.values())
    result = download(dataset, DownloadConfig(download_concurrency=2, fetch=FAST), store=store)
    assert result["statuses"] == {"blocked": 2}
    assert sum(image_server.hits.values()) == hits


# ------------------------------------------------- objects this project did not write


def test_foreign_objects_among_the_parts_never_crash_a_stage(
    store_uri: str,
    store: ObjectStore,
    tmp_path: Path,
    image_server: ImageServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = labelled_urls(image_server, {"Positive": 6, "Neutral": 6}, prefix="foreign")
    dataset = _ingest(store_uri, store, tmp_path, rows)
    layout = DatasetLayout.parse(dataset)
    parts = layout.download_parts
    download(dataset, CONFIG, store=store)
    junk = {
        parts.child("00000000-00000012").key + "/": b"",  # an S3 console folder marker
        parts.child("00000000-00000012", "empty.parquet").key: b"",
        parts.child("00000000-00000012", "junk.parquet").key: b"PAR1 not really parquet",
        parts.child("00000000-00000012", "notes.txt").key: b"hello",
        parts.child("00000000-00000012", "other.parquet").key: _parquet({"a": [1, 2]}),
        # the manifest's columns, but a row number that is text
        parts.child("00000000-00000012", "typed.parquet").key: _parquet(
            {"url": ["u"], "status": ["ok"], "row": ["first"], "fetched_at": ["t"]}
        ),
    }
    good = store.list_keys(parts)
    cut = store.get_bytes(S3Uri(layout.store.bucket, good[0]))
    junk[parts.child("00000000-00000012", "truncated.parquet").key] = cut[: len(cut) // 2]
    for key, data in junk.items():
        store.client.put_object(Bucket=layout.store.bucket, Key=key, Body=data)

    with caplog.at_level("WARNING", logger="ml.download"):
        batches = plan_batches(dataset, batch_size=5, store=store)
        summary = collect_manifest(dataset, store=store)
    assert batches == []  # every URL is still known to be ok
    assert summary["statuses"] == {"ok": 12}
    assert sorted(summary["unreadable_parts"]) == sorted(k for k in junk if not k.endswith("/"))
    assert "skipped 6 manifest part(s)" in caplog.text and "junk.parquet" in caplog.text
    again = download(dataset, CONFIG, store=store)
    assert again["skipped_existing"] == 12 and again["statuses"] == {"ok": 12}


def test_a_damaged_manifest_is_rebuilt_from_its_parts(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    from ml.splits import make_splits

    rows = labelled_urls(image_server, {"Positive": 6, "Neutral": 6}, prefix="damaged")
    dataset = _ingest(store_uri, store, tmp_path, rows)
    download(dataset, CONFIG, store=store)
    layout = DatasetLayout.parse(dataset)
    whole = store.get_bytes(layout.download_manifest)
    for damage in (whole[: len(whole) // 3], b"", _parquet({"x": [1]})):
        store.put_bytes(layout.download_manifest, damage)
        assert make_splits(dataset, ratios="0.5,0.25,0.25", store=store)["images"] == 12
        assert _manifest(store, dataset)["status"].eq("ok").sum() == 12


def test_a_damaged_records_file_is_one_clear_error(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    dataset = _ingest(store_uri, store, tmp_path, labelled_urls(image_server, {"Neutral": 2}))
    layout = DatasetLayout.parse(dataset)
    records = store.get_bytes(layout.records)
    store.put_bytes(layout.records, records[:100])
    with pytest.raises(
        PipelineError,
        match=r"records\.parquet is not a readable Parquet file.*"
        r"run ingest again",
    ):
        plan_batches(dataset, store=store)
    done = subprocess.run(
        [sys.executable, "-m", "ml", "-q", "download", "--dataset", dataset],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "records.parquet" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _parquet(columns: dict[str, list[object]]) -> bytes:
    import io

    buffer = io.BytesIO()
    pd.DataFrame(columns).to_parquet(buffer)
    return buffer.getvalue()
