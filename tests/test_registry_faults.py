"""The registry under faults: two registrations racing to create a model, a tracking server
that answers errors (every MLflow request retries a bounded number of times)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from ml.errors import PipelineError
from tests.helpers import serving

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


class _Answering(BaseHTTPRequestHandler):
    """A handler that answers GET and POST alike and logs nothing."""

    def reply(self, status: int, body: bytes, kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.do_GET()  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


class _Failing(_Answering):
    """A tracking server that is up (its health check answers) and answers every request with
    ``answer`` (status, body): by default 503, which MLflow retries and then reports as a
    request that got no answer."""

    hits: ClassVar[list[str]] = []
    answer: ClassVar[tuple[int, bytes]] = (503, b"")

    def do_GET(self) -> None:
        self.hits.append(self.path.split("?")[0])
        self.reply(*((200, b"") if self.path.startswith("/health") else self.answer))


def _port_saying_403() -> ThreadingHTTPServer:
    """A server on a port whose number contains "403": MLflow quotes the URL in the message of
    a request that got no answer, and that text must not read as "permission denied"."""
    for port in range(40300, 40400):
        try:
            return ThreadingHTTPServer(("127.0.0.1", port), _Failing)
        except OSError:
            continue
    raise AssertionError("no free port in 40300-40399 on loopback")


@pytest.fixture
def failing_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    with serving(_port_saying_403()) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER", "TIMEOUT"):
            monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", "")  # restored after the test
            monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}")
        _Failing.hits = []
        _Failing.answer = (503, b"")
        yield _Failing.hits


@contextlib.contextmanager
def _proxy(upstream: str, failing: str) -> Iterator[tuple[str, list[str]]]:
    """A proxy in front of ``upstream`` that answers 503 to every path under ``failing`` (and
    lists those requests) and passes the rest on."""
    failed: list[str] = []

    class Proxy(_Answering):
        def do_GET(self) -> None:
            if self.path.startswith(failing):
                failed.append(self.path)
                status, body, kind = 503, b"", "text/plain"
            else:
                length = int(self.headers.get("Content-Length") or 0)
                request = urllib.request.Request(
                    upstream + self.path,
                    data=self.rfile.read(length) if length else None,
                    method=self.command,
                    headers={"Content-Type": self.headers.get("Content-Type", "")},
                )
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        status, body = answer.status, answer.read()
                        kind = answer.headers.get("Content-Type", "")
                except urllib.error.HTTPError as refused:
                    status, body = refused.code, refused.read()
                    kind = refused.headers.get("Content-Type", "")
            self.reply(status, body, kind)

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Proxy)) as url:
        yield url, failed


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


def test_only_what_the_server_answered_counts_as_no_champion(
    failing_server: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "No champion" (so the new version is promoted untested) must come from the registry's
    own answer: a model or alias it says does not exist, or a model the user may not see. A
    request that got no answer quotes its URL (here a port with "403" in it), a 404 page that is
    not MLflow's, and refused credentials are errors, each with its own message."""
    from mlflow import MlflowClient

    from ml import mlflow_access
    from ml.registry import champion_training

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    def error(status: int, body: bytes) -> Exception:
        _Failing.answer = (status, body)
        with pytest.raises(Exception) as raised:
            MlflowClient().get_model_version_by_alias("image-sentiment", "champion")
        return raised.value

    def kinds(exc: Exception) -> tuple[bool, bool, bool]:
        return mlflow_access.missing(exc), mlflow_access.denied(exc), mlflow_access.exists(exc)

    def mlflow_error(code: str, message: str) -> bytes:
        return json.dumps({"error_code": code, "message": message}).encode()

    no_answer = error(503, b"")
    assert "403" in str(no_answer)  # the port: text that used to read as "permission denied"
    assert kinds(no_answer) == (False, False, False)
    assert kinds(error(404, b"<html>Not Found</html>")) == (False, False, False)
    assert kinds(error(500, b"Internal Server Error: already exists")) == (False, False, False)
    assert kinds(error(403, b"Permission denied")) == (False, True, False)
    assert kinds(error(401, b"You are not authenticated")) == (False, False, False)
    assert mlflow_access.unauthenticated(error(401, b"You are not authenticated"))
    answers = {
        "RESOURCE_DOES_NOT_EXIST": "Registered Model with name=image-sentiment not found",
        "INVALID_PARAMETER_VALUE": "Registered model alias champion not found.",
    }
    for code, message in answers.items():
        assert kinds(error(404 if "EXIST" in code else 400, mlflow_error(code, message)))[0]
    taken = error(400, mlflow_error("RESOURCE_ALREADY_EXISTS", "Registered Model exists"))
    assert kinds(taken) == (False, False, True)
    assert not mlflow_access.missing(
        error(400, mlflow_error("INVALID_PARAMETER_VALUE", "Invalid alias name"))
    )

    for answer, no_champion in [
        ((404, b"<html>Not Found</html>"), "failed to answer for the champion"),
        ((401, b"You are not authenticated"), "refused the credentials of MLflow user"),
    ]:
        _Failing.answer = answer
        with pytest.raises(PipelineError, match=no_champion):
            champion_training("image-sentiment")
    for answer in [(403, b"Permission denied"), (400, mlflow_error(*answers.popitem()))]:
        _Failing.answer = answer
        assert champion_training("image-sentiment") is None


