"""Fencing by attempt: a stale attempt of a task never writes once a newer one has started.

Each fault test runs the older attempt as a real process, freezes it (SIGSTOP) once it has
written, runs the newer attempt to the end, then lets the older one go on (SIGCONT): it must
stop at its next write with one line, and the store and MLflow hold only the newer one's work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ml import fencing
from ml.fencing import StaleAttemptError
from ml.storage import ObjectStore, S3Uri
from tests.helpers import labelled_urls, plain_csv, small_config

REPO = Path(__file__).resolve().parent.parent
LABELS5 = ("Highly negative", "Negative", "Neutral", "Positive", "Highly positive")


def _snapshot(store: ObjectStore, prefix: S3Uri) -> dict[str, str]:
    """Every object under ``prefix`` and its ETag (a rewrite with other bytes changes it)."""
    found: dict[str, str] = {}
    pages = store.client.get_paginator("list_objects_v2").paginate(
        Bucket=prefix.bucket, Prefix=prefix.key.rstrip("/") + "/"
    )
    for page in pages:
        found.update({item["Key"]: item["ETag"] for item in page.get("Contents", [])})
    return found


def _older_attempt(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            out, err = process.communicate(timeout=30)
            raise AssertionError(f"the older attempt never {what}: {out[-1000:]} {err[-3000:]}")
        time.sleep(0.2)


def _frozen(pid: int) -> bool:
    """Whether the process has stopped itself (SIGSTOP), at the point its script chose."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()[0] == "T"


def _resume_and_finish(process: subprocess.Popen[str]) -> str:
    """SIGCONT the frozen older attempt; its exit code and the error line it printed."""
    os.kill(process.pid, signal.SIGCONT)
    _, err = process.communicate(timeout=240)
    assert process.returncode != 0, err[-3000:]
    return err


# ---------------------------------------------------------------------------- the lease


@pytest.mark.integration
def test_a_newer_try_takes_the_lease_and_an_older_one_cannot_take_it_back(
    store: ObjectStore, store_uri: str
) -> None:
    lease = S3Uri.parse(store_uri).child("leases", "train.json")
    first = fencing.take(store, lease, 1, "train")
    fencing.install(first, store)
    try:
        fencing.check()  # still its own
        store.put_bytes(S3Uri.parse(store_uri).child("a"), b"1")
        second = fencing.take(store, lease, 2, "train")
        with pytest.raises(StaleAttemptError, match=r"try 1 of train was superseded by try 2"):
            store.put_bytes(S3Uri.parse(store_uri).child("a"), b"2")
        with pytest.raises(StaleAttemptError):  # once lost, lost: no request needed
            store.delete(S3Uri.parse(store_uri).child("a"))
        assert store.get_bytes(S3Uri.parse(store_uri).child("a")) == b"1"
    finally:
        fencing.install(None)
    with pytest.raises(StaleAttemptError, match="superseded by try 2"):
        fencing.take(store, lease, 1, "train")  # a late start of the older try
    again = fencing.take(store, lease, 2, "train")  # a redelivery of the same try takes over
    assert again.owner != second.owner
    assert json.loads(store.get_bytes(lease))["owner"] == again.owner
    fencing.check()  # no lease held: nothing is fenced (the CLI, notebooks)


# ---------------------------------------------------------------------- download_batch


DOWNLOAD = """
import os, signal, sys
import ml.download
from ml import fencing
from ml.download import BatchSpec, DownloadConfig, download_batch
flush = ml.download._PartWriter.flush
def freeze_after_the_first(writer):  # a part written in full, then frozen (a stall)
    parts = writer.parts
    flush(writer)
    if parts == 0 and writer.parts == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
ml.download._PartWriter.flush = freeze_after_the_first
from ml.storage import ObjectStore, S3Uri
spec, lease, try_number = BatchSpec.from_json(eval(sys.argv[1])), S3Uri.parse(sys.argv[2]), 1
config = DownloadConfig(allow_networks=("127.0.0.0/8",), flush_rows=2, download_concurrency=1)
store = ObjectStore()
with fencing.attempt(store, lease, try_number, "download_batch-0"):
    try:
        download_batch(spec, config, store=store)
    except fencing.StaleAttemptError as error:
        sys.exit(f"error: {error}")
"""


