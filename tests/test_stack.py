"""The README's main command itself: start the stack, one DAG run to success, stop, nothing left."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

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
            ["bash", "scripts/demo"],  # as the README writes it
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        summary = json.loads(demo.stdout.strip().splitlines()[-1])
        first = _the_demo_shows_a_decision(summary, demo.stdout)
        marker = json.loads((tmp_path / "stack" / "state.json").read_text())["marker"]
        _the_readme_serve_command_answers(env, tmp_path)
        _the_mlflow_button_is_on_the_task_page(ports, first, tmp_path)
        _the_api_refuses_a_bad_parameter_in_words(ports["AIRFLOW"])
        _a_short_wait_says_the_run_goes_on(env, ports["AIRFLOW"])
        # Nothing listens wider than it must: every socket of every service is on loopback.
        status = subprocess.run(
            ["scripts/stack", "status"],
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
            ["scripts/stack", "serve", "--port", str(port)],
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


def _the_mlflow_button_is_on_the_task_page(
    ports: dict[str, int], first: dict[str, Any], tmp_path: Path
) -> None:
    """The Airflow UI, rendered by headless Chromium, shows the plugin's "MLflow" button on
    the register task's Details tab (Extra Links), pointing at the model version."""
    import shutil
    import urllib.parse
    import urllib.request

    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: run bash scripts/setup-services"
    run = urllib.parse.quote(first["dag_run_id"], safe="")
    page = f"http://localhost:{ports['AIRFLOW']}/dags/image_sentiment/runs/{run}/tasks/register/details"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=30000",
    ]
    done = subprocess.run(
        [chromium, *flags, "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    model = first["model"]
    target = (
        f"http://localhost:{ports['MLFLOW']}/#/models/{model['model']}/versions/{model['version']}"
    )
    # The API the page reads: the task instance's links.
    api = f"http://127.0.0.1:{ports['AIRFLOW']}/api/v2/dags/image_sentiment/dagRuns/{run}"
    with urllib.request.urlopen(f"{api}/taskInstances/register/links", timeout=30) as answer:
        assert json.loads(answer.read())["extra_links"] == {"MLflow": target}
    anchors = re.findall(r"<a [^>]*>[^<]*</a>", done.stdout)
    assert any(f'href="{target}"' in a and ">MLflow</a>" in a for a in anchors), (
        done.returncode,
        anchors[:20],
        done.stderr[-1000:],
    )


def _the_api_refuses_a_bad_parameter_in_words(port: int) -> None:
    """The REST API (the API server, with the form-rules plugin) refuses a bad text
    parameter before making a run, saying the rule in words with an example."""
    import urllib.error
    import urllib.request

    for conf, words in (
        ({"ratios": "eighty,twenty"}, "for example 0.8,0.15,0.05"),
        ({"model_name": "my model"}, "for example image-sentiment"),
    ):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v2/dags/image_sentiment/dagRuns",
            data=json.dumps({"logical_date": None, "conf": conf}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raise AssertionError(f"accepted {conf}: {response.status}")
        except urllib.error.HTTPError as refused:
            detail = json.loads(refused.read())["detail"]
            assert refused.code == 400 and words in detail, (refused.code, detail)
            assert "^" not in detail.splitlines()[0], detail


def _the_demo_shows_a_decision(summary: dict[str, Any], stdout: str) -> dict[str, Any]:
    """What the README promises of the demo; returns its first run."""
    first, second = summary["runs"]
    # Every status the README names, and near-duplicate groups kept in one split.
    statuses = {"ok", "http_error", "undecodable", "not_image", "blocked"}
    assert set(first["downloads"]) == statuses, first["downloads"]
    assert first["downloads"]["ok"] >= 190 and first["near_duplicate_groups"] >= 3
    assert "champion" in first["model"]["aliases"]
    # The retrain is judged against the champion on the same images and wins beyond noise:
    # the demo shows a decision, not a tie, and a model that learned the colours.
    promotion = second["model"]["promotion"]
    comparison = promotion["comparison"]
    assert promotion["champion_version"] == first["model"]["version"]
    assert comparison["images"] >= 30 and promotion["promoted"] and comparison["low"] > 0
    assert second["model"]["metrics"]["test_macro_f1"] >= 0.6
    assert f"vs champion v{first['model']['version']}" in stdout
    assert "interval" in stdout and "paired resamples" in stdout
    assert "SYNTHETIC" in stdout and "bash scripts/stop" in stdout
    assert "(epoch " in stdout and ": step " in stdout  # the training's progress was shown
    # The new champion is an asset event: the batch-inference DAG scored with it.
    assert summary["inference"]["predicted"] >= 15, summary["inference"]
    # The data-quality lines: agreement bands, likely label errors, the batch's drift verdict.
    assert "  agreement  : all_agree macro-F1 " in stdout and "no_majority macro-F1" in stdout
    assert "likely label errors among held-out images" in stdout
    verdict = summary["inference"]["drift"]["verdict"]
    assert verdict.startswith(("drift", "no drift")) and f"  drift      : {verdict}" in stdout
    return dict(first)


def _a_short_wait_says_the_run_goes_on(env: dict[str, str], port: int) -> None:
    """The demo again on the running stack, with a wait too short for its run: it says the
    run is still going, where to follow it, and the flag that waits longer."""
    short = subprocess.run(
        ["bash", "scripts/demo", "--sample", "60", "--no-retrain", "--timeout", "4"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert short.returncode == 1, short.stdout[-2000:] + short.stderr[-2000:]
    told = " ".join(short.stdout.split())
    assert "the stack is already up" in told
    assert "the run is still going after 4 s" in told and "--timeout SECONDS" in told
    assert f"http://localhost:{port}/dags/image_sentiment/runs/manual__" in told