@pytest.mark.integration
def test_an_artifact_a_run_lacks_is_left_out_quietly_and_an_unreadable_one_with_a_warning(
    mlflow_server: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry describes a version from optional artifacts (likely label errors, split
    counts, test predictions). A run logged before one existed is described without it; one
    whose artifact is corrupt, or whose artifact store does not answer (MLflow reports that
    download as RESOURCE_DOES_NOT_EXIST too), is also, but a warning names the artifact and the
    reason."""
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

    def described_by(client: MlflowClient, run_id: str) -> tuple[object, ...]:
        return (
            _top_label_issues(client, run_id),
            _split_counts(client, run_id),
            mlflow_access.test_predictions(client, run_id),
        )

    def described(run_id: str) -> tuple[object, ...]:
        return described_by(client, run_id)

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
    pd.DataFrame({"object_key": ["a.jpg"]}).to_parquet(tmp_path / "test_predictions.parquet")
    client.log_artifact(good, str(tmp_path / "test_predictions.parquet"), "evaluation")
    caplog.clear()
    assert mlflow_access.test_predictions(client, good)["object_key"].tolist() == ["a.jpg"]
    assert mlflow_access.test_predictions(client, good, ["object_key", "label_index"]) is None
    assert "lacks the column(s) label_index" in caplog.text  # not a KeyError in promotion

    # The tracking server answers, its artifact store does not: MLflow's artifact routes fail.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with _proxy(mlflow_server, failing="/api/2.0/mlflow-artifacts/") as (proxy, failed):
        caplog.clear()
        assert described_by(MlflowClient(proxy), good) == (None, "", None)
    warned = [r.getMessage() for r in caplog.records]
    assert sum("download and the run's listing failed" in line for line in warned) == 3, warned
    assert any("?path=" in hit for hit in failed), failed  # the listing was asked


def test_refused_credentials_stop_a_training_run_with_what_to_set(
    failing_server: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A tracking server that refuses the credentials (401) names the user and the variables
    to set; one that answers another error still says it refused to start the run."""
    from ml.tracking import start_run
    from tests.helpers import small_config

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    cfg = small_config("s3://bucket/split.parquet", tmp_path)
    for answer, message in [
        ((401, b"You are not authenticated"), "refused the credentials of MLflow user trainer"),
        ((500, b"database is locked"), "refused to start the run"),
    ]:
        _Failing.answer = answer
        with pytest.raises(PipelineError, match=message), start_run(cfg, None):
            pass
    assert "/api/2.0/mlflow/runs/create" not in failing_server  # stopped at the experiment
