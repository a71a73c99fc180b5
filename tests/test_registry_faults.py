"""The registry under faults: two registrations racing to create a model, a tracking server
that answers errors (every MLflow request retries a bounded number of times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from ml.errors import PipelineError

REPO = Path(__file__).resolve().parent.parent

# One registration: it looks the model up first and finds nothing (as both racers do when
# neither has created it yet), then waits for the agreed moment and creates it.
RACER = """
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from ml.registry import _ensure_registered_model

name, folder = sys.argv[1], Path(sys.argv[2])
client = MlflowClient()
real_get, looks = client.get_registered_model, []

def get(model):
    looks.append(model)
    if len(looks) == 1:
        raise MlflowException(f"Registered Model with name={model} not found",
                              error_code=RESOURCE_DOES_NOT_EXIST)
    return real_get(model)

client.get_registered_model = get
(folder / f"ready-{time.monotonic_ns()}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
_ensure_registered_model(client, name)
print(f"looked {len(looks)}")
"""


@pytest.mark.integration
@pytest.mark.slow
def test_two_registrations_creating_one_model_both_succeed(
    mlflow_server: str, tmp_path: Path
) -> None:
    """Both processes create the model at the same moment: the store refuses the second
    (RESOURCE_ALREADY_EXISTS, or its unique constraint); that one uses the winner's model."""
    from mlflow import MlflowClient

    script = tmp_path / "racer.py"
    script.write_text(RACER)
    name = f"race-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_server}
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), name, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # both have imported MLflow and looked: now they create at once
    (tmp_path / "go").touch()
    outcomes = [racer.communicate(timeout=180) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err[-2000:] for _, err in outcomes]
    looks = sorted(out.strip() for out, _ in outcomes)
    assert looks == ["looked 1", "looked 2"]  # the loser looked again and found the winner's
    models = MlflowClient(mlflow_server).search_registered_models(f"name='{name}'")
    assert [m.name for m in models] == [name]


class _Failing(BaseHTTPRequestHandler):
    """A tracking server that is up (its health check answers) and fails every request."""

    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path.split("?")[0])
        self.send_response(200 if self.path.startswith("/health") else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER", "TIMEOUT"):
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", "")  # restored after the test
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}")
    _Failing.hits = []
    yield _Failing.hits
    server.shutdown()


def test_a_failing_tracking_server_is_retried_a_bounded_number_of_times(
    failing_server: list[str],
) -> None:
    """MLflow's own default is 7 retries with a doubling backoff (minutes per call); every
    call the pipeline makes gets 2 retries, so it fails in seconds with one clear error."""
    from ml.mlflow_access import REQUEST_LIMITS
    from ml.registry import champion_training, register_model

    with pytest.raises(PipelineError, match="failed to answer"):
        register_model("0" * 32)
    assert failing_server.count("/api/2.0/mlflow/runs/get") == 3
    assert (
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        == REQUEST_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )
    failing_server.clear()  # the champion's lookup: a failure is not "no champion"
    with pytest.raises(PipelineError, match="failed to answer for the champion"):
        champion_training("image-sentiment")
    calls = [hit for hit in failing_server if hit != "/health"]
    assert len(calls) == 3 and len(set(calls)) == 1, failing_server


@pytest.mark.integration
def test_an_artifact_a_run_lacks_is_left_out_quietly_and_an_unreadable_one_with_a_warning(
    mlflow_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry describes a version from optional artifacts (likely label errors, split
    counts, test predictions). A run logged before one existed is described without it; one
    whose artifact is corrupt is too, but a warning names the artifact and the reason."""
    from mlflow import MlflowClient

    from ml import mlflow_access
    from ml.registry import _split_counts, _top_label_issues

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"artifacts-{uuid.uuid4().hex[:8]}")
    bare, corrupt, good = (client.create_run(experiment).info.run_id for _ in range(3))
    for name, content in {
        "label_issues.csv": b"no,such,columns\n1,2,3\n",
        "split_counts.json": b"{not json",
        "test_predictions.parquet": b"not a parquet file",
    }.items():
        (tmp_path / name).write_bytes(content)
        folder = "data" if name.endswith(".json") else "evaluation"
        client.log_artifact(corrupt, str(tmp_path / name), folder)
    client.log_text(
        good,
        "url,given_label,suggested_label,confidence\n"
        "http://a/1.jpg,Neutral,Positive,0.9\nhttp://a/2.jpg,Negative,Neutral,0.8\n",
        "evaluation/label_issues.csv",
    )
    client.log_text(
        good, '{"train": {"Neutral": 3}, "test": {"Neutral": 1}}', "data/split_counts.json"
    )

    def described(run_id: str) -> tuple[object, ...]:
        return (
            _top_label_issues(client, run_id),
            _split_counts(client, run_id),
            mlflow_access.test_predictions(client, run_id),
        )

    caplog.set_level("WARNING")
    assert described(bare) == (None, "", None)
    assert not caplog.records
    assert described(corrupt) == (None, "", None)
    warned = [r.getMessage() for r in caplog.records]
    for path in ("label_issues.csv", "split_counts.json", "test_predictions.parquet"):
        assert sum(path in line and "could not be read" in line for line in warned) == 1, warned
    issues, counts, _ = described(good)
    assert issues == {
        "listed": 2,
        "top": [
            {
                "url": "http://a/1.jpg",
                "given_label": "Neutral",
                "suggested_label": "Positive",
                "confidence": 0.9,
            },
            {
                "url": "http://a/2.jpg",
                "given_label": "Negative",
                "suggested_label": "Neutral",
                "confidence": 0.8,
            },
        ],
    }
    assert json.loads(counts) == {"train": 3, "test": 1}
