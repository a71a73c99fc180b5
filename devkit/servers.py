"""Local stand-ins for the deployment's servers, shared by the tests, the demo and the stack
script: a free port, waiting for an HTTP server, an in-memory S3 endpoint (moto), and a real
``mlflow server`` (each in its own process group)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def wait_http(
    url: str,
    timeout: float = 90.0,
    process: subprocess.Popen[bytes] | None = None,
    *,
    accept: Callable[[int], bool] = lambda status: status == 200,
) -> None:
    """Wait until ``url`` answers with a status ``accept`` takes; RuntimeError when the
    server's ``process`` exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if accept(response.status):
                    return
        except urllib.error.HTTPError as exc:
            if accept(exc.code):
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def mlflow_command(backend_store: str, artifacts: str, port: int) -> list[str]:
    """``mlflow server`` on loopback, with the registry in ``backend_store`` and artifacts
    proxied to ``artifacts`` (an s3:// URI); one worker (the machines here have 2 cores)."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_store,
        "--artifacts-destination",
        artifacts,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@contextmanager
def start_mlflow(folder: Path, port: int, s3_endpoint: str, artifacts: str) -> Iterator[str]:
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = mlflow_command(f"sqlite:///{folder / 'mlflow.db'}", artifacts, port)
    with _serving(command, env, folder / "mlflow-server.log", port, "/health") as url:
        yield url


@contextmanager
def serve_model(model_uri: str, folder: Path, port: int, timeout: float = 240.0) -> Iterator[str]:
    """``python -m ml serve`` of ``model_uri`` on loopback, with this environment's MLflow
    settings; yields its address once ``/ping`` answers. Its log is ``folder/serve.log``."""
    command = [sys.executable, "-m", "ml", "serve", "--model", model_uri, "--port", str(port)]
    with _serving(command, dict(os.environ), folder / "serve.log", port, "/ping", timeout) as url:
        yield url


@contextmanager
def _serving(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    port: int,
    health: str,
    timeout: float = 90.0,
) -> Iterator[str]:
    """Run ``command`` in its own process group until the context ends; RuntimeError with
    the end of its log when it does not answer ``health`` in time."""
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(f"{url}{health}", timeout, process=process)
        except RuntimeError as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}; its log ends:\n{tail}") from None
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def local_s3(port: int = 0) -> Iterator[str]:
    """An in-memory S3 endpoint on loopback (moto); sets the AWS_* variables while it runs."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo-secret",  # noqa: S106 - local stand-in
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
