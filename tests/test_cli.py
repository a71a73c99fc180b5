"""Every bad argument or broken environment is one `error:` line and exit code 2, early."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ml.storage import ObjectStore, S3Uri
from tests.conftest import REPO
from tests.helpers import plain_csv


def _run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120, package: str = "ml"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", package, "-q", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def _one_error_line(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("endpoint", ["localhost:9000", "http://[::1", "ftp://store.example"])
def test_a_malformed_s3_endpoint(tmp_path: Path, endpoint: str) -> None:
    csv = tmp_path / "in.csv"
    csv.write_bytes(plain_csv([("http://a.example/1.jpg", "Positive")]))
    done = _run(["ingest", str(csv), "--store", "s3://b/p"], {"AWS_ENDPOINT_URL": endpoint})
    _one_error_line(done, "AWS_ENDPOINT_URL")


@pytest.mark.integration
def test_a_records_file_given_as_the_split(
    store_uri: str, store: ObjectStore, tmp_path: Path
) -> None:
    records = S3Uri.parse(store_uri).child("datasets", "ds-x", "records.parquet")
    buffer = io.BytesIO()
    pd.DataFrame({"row": [1], "url": ["http://a/1.jpg"], "label": ["Positive"]}).to_parquet(buffer)
    store.put_bytes(records, buffer.getvalue())
    done = _run(
        ["train", "--split", str(records), "--weights", "none"],
        {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()},
    )
    _one_error_line(done, "is not a split manifest", "split stage printed")


@pytest.mark.integration
@pytest.mark.parametrize(
    "head",
    [b"", b"\x80\x19"],  # plain noise; noise that opens like a pickle of protocol 25
    ids=["noise", "pickle-header"],
)
def test_a_garbage_weights_file(
    store_uri: str, store: ObjectStore, tmp_path: Path, head: bytes
) -> None:
    """One error line, whatever the bytes: torch warns about an unknown pickle protocol when
    random bytes happen to open with 0x80 (1 file in 256), and that warning stays out."""
    split = S3Uri.parse(store_uri).child("datasets", "ds-x", "splits", "s", "splits.parquet")
    rows = {
        "split": ["train", "valid", "test"],
        "label_index": [0, 1, 2],
        "object_key": ["a", "b", "c"],
        "sha256": ["1", "2", "3"],
        "label": ["Highly negative", "Negative", "Neutral"],
    }
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer)
    store.put_bytes(split, buffer.getvalue())
    garbage = tmp_path / "resnet18-garbage.pth"
    garbage.write_bytes(head + os.urandom(4096))
    done = _run(
        ["train", "--split", str(split), "--arch", "resnet18", "--weights", str(garbage)],
        {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()},
    )
    _one_error_line(done, "does not hold resnet18 ImageNet weights")


@pytest.mark.parametrize("out", ["DIR", "/proc/no-such/predictions.csv", "out.txt"])
def test_a_bad_predict_destination_is_refused_before_any_work(tmp_path: Path, out: str) -> None:
    csv = tmp_path / "score.csv"
    csv.write_bytes(plain_csv([("http://a.example/1.jpg",)], header=("url",)))
    target = str(tmp_path) if out == "DIR" else out
    started = time.monotonic()
    done = _run(
        ["predict", "--csv", str(csv), "--out", target],
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
    )  # never reached
    _one_error_line(done, "--out")
    assert time.monotonic() - started < 30


def test_predict_refuses_a_model_that_is_not_registered(tmp_path: Path) -> None:
    done = _run(
        [
            "predict",
            "--csv",
            "x.csv",
            "--out",
            str(tmp_path / "p.csv"),
            "--model",
            "runs:/0123/model",
        ]
    )
    _one_error_line(done, "models:/<name>@<alias>")


@pytest.mark.parametrize("stage", ["serve", "predict"])
def test_a_registry_model_without_mlflow_says_what_to_set(tmp_path: Path, stage: str) -> None:
    """Without MLFLOW_TRACKING_URI MLflow would look in a new mlflow.db in the current folder
    and say the model does not exist: the stage says what to set, and leaves nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    extra = (
        ["--csv", "x.csv", "--out", str(tmp_path / "out" / "p.csv")] if stage == "predict" else []
    )
    done = subprocess.run(
        [sys.executable, "-m", "ml", "-q", stage, *extra],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    _one_error_line(done, "set MLFLOW_TRACKING_URI", "scripts/stack serve")
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns


def test_imageserver_on_a_busy_or_invalid_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        done = _run(
            ["imageserver", "--port", str(busy.getsockname()[1])], timeout=30, package="devkit"
        )
    _one_error_line(done, "cannot listen on", "--port 0")
    invalid = _run(["imageserver", "--port", "70000"], timeout=30, package="devkit")
    assert invalid.returncode == 2 and "between 0 and 65535" in invalid.stderr
    host = _run(
        ["imageserver", "--host", "no-such-host.invalid", "--port", "0"],
        timeout=30,
        package="devkit",
    )
    _one_error_line(host, "cannot listen on")


def test_demo_with_a_missing_csv() -> None:
    _one_error_line(_run(["demo", "--csv", "/no/such/file.csv"], package="devkit"), "CSV not found")


def test_an_unexpected_failure_is_still_one_line(tmp_path: Path) -> None:
    """A directory where a CSV should be: an OS error we do not special-case."""
    done = _run(["ingest", str(tmp_path), "--store", "s3://b/p"])
    _one_error_line(done)


@pytest.mark.parametrize(
    ("package", "stage"),
    [
        ("ml", "ingest"),
        ("ml", "download"),
        ("ml", "split"),
        ("ml", "train"),
        ("ml", "register"),
        ("ml", "predict"),
        ("ml", "serve"),
        ("ml", "stage-weights"),
        ("devkit", "imageserver"),
        ("devkit", "demo"),
    ],
)
def test_every_stage_has_help(package: str, stage: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", package, stage, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith(f"usage: python -m {package} {stage}")
    assert "--help" in done.stdout


def test_a_progress_bar_whose_total_comes_later_counts_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The download's bar opens before the records are read, and its total comes from the
    download's own read (one read of the records, not two)."""
    from ml.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with Progress(0, "download") as bar:
        assert bar._bar is None  # no total yet: no bar to draw
        bar.set_total(4)
        for _ in range(4):
            bar.advance("ok")
        task = bar._bar.tasks[0]
        assert (task.total, task.completed) == (4, 4)
        bar.set_total(5)  # a total that changes moves the bar's end
        assert bar._bar.tasks[0].total == 5
