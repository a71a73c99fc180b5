"""Secrets in URLs never leave: logs, summaries, dataset.json, manifests, messages, MLflow."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import pytest

from ml.errors import PipelineError
from ml.redact import get_logger, redact_text, redact_url

SECRETS = ("hunter2", "tok-123", "SIG456", "AKIAEXAMPLE", "pa55", "sess789")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:hunter2@host/a.jpg", "https://***@host/a.jpg"),
        ("https://host/a.jpg?token=tok-123&w=2", "https://host/a.jpg?token=***&w=2"),
        (
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIAEXAMPLE"
            "&X-Amz-Signature=SIG456",
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=***"
            "&X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("http://h/x?api_key=1&password=pa55&sig=2", "http://h/x?api_key=***&password=***&sig=***"),
        ("http://h/x?Signature=SIG456&Key-Pair-Id=k", "http://h/x?Signature=***&Key-Pair-Id=***"),
        ("http://h/x?session_token=sess789", "http://h/x?session_token=***"),
        ("https://farm1.staticflickr.com/1/2_3.jpg", "https://farm1.staticflickr.com/1/2_3.jpg"),
        ("http://h/x?size=large&id=7", "http://h/x?size=large&id=7"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_finds_every_url_and_dsn() -> None:
    text = (
        "fetching https://u:hunter2@a/x.jpg then http://b/y?token=tok-123 failed; "
        "db postgresql+psycopg2://airflow:pa55@postgres/airflow"
    )
    clean = redact_text(text)
    assert not any(s in clean for s in SECRETS)
    assert "https://***@a/x.jpg" in clean and "postgres/airflow" in clean


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    log = get_logger("ml.test_redact")
    with caplog.at_level(logging.INFO, logger="ml.test_redact"):
        log.info("got %s", "https://u:hunter2@h/x.jpg?token=tok-123")
        try:
            raise ValueError("bad https://h/y?password=pa55")
        except ValueError:
            log.exception("failed")
    text = caplog.text
    assert "hunter2" not in text and "tok-123" not in text and "pa55" not in text
    assert "https://***@h/x.jpg?token=***" in text and "ValueError" in text


def _secret_csv(path: Path, server_url: str) -> None:
    path.write_text(
        "url,label\n"
        f"{server_url.replace('http://', 'http://user:hunter2@')}/ok/1.jpg?token=tok-123,Positive\n"
        f"{server_url}/ok/2.jpg?X-Amz-Signature=SIG456,Negative\n"
        f"{server_url}/gone.jpg?sig=SIG456&fault=404,Neutral\n"
        "ftp://user:pa55@h/x.jpg,Neutral\n"
    )


@pytest.mark.integration
def test_no_secret_reaches_the_store_summaries_or_logs(
    store_uri: str,
    store: object,
    tmp_path: Path,
    image_server: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from devkit.imageserver import ImageServer
    from ml.download import DownloadConfig, download
    from ml.fetch import FetchConfig
    from ml.ingest import ingest
    from ml.layout import DatasetLayout
    from ml.splits import make_splits
    from ml.storage import ObjectStore

    assert isinstance(store, ObjectStore) and isinstance(image_server, ImageServer)
    csv = tmp_path / "secret.csv"
    _secret_csv(csv, image_server.base_url)
    source = f"{csv}"
    with caplog.at_level(logging.INFO):
        result = ingest(source, store_uri, store=store)
        layout = DatasetLayout.parse(result.dataset)
        summary = download(
            result.dataset,
            DownloadConfig(allow_networks=("127.0.0.0/8",), fetch=FetchConfig(retries=0)),
            store=store,
        )
        splits = make_splits(result.dataset, ratios="1,0,0", store=store)
    # The records keep the real URLs: the downloader needs them.
    assert any("hunter2" in u for u in store.read_parquet(layout.records)["url"])
    public = [
        json.dumps(result.to_json()),
        json.dumps(summary),
        json.dumps(splits),
        store.get_bytes(layout.info).decode(),
        store.read_parquet(layout.download_manifest).to_json(),
        store.read_parquet(layout.rejected).to_json(),
        store.read_parquet(store_uri_child(splits["split"])).to_json(),
        caplog.text,
    ]
    for text in public:
        assert not any(secret in text for secret in SECRETS), text[:500]
    manifest = store.read_parquet(layout.download_manifest)
    assert manifest["status"].tolist().count("ok") == 2
    assert manifest["url"].str.contains(r"\*\*\*").all()


def store_uri_child(uri: str) -> object:
    from ml.storage import S3Uri

    return S3Uri.parse(uri)


def test_store_errors_never_show_endpoint_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from devkit.servers import free_port
    from ml.storage import ObjectStore, S3Uri

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://key:hunter2@127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(PipelineError) as info:
        ObjectStore().check_bucket(S3Uri("b"))
    assert "hunter2" not in str(info.value) and "cannot reach the object store" in str(info.value)


@pytest.mark.parametrize("endpoint", ["localhost:9000", "ftp://h", "http://[::1", "http://h:99999"])
def test_a_malformed_endpoint_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    from ml.storage import ObjectStore

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(PipelineError, match="AWS_ENDPOINT_URL"):
        ObjectStore()


@pytest.mark.slow
def test_unreachable_mlflow_is_named_within_30s_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from devkit.servers import free_port
    from ml.registry import register_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:hunter2@127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        register_model("0" * 32)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < 30
    assert "cannot reach the MLflow tracking server" in message and "no MLflow run" not in message
    assert "hunter2" not in message and "http://***@127.0.0.1" in message


@pytest.mark.integration
def test_mlflow_params_and_tags_are_redacted(mlflow_server: str) -> None:
    import mlflow
    import torch

    from ml.data import Loaders
    from ml.model import WeightsInfo
    from ml.runtime import Runtime
    from ml.tracking import log_start
    from ml.train_config import TrainConfig
    from ml.uri import S3Uri

    cfg = TrainConfig(
        split="s3://b/p/datasets/d/splits/s/splits.parquet",
        weights="s3://b/w.pth",
        orchestrator_run_id="https://u:hunter2@h/?x=1",
        experiment="redact",
    )
    loaders = Loaders(None, None, None, None)  # type: ignore[arg-type]
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    mlflow.set_experiment("redact")
    with mlflow.start_run() as run:
        log_start(cfg, WeightsInfo("s3://b/w.pth", True), loaders, rt, S3Uri("b", "c"), "d")
    data = mlflow.get_run(run.info.run_id).data
    assert "hunter2" not in json.dumps(data.params) + json.dumps(data.tags)
    assert data.params["split_sha256"] == "d"


def test_manifest_urls_written_before_redaction_are_redacted_on_collect() -> None:
    frame = pd.DataFrame({"url": ["http://u:hunter2@h/x.jpg"]})
    assert redact_url(frame["url"][0]) == "http://***@h/x.jpg"


def test_an_error_is_quoted_by_its_first_line_redacted_or_by_its_type() -> None:
    """One-line error reports (MLflow's server answering errors, a model that cannot load)
    quote ``first_line``: an empty message must not fail the report itself."""
    from ml.redact import first_line

    error = RuntimeError("GET http://user:secret@mlflow:5000/api failed\nTraceback: more")
    assert first_line(error) == "GET http://***@mlflow:5000/api failed"
    assert first_line(RuntimeError("x" * 500)) == "x" * 200
    assert first_line(ConnectionError()) == "ConnectionError"
    cut = first_line(RuntimeError("x" * 180 + " http://user:supersecret@host/a"))
    assert "supers" not in cut and cut.startswith("x" * 180 + " http://***@")  # redacted, then cut


def test_an_error_named_by_its_type_quotes_its_first_line_once() -> None:
    """``named_line`` puts the type before the first line, and the type alone when the message
    is empty: an empty message must not read "OSError: OSError"."""
    from ml.redact import named_line

    error = ValueError("bad header at http://user:secret@host/x.jpg\nTraceback: more")
    assert named_line(error) == "ValueError: bad header at http://***@host/x.jpg"
    assert named_line(RuntimeError("y" * 500), limit=10) == "RuntimeError: " + "y" * 10
    assert named_line(OSError()) == "OSError"
    assert named_line(KeyError("")) == "KeyError: ''"


def test_an_unexpected_error_on_one_url_is_one_redacted_line_in_its_manifest_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug met on one URL becomes that URL's internal_error row (the traceback goes to the
    log): the row's error is one line with the type, redacted, however long the message."""
    from ml.download import _Worker
    from ml.forget import Forgotten
    from ml.statuses import Status

    class Broken:
        def fetch(self, url: str) -> None:
            raise RuntimeError("lost http://user:secret@10.0.0.1/token\n" + "detail\n" * 1000)

    worker = _Worker(Broken(), None, None, None, Forgotten({}, {}))  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="ml"):
        row = worker({"url": "http://images.test/a.jpg", "id": "7", "label": "Neutral", "row": 3})
    assert row["status"] == Status.INTERNAL_ERROR
    assert row["error"] == "RuntimeError: lost http://***@10.0.0.1/token"
    assert "Traceback" in caplog.text and "secret" not in caplog.text
