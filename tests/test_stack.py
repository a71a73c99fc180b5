"""The README's main command itself: start the stack, one DAG run to success, stop, nothing left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from devkit.servers import free_port
from tests.conftest import REPO


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
@pytest.mark.slow
def test_main_command_runs_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {
        name: free_port()
        for name in ("AIRFLOW", "MLFLOW", "S3", "IMAGES", "WORKER_LOG", "TRIGGER_LOG")
    }
    env = {
        **os.environ,
        "STACK_DIR": str(tmp_path / "stack"),
        **{f"STACK_{k}_PORT": str(v) for k, v in ports.items()},
    }
    for key in ("AIRFLOW_HOME", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "ML_STORE"):
        env.pop(key, None)  # the stack sets its own; nothing leaks in from the test session
    try:
        demo = subprocess.run(
            ["bash", "scripts/demo", "--sample", "60", "--epochs", "1"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        summary = json.loads(demo.stdout.strip().splitlines()[-1])
        first, second = summary["runs"]
        assert first["downloads"]["ok"] >= 50
        assert "champion" in first["model"]["aliases"]
        # The retrain is judged against the champion on the same images, and the demo says so.
        comparison = second["model"]["promotion"]["comparison"]
        assert second["model"]["promotion"]["champion_version"] == first["model"]["version"]
        assert comparison["images"] >= 3 and comparison["low"] <= comparison["high"]
        assert f"vs champion v{first['model']['version']}" in demo.stdout
        assert "interval" in demo.stdout and "paired resamples" in demo.stdout
        assert "SYNTHETIC" in demo.stdout and "bash scripts/stop" in demo.stdout
        # The new model version is an asset event: the batch-inference DAG ran on it.
        assert summary["inference"]["predicted"] >= 15, summary["inference"]
        marker = json.loads((tmp_path / "stack" / "state.json").read_text())["marker"]
        _the_readme_serve_command_answers(env, tmp_path)
        # Nothing listens wider than it must: every socket of every service is on loopback.
        status = subprocess.run(
            [str(REPO / ".venv" / "bin" / "python"), "scripts/stack.py", "status"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        listening = [
            line.split(" on ", 1)[1]
            for line in status.stdout.splitlines()
            if line.startswith("listening:")
        ]
        assert len(listening) >= 4, status.stdout
        for address in listening:
            host = address.rsplit(":", 1)[0]
            assert host in ("127.0.0.1", "::1"), f"a stack service listens on {address}"
        for port in (ports["AIRFLOW"], ports["MLFLOW"], ports["S3"], ports["IMAGES"]):
            assert f"127.0.0.1:{port}" in listening
    finally:
        stop = subprocess.run(
            ["bash", "scripts/stop"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "nothing left running" in stop.stdout
    needle = f"STACK_MARKER={marker}".encode()
    survivors = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    survivors.append(entry.name)
            except OSError:
                continue
    assert survivors == []
    assert not any(_listening(port) for port in ports.values())
    assert not (tmp_path / "stack").exists()


def _the_readme_serve_command_answers(env: dict[str, str], tmp_path: Path) -> None:
    """The README's serve command, from a shell with neither the venv on PATH nor any MLflow
    setting: it serves the demo's champion and answers a JPEG with a label, leaving no
    mlflow.db behind."""
    import base64
    import io
    import urllib.request

    from PIL import Image

    from devkit.servers import wait_http

    port = free_port()
    fresh = {k: v for k, v in env.items() if k.startswith("STACK_")}
    fresh |= {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    before = sorted(p.name for p in REPO.iterdir())
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [".venv/bin/python", "scripts/stack.py", "serve", "--port", str(port)],
            cwd=REPO,
            env=fresh,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 240, process=server)
        picture = io.BytesIO()
        Image.new("RGB", (90, 60), (200, 40, 40)).save(picture, "JPEG")
        row = [base64.b64encode(picture.getvalue()).decode()]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [row]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            (answer,) = json.loads(response.read())["predictions"]
    except BaseException:
        print((tmp_path / "serve.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert answer["status"] == "ok" and answer["label"], answer
    assert sorted(p.name for p in REPO.iterdir()) == before  # no mlflow.db, no mlruns