@pytest.mark.integration
@pytest.mark.slow
def test_a_stale_download_attempt_writes_nothing_after_a_newer_one_started(
    store: ObjectStore, store_uri: str, image_server: Any, tmp_path: Path
) -> None:
    from ml.download import DownloadConfig, download_batch, plan_batches, read_parts
    from ml.ingest import ingest
    from ml.layout import DatasetLayout

    rows = labelled_urls(image_server, dict.fromkeys(LABELS5, 4), prefix="fenced", delay=0.4)
    csv = tmp_path / "fenced.csv"
    csv.write_bytes(plain_csv(rows))
    dataset = ingest(str(csv), store_uri, store=store).dataset
    (spec,) = plan_batches(dataset, batch_size=100, store=store)
    layout = DatasetLayout.parse(dataset)
    lease = S3Uri.parse(store_uri).child("leases", "download_batch-0.json")

    older = _older_attempt(DOWNLOAD, repr(spec.to_json()), str(lease))
    try:
        _wait_for(lambda: _frozen(older.pid), older, "wrote a part")
        written_by_older = set(read_parts(layout, store).rows["url"])
        config = DownloadConfig(allow_networks=("127.0.0.0/8",), download_concurrency=4)
        with fencing.attempt(store, lease, 2, "download_batch-0"):
            newer = download_batch(spec, config, store=store)
        assert newer.skipped_existing == len(written_by_older)  # it resumed the older's work
        before = _snapshot(store, layout.root)
        hits_before = sum(n for p, n in image_server.hits.items() if "/fenced/" in p)
        err = _resume_and_finish(older)
    finally:
        if older.poll() is None:
            os.kill(older.pid, signal.SIGCONT)
            older.kill()
    assert "error: try 1 of download_batch-0 was superseded by try 2" in err, err[-3000:]
    assert _snapshot(store, layout.root) == before  # no part, no image, no rewrite
    hits_after = sum(n for p, n in image_server.hits.items() if "/fenced/" in p)
    assert hits_after - hits_before <= 1  # at most the fetch it was in when frozen
    parts = read_parts(layout, store).rows
    assert set(parts.loc[parts["status"] == "ok", "url"]) == {url for url, _ in rows}


# -------------------------------------------------------------------------------- train


TRAIN = """
import os, pickle, signal, sys
import ml.train
from ml import fencing
from ml.storage import ObjectStore, S3Uri
from ml.train import fine_tune
checkpoint = ml.train.Trainer.checkpoint
def freeze_after_the_first(trainer):  # epoch 1 written in full, then frozen (a stall)
    checkpoint(trainer)
    trainer.checkpoints.wait()
    ml.train.Trainer.checkpoint = checkpoint
    os.kill(os.getpid(), signal.SIGSTOP)
ml.train.Trainer.checkpoint = freeze_after_the_first
config, lease = pickle.loads(bytes.fromhex(sys.argv[1])), S3Uri.parse(sys.argv[2])
store = ObjectStore()
with fencing.attempt(store, lease, 1, "train"):
    try:
        fine_tune(config, store=store)
    except fencing.StaleAttemptError as error:
        sys.exit(f"error: {error}")
"""


@pytest.mark.integration
@pytest.mark.slow
def test_a_stale_training_attempt_writes_nothing_after_a_newer_one_started(
    learn_split: str, mlflow_server: str, store: ObjectStore, tmp_path: Path
) -> None:
    """Try 1 trains epoch 1 (checkpoint and MLflow metrics written) and freezes; try 2 resumes
    from that checkpoint and finishes; try 1 goes on and stops at its next write: the
    checkpoints, the result and the MLflow run are try 2's alone."""
    import pickle

    from mlflow import MlflowClient

    from ml.train import fine_tune

    folder = S3Uri.parse(learn_split.rsplit("/splits/", 1)[0] + f"/fenced/{uuid.uuid4().hex[:8]}")
    config = small_config(
        learn_split,
        tmp_path,
        arch="resnet18",
        epochs=3,
        max_steps_per_epoch=2,
        image_size=32,
        checkpoint=str(folder),
        experiment=f"fenced-{uuid.uuid4().hex[:6]}",
    )
    lease = folder.child("lease.json")
    older = _older_attempt(TRAIN, pickle.dumps(config).hex(), str(lease))
    try:
        _wait_for(lambda: _frozen(older.pid), older, "saved a checkpoint")
        assert any(key.endswith("/last.pt") for key in _snapshot(store, folder))
        with fencing.attempt(store, lease, 2, "train"):
            result = fine_tune(config, store=store)
        before = _snapshot(store, folder)
        client = MlflowClient(mlflow_server)
        history = client.get_metric_history(result["run_id"], "valid_macro_f1")
        err = _resume_and_finish(older)
    finally:
        if older.poll() is None:
            os.kill(older.pid, signal.SIGCONT)
            older.kill()
    assert "error: try 1 of train was superseded by try 2" in err, err[-3000:]
    assert len(history) == 3, history  # one value per epoch: 1 from try 1, 2 and 3 from try 2
    assert _snapshot(store, folder) == before
    after = client.get_metric_history(result["run_id"], "valid_macro_f1")
    assert [(m.step, m.value) for m in after] == [(m.step, m.value) for m in history]
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
