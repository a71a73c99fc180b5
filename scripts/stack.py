"""The whole pipeline on this machine, no Docker: a local S3 endpoint (moto), an MLflow server
(SQLite registry, artifacts in S3), the image server standing in for Flickr (synthetic images)
and Airflow (SQLite, LocalExecutor: API server, scheduler, DAG processor, triggerer, as
`airflow standalone` would run them), each in its own process group. Every service listens on
127.0.0.1 only.

    python scripts/stack.py demo [--sample N] [--epochs N]   # up, one DAG run, summary
    python scripts/stack.py up | status | down
    python scripts/stack.py serve [--port 5001]   # the champion over HTTP (python -m ml serve)
    python scripts/stack.py up --topology celery   # docker-compose.yaml's topology, natively
    python scripts/stack.py restart airflow-worker --kill   # a worker killed and started again
    python scripts/stack.py stop redis; python scripts/stack.py start redis   # one service

``demo`` leaves the stack up for browsing; ``down`` stops every process it started (by process
group, then by a marker in their environment, so nothing is orphaned) and deletes its state
(the S3 endpoint keeps data in memory, so a stopped stack's data is gone anyway).
Ports: STACK_AIRFLOW_PORT (8080), STACK_MLFLOW_PORT (5000), STACK_S3_PORT (9000),
STACK_IMAGES_PORT (8000); state folder: STACK_DIR (.run/stack).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # the latter when loaded by a test

from init_env import write_private  # noqa: E402

from devkit.servers import mlflow_command  # noqa: E402
from devkit.servers import wait_http as wait_for  # noqa: E402

VENV_BIN = Path(sys.executable).parent
STATE = Path(os.environ.get("STACK_DIR", REPO / ".run" / "stack")).resolve()
PORTS = {
    "airflow": int(os.environ.get("STACK_AIRFLOW_PORT", "8080")),
    "mlflow": int(os.environ.get("STACK_MLFLOW_PORT", "5000")),
    "s3": int(os.environ.get("STACK_S3_PORT", "9000")),
    "images": int(os.environ.get("STACK_IMAGES_PORT", "8000")),
    "worker_logs": int(os.environ.get("STACK_WORKER_LOG_PORT", "8793")),
    "trigger_logs": int(os.environ.get("STACK_TRIGGER_LOG_PORT", "8794")),
    # the Celery topology's own (docker-compose.yaml run natively)
    "postgres": int(os.environ.get("STACK_POSTGRES_PORT", "5432")),
    "redis": int(os.environ.get("STACK_REDIS_PORT", "6379")),
    "scheduler_health": int(os.environ.get("STACK_SCHEDULER_HEALTH_PORT", "8974")),
}
#: The ports each topology listens on.
TOPOLOGY_PORTS = {
    "local": ("airflow", "mlflow", "s3", "images", "worker_logs", "trigger_logs"),
    "celery": ("airflow", "mlflow", "s3", "images", "postgres", "redis", "scheduler_health"),
}
BUCKET = "pipeline"
DAG_ID = "image_sentiment"
DEMO_CSV = f"s3://{BUCKET}/input/sample.csv"
SCORE_CSV = f"s3://{BUCKET}/input/score.csv"
INFERENCE_DAG_ID = "image_sentiment_batch_inference"
#: The embedded defaults of the demo run: small and CPU-sized, with a real DAG run end to end.
#: The demo's run: the staged CSV as it is (its sample is made when it is staged), a larger
#: test split than the default so that the promotion compares on 40 images, not 10.
DEMO_CONF = {
    "csv": DEMO_CSV,
    "sample": 0,
    "ratios": "0.6,0.2,0.2",
    "epochs": 16,
    "batch_size": 16,
    "image_size": 64,
    "weights": "none",
    "device": "cpu",
    "workers": 0,
    "learning_rate": 0.03,
    "max_side": 128,
    "download_batch_size": 50,
    "patience": 0,
}


def say(message: str) -> None:
    print(message, flush=True)


def url(name: str, path: str = "") -> str:
    return f"http://127.0.0.1:{PORTS[name]}{path}"


def environment(marker: str) -> dict[str, str]:
    """What every service (and so every Airflow task) sees."""
    home = STATE / "airflow"
    return {
        **os.environ,
        "STACK_MARKER": marker,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "AWS_ENDPOINT_URL": url("s3"),
        "AWS_ACCESS_KEY_ID": "stack",
        "AWS_SECRET_ACCESS_KEY": "stack-local-only",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": url("mlflow"),
        "MLFLOW_UI_URL": f"http://localhost:{PORTS['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": url("s3"),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "ML_STORE": f"s3://{BUCKET}/store",
        "ML_ALLOW_NETWORKS": "127.0.0.0/8",
        "ML_CSV": DEMO_CSV,
        "ML_SCHEDULE": "none",
        "ML_DOWNLOAD_PARALLELISM": "2",
        "ML_ARCH": "resnet18",  # the demo shows the pipeline on a CPU, not ResNet-152's accuracy
        "ML_INFERENCE_CSV": SCORE_CSV,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(PORTS["airflow"]),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{PORTS['airflow']}"
        "/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(PORTS["worker_logs"]),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(PORTS["trigger_logs"]),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
    }


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def wait_http(target: str, name: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    try:
        wait_for(target, timeout, process, accept=lambda status: status < 500)
    except RuntimeError as exc:
        log = STATE / "logs" / f"{name}.log"
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        raise SystemExit(f"error: {name}: {exc}; its log ends:\n{tail}") from None


_TOKEN: dict[str, str] = {}


def _headers() -> dict[str, str]:
    """JSON, and a bearer token where the API needs one (the Celery topology signs in as
    compose's admin; the local stack's API lets everyone in)."""
    headers = {"Content-Type": "application/json"}
    if load_state().get("topology") != "celery":
        return headers
    if "token" not in _TOKEN:
        env = client_environment()
        credentials = {
            "username": env["AIRFLOW_ADMIN_USER"],
            "password": env["AIRFLOW_ADMIN_PASSWORD"],
        }
        request = urllib.request.Request(
            url("airflow", "/auth/token"),
            data=json.dumps(credentials).encode(),
            method="POST",
            headers=headers,
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            _TOKEN["token"] = json.loads(response.read())["access_token"]
    return {**headers, "Authorization": f"Bearer {_TOKEN['token']}"}


def api(method: str, path: str, body: Any | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url("airflow", "/api/v2" + path), data=data, method=method, headers=_headers()
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def _save_state(state: dict[str, Any]) -> None:
    (STATE / "state.json").write_text(json.dumps(state, indent=2))


def _spawn(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Service ``name`` in its own process group, its output appended to its log."""
    with (STATE / "logs" / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def load_state() -> dict[str, Any]:
    path = STATE / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def up(topology: str = "local") -> dict[str, Any]:
    state = load_state()
    running = state.get("services") and all(_alive(s["pid"]) for s in state["services"].values())
    if running and state.get("topology", "local") == topology:
        say(f"the stack is already up (state in {STATE})")
        return state
    if state:
        down(quiet=True)
    busy = [
        f"{name} ({PORTS[name]})" for name in TOPOLOGY_PORTS[topology] if not port_free(PORTS[name])
    ]
    if busy:
        raise SystemExit(
            f"error: ports in use: {', '.join(busy)}; stop what uses them or set "
            "STACK_*_PORT (see scripts/stack.py)"
        )
    (STATE / "logs").mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex
    if topology == "celery":
        return up_celery(marker)
    env = environment(marker)
    state = {"marker": marker, "services": {}, "ports": PORTS, "topology": "local"}
    python = str(VENV_BIN / "python")
    airflow = str(VENV_BIN / "airflow")
    services: list[tuple[str, list[str], str | None, float]] = [
        (
            "s3",
            [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(PORTS["s3"])],
            url("s3", "/"),
            60,
        ),
        (
            "images",
            [python, "-m", "devkit", "-q", "imageserver", "--port", str(PORTS["images"])],
            url("images", "/health.jpg"),
            60,
        ),
        (
            "mlflow",
            mlflow_command(
                f"sqlite:///{STATE / 'mlflow.db'}", f"s3://{BUCKET}/mlflow", PORTS["mlflow"]
            ),
            url("mlflow", "/health"),
            120,
        ),
        # Airflow's components one by one (what `airflow standalone` runs), so that each can be
        # told to listen on loopback only: the scheduler's and triggerer's log servers would
        # bind every interface, and task logs are local files here anyway.
        ("airflow", [airflow, "api-server"], url("airflow", "/api/v2/monitor/health"), 180),
        ("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], None, 0),
        ("airflow-dag-processor", [airflow, "dag-processor"], None, 0),
        ("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], None, 0),
    ]
    try:
        for name, command, health, timeout in services:
            if name == "airflow":
                say("migrating the Airflow database ...")
                with (STATE / "logs" / "airflow-db.log").open("ab") as log:
                    subprocess.run(
                        [airflow, "db", "migrate"],
                        env=env,
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        check=True,
                    )
            say(f"starting {name} ...")
            process = _spawn(name, command, env)
            state["services"][name] = {"pid": process.pid, "port": PORTS.get(name)}
            _save_state(state)
            if name == "mlflow":
                _create_bucket(env)
            if health:
                wait_http(health, name, timeout, process)
        _wait_airflow_ready()
        api(
            "POST",
            "/pools",
            {"name": "gpu", "slots": 1, "description": "one training job at a time"},
        )
    except BaseException:
        down(quiet=True)
        raise
    say(
        f"stack up: Airflow {url('airflow')} · MLflow {url('mlflow')} · S3 {url('s3')} · "
        f"images {url('images')}"
    )
    return state


def up_celery(marker: str) -> dict[str, Any]:
    """docker-compose.yaml's topology on this machine (devkit.topology): Postgres, Redis,
    MLflow on Postgres, Airflow with CeleryExecutor and two workers (queues default and gpu)."""
    from devkit.topology import celery_plan

    extra = {
        "ML_SCHEDULE": "none",
        "ML_ALLOW_NETWORKS": "127.0.0.0/8",
        "ML_CSV": DEMO_CSV,
        "ML_INPUT_ROOTS": f"s3://{BUCKET}/input s3://{BUCKET}/pipeline",
        "ML_INFERENCE_CSV": SCORE_CSV,
    }
    plan = celery_plan(STATE, PORTS, marker, BUCKET, extra)
    client = STATE / "client.json"
    write_private(client, json.dumps(plan.client_env))
    state: dict[str, Any] = {
        "marker": marker,
        "services": {},
        "ports": PORTS,
        "topology": "celery",
        "cleanup": [str(p) for p in plan.cleanup],
    }
    _save_state(state)
    try:
        for step in plan.steps:
            say(f"{'running' if step.once else 'starting'} {step.name} ...")
            if step.before:
                step.before()
            process = _spawn(step.name, step.command, step.env)
            if step.once:
                if process.wait(timeout=step.timeout) != 0:
                    tail = (STATE / "logs" / f"{step.name}.log").read_text(errors="replace")
                    raise SystemExit(f"error: {step.name} failed; its log ends:\n{tail[-3000:]}")
                continue
            state["services"][step.name] = {"pid": process.pid}
            _save_spec(step.name, step.command, step.env)
            _save_state(state)
            if step.health:
                wait_http(step.health, step.name, step.timeout, process)
            if step.after:
                step.after()
        _wait_airflow_ready()
    except BaseException:
        down(quiet=True)
        raise
    say(
        f"celery topology up: Airflow {url('airflow')} (admin, password in {STATE / '.env'}) · "
        f"MLflow {url('mlflow')} · Postgres 127.0.0.1:{PORTS['postgres']} · Redis "
        f"127.0.0.1:{PORTS['redis']} · S3 {url('s3')} · images {url('images')}"
    )
    return state


def _save_spec(name: str, command: list[str], env: dict[str, str]) -> None:
    """How a service was started (its environment holds secrets: owner-only), for restarts."""
    folder = STATE / "services"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{name}.json"
    write_private(path, json.dumps({"command": command, "env": env}))


def _service(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    state = load_state()
    service = state.get("services", {}).get(name)
    if service is None:
        raise SystemExit(f"error: no service {name!r} in this stack")
    return state, service


def stop(name: str, *, kill: bool = False, grace: float = 30.0) -> None:
    """Stop service ``name`` and everything it started, task processes in groups of their own
    included: SIGTERM and ``grace`` seconds, as ``docker compose stop`` gives, then SIGKILL;
    with ``kill``, SIGKILL at once, as a machine failure or a container's cgroup would."""
    _, service = _service(name)
    doomed = started_by([service["pid"]])
    if not kill:
        _signal(doomed, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and started_by(doomed):
            time.sleep(0.2)
    left = kill_everything(doomed)
    if left:
        raise SystemExit(f"error: {name}'s processes {left} survived SIGKILL")


def start(name: str) -> int:
    """Start service ``name`` again as it was first started (it must be stopped); its pid."""
    state, service = _service(name)
    if started_by([service["pid"]]):
        raise SystemExit(f"error: {name} is running (pid {service['pid']}): stop it first")
    spec = json.loads((STATE / "services" / f"{name}.json").read_text())
    process = _spawn(name, spec["command"], spec["env"])
    state["services"][name]["pid"] = process.pid
    _save_state(state)
    return process.pid


def restart(name: str, *, kill: bool = False) -> int:
    """``stop`` (with ``kill``: SIGKILL everything it started at once), then ``start``."""
    stop(name, kill=kill)
    return start(name)


def one_service(verb: str, name: str, *, kill: bool) -> int:
    """``stack.py stop|start|restart NAME``."""
    if verb == "stop":
        stop(name, kill=kill)
        say(f"{name} stopped")
        return 0
    pid = start(name) if verb == "start" else restart(name, kill=kill)
    say(f"{name} started again: pid {pid}")
    return 0


def serve(port: int, model: str | None) -> int:
    """``python -m ml serve`` with the running stack's MLflow and S3, until Ctrl-C (it carries
    the stack's marker, so ``down`` stops it too)."""
    if not load_state():
        raise SystemExit("error: the stack is not running: start it with bash scripts/demo")
    env = {**client_environment(), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "ml", "serve", "--port", str(port)]
    command += ["--model", model] if model else []
    with contextlib.suppress(KeyboardInterrupt):
        return subprocess.run(command, env=env, check=False).returncode
    return 130


def client_environment() -> dict[str, str]:
    """What a client of the running stack needs (endpoints and credentials)."""
    state = load_state()
    if state.get("topology") == "celery":
        loaded: dict[str, str] = json.loads((STATE / "client.json").read_text())
        return {**os.environ, **loaded}
    return environment(state.get("marker", ""))


def _create_bucket(env: dict[str, str]) -> None:
    try:
        wait_for(url("s3", "/"), 60, accept=lambda status: True)
    except RuntimeError:
        raise SystemExit("error: the local S3 endpoint did not start") from None
    with _stack_environment(env):
        from ml.storage import ObjectStore

        ObjectStore().ensure_bucket(BUCKET)


@contextlib.contextmanager
def _stack_environment(env: dict[str, str]) -> Iterator[None]:
    """This process talks to the stack's services (its S3 endpoint) while inside."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _wait_airflow_ready(timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            health = api("GET", "/monitor/health")
            dags = api("GET", "/dags").get("dags", [])
            parts = ("metadatabase", "scheduler", "dag_processor")
            if all(health.get(p, {}).get("status") == "healthy" for p in parts) and any(
                d["dag_id"] == DAG_ID for d in dags
            ):
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(1)
    raise SystemExit(
        "error: Airflow did not become healthy or did not parse the DAG; see "
        f"{STATE / 'logs' / 'airflow.log'}"
    )


def prepare_demo_csv(sample_source: str | None, real: bool = False, rows: int = 200) -> None:
    """Stage the demo's CSV: ``rows`` rows of the source (stratified), pointed at the image
    server, with a few faulty rows and near-duplicate copies; or (``real``) the CSV as it is."""
    from devkit.demo import source_csv, stage_demo_inputs
    from ml.errors import PipelineError
    from ml.storage import ObjectStore, S3Uri

    with _stack_environment(client_environment()):
        try:
            if real:  # the CSV as it is: its images come from their real hosts
                ObjectStore().put_bytes(
                    S3Uri.parse(DEMO_CSV), source_csv(sample_source), content_type="text/csv"
                )
            else:
                stage_demo_inputs(url("images"), DEMO_CSV, SCORE_CSV, sample_source, rows=rows)
        except PipelineError as exc:
            raise SystemExit(f"error: {exc}") from None


def trigger(conf: dict[str, Any]) -> str:
    api("PATCH", f"/dags/{INFERENCE_DAG_ID}", {"is_paused": False})  # runs on the new model
    api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
    run = api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
    return str(run["dag_run_id"])


def _tasks(run_id: str) -> list[dict[str, Any]]:
    quoted = urllib.parse.quote(run_id, safe="")
    items: list[dict[str, Any]] = api(
        "GET", f"/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances?limit=1000"
    )["task_instances"]
    return items


def wait(run_id: str, timeout: float) -> str:
    """The run's final state, printing a progress line whenever it changes; "timeout" when
    it is still going after ``timeout`` seconds."""
    quoted = urllib.parse.quote(run_id, safe="")
    started = time.monotonic()
    shown = ""
    while time.monotonic() - started < timeout:
        state = api("GET", f"/dags/{DAG_ID}/dagRuns/{quoted}")["state"]
        line = _progress(_tasks(run_id), run_id)
        if line != shown:
            say(f"[{time.monotonic() - started:5.0f}s] {line}")
            shown = line
        if state in ("success", "failed"):
            return str(state)
        time.sleep(3)
    return "timeout"


#: The DAG's tasks in the order they run.
TASK_ORDER = (
    "preflight",
    "ingest",
    "plan_batches",
    "download_batch",
    "collect_manifest",
    "split",
    "changes",
    "train",
    "register",
)
MARKS = {
    "skipped": "skipped",
    "success": "done",
    "running": "running",
    "failed": "FAILED",
    "up_for_retry": "retrying",
    "up_for_reschedule": "waiting",
    "queued": "queued",
    "scheduled": "queued",
    "deferred": "deferred",
    "upstream_failed": "not run",
}


def _progress(tasks: list[dict[str, Any]], run_id: str = "") -> str:
    """Every task's state on one line; a running ``train`` says its epoch and step."""
    parts = []
    for name in TASK_ORDER:
        mine = [t for t in tasks if t["task_id"] == name]
        states = [t["state"] for t in mine]
        if name == "download_batch" and len(mine) > 1:
            parts.append(f"{name} {states.count('success')}/{len(mine)}")
            continue
        mark = MARKS.get(states[0] or "", "waiting") if states else "-"
        if name == "train" and mark == "running" and run_id:
            mark = _training_progress(run_id) or mark
        parts.append(f"{name} {mark}")
    return " | ".join(parts)


def _training_progress(run_id: str) -> str:
    """Where the DAG run's training is (its MLflow run's progress tag), or ""."""
    from ml.params import PARAMETERS
    from ml.tracking import PROGRESS_TAG

    try:
        with _stack_environment(client_environment()):
            from mlflow import MlflowClient

            client = MlflowClient()
            experiment = client.get_experiment_by_name(PARAMETERS["experiment"].default)
            if experiment is None:
                return ""
            runs = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.orchestrator_run_id = '{run_id}'",
                max_results=1,
            )
    except Exception:  # progress is a courtesy: the line then says "running"
        return ""
    tags = runs[0].data.tags if runs else {}
    return f"({tags[PROGRESS_TAG]})" if PROGRESS_TAG in tags else ""


def xcom(run_id: str, task_id: str, dag_id: str = DAG_ID) -> Any:
    """The return value of a finished task."""
    quoted = urllib.parse.quote(run_id, safe="")
    entry = api(
        "GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/return_value"
    )
    value = entry.get("value")
    return json.loads(value) if isinstance(value, str) else value


def demo(args: argparse.Namespace) -> int:
    up(args.topology)
    epochs = 1 if args.retrain else int(args.epochs)
    conf = {**DEMO_CONF, "epochs": epochs}
    if args.real:
        say("using the CSV as it is: images are fetched from their real hosts (needs internet)")
        conf["sample"] = args.sample
    else:
        say(
            f"staging a {args.sample}-row sample of the CrowdFlower CSV pointed at the local "
            "image server (its images are SYNTHETIC: a colour per label on noise, not the real "
            "photos; a few URLs are faulty and a few pictures copied, on purpose) ..."
        )
    prepare_demo_csv(args.csv, args.real, args.sample)
    arch = client_environment().get("ML_ARCH", "resnet152")
    note = f"{arch}, {epochs} CPU epoch{'s' if epochs > 1 else ''}"
    first = run_and_report(conf, args.timeout, f"synthetic images, {note}")
    if first is None:
        return 1
    runs = [first]
    if args.retrain:
        say(
            f"\nretraining with a better setting ({args.epochs} epochs instead of 1), as an "
            "experiment would; the registry scores the champion on the new version's test "
            "images and promotes only a gain beyond noise ..."
        )
        second = run_and_report(
            {**conf, "epochs": args.epochs}, args.timeout, f"{arch}, {args.epochs} CPU epochs"
        )
        if second is None:
            return 1
        runs.append(second)
    scored = wait_inference(120)
    if scored:
        say(
            f"  inference  : {INFERENCE_DAG_ID} scored {scored.get('predicted', 0)} images with "
            f"the champion -> {scored.get('predictions')}"
        )
    say("The stack stays up for browsing. Stop it with: bash scripts/stop")
    print(json.dumps({"runs": runs, "inference": scored}), flush=True)
    return 0


def run_and_report(conf: dict[str, Any], timeout: float, note: str) -> dict[str, Any] | None:
    """Trigger one run, wait, and print what it did; None when it did not succeed."""
    run_id = trigger(conf)
    say(f"triggered {DAG_ID} run {run_id}; waiting (Ctrl-C stops waiting, not the stack) ...")
    result = wait(run_id, timeout)
    run_link = f"http://localhost:{PORTS['airflow']}/dags/{DAG_ID}/runs/" + urllib.parse.quote(
        run_id, safe=""
    )
    if result == "timeout":
        say(
            f"\nthe run is still going after {timeout:.0f} s (the demo stopped waiting, not the "
            f"run): follow it at {run_link}, or wait longer next time with --timeout SECONDS; "
            "the stack stays up (stop it with: bash scripts/stop)"
        )
        return None
    if result != "success":
        failed = [t["task_id"] for t in _tasks(run_id) if t["state"] == "failed"]
        say(
            f"\nthe run ended {result}{' in ' + ', '.join(failed) if failed else ''}; logs: "
            f"{run_link} (stack left up; stop it with: bash scripts/stop)"
        )
        return None
    manifest = xcom(run_id, "collect_manifest")
    split = xcom(run_id, "split")
    say("\nrun succeeded")
    say(f"  Airflow UI : {run_link}")
    say(f"  downloads  : {manifest['statuses']}")
    say(
        f"  split      : {split['groups']} groups; {split['near_duplicate_groups']} "
        f"near-duplicate groups of {split['near_duplicate_images']} images kept in one split"
    )
    states = {t["task_id"]: t["state"] for t in _tasks(run_id)}
    summary: dict[str, Any] = {
        "dag_run_id": run_id,
        "downloads": manifest["statuses"],
        "near_duplicate_groups": split["near_duplicate_groups"],
    }
    if states.get("register") != "success":
        say(
            "  model      : nothing new to train: the data and settings equal the champion's "
            "(the trigger form's force_retrain trains anyway)"
        )
        return {**summary, "model": None}
    registered = xcom(run_id, "register")
    metrics = registered.get("metrics", {})
    say(
        f"  MLflow UI  : http://localhost:{PORTS['mlflow']}/#/models/{registered['model']}"
        f"/versions/{registered['version']}"
    )
    say(
        f"  model      : {registered['model']} version {registered['version']}, aliases "
        f"{', '.join(registered['aliases'])}"
    )
    say(
        f"  test       : accuracy {metrics.get('test_accuracy', 0):.3f}, macro-F1 "
        f"{metrics.get('test_macro_f1', 0):.3f} on its own test split ({note})"
    )
    say(f"  promotion  : {describe_promotion(registered['promotion'])}")
    return {**summary, "model": registered}


def describe_promotion(promotion: dict[str, Any]) -> str:
    """One line: the decision, both scores on the same images, and the interval."""
    verdict = "promoted to champion" if promotion["promoted"] else "stays challenger"
    c = promotion.get("comparison")
    if not c:
        return f"{verdict}: {promotion['reason']}"
    return (
        f"{verdict}: macro-F1 {c['new_score']:.3f} vs champion "
        f"v{promotion['champion_version']} {c['champion_score']:.3f} on the same {c['images']} "
        f"test images, gain {c['gain']:+.3f}, {c['confidence']:.0%} interval "
        f"{c['low']:+.3f} to {c['high']:+.3f} ({c['resamples']} paired resamples)"
    )


def wait_inference(timeout: float) -> dict[str, Any] | None:
    """The newest batch-inference run that scored, once none is waiting or running (a run
    triggered by a version that stayed challenger is skipped: nothing new to score)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api("GET", f"/dags/{INFERENCE_DAG_ID}/dagRuns").get("dag_runs", [])
        if runs and all(r["state"] in ("success", "failed") for r in runs):
            for run in sorted(runs, key=lambda r: str(r.get("run_after")), reverse=True):
                try:
                    result = xcom(run["dag_run_id"], "predict", INFERENCE_DAG_ID)
                except urllib.error.HTTPError:  # skipped: no result
                    continue
                if result:
                    return dict(result)
            return None
        time.sleep(3)
    say(f"  inference  : {INFERENCE_DAG_ID} had not finished after {timeout:.0f}s; see the UI")
    return None


def _alive(pid: int, *, group: bool = False) -> bool:
    """Whether the process (or, with ``group``, any process of the group) still exists."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries this stack's marker (any process group)."""
    found = []
    needle = f"STACK_MARKER={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _processes() -> dict[int, tuple[str, int, int, int]]:
    """pid: (state, parent, process group, session) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def started_by(services: list[int], marker: str = "") -> list[int]:
    """Every living process the services (their pids) started: in their sessions or process
    groups (a task orphaned by a killed worker keeps its session when it moves to another
    parent, and Airflow gives each task a process group of its own), below them in the process
    tree (one that started a session of its own), or carrying the stack's marker."""
    table = _processes()
    roots = set(services)
    found = {pid for pid, (_, _, group, session) in table.items() if {group, session} & roots}
    found |= roots & set(table)
    if marker:
        found |= set(_marked(marker))
    children: dict[int, list[int]] = {}
    for pid, (_, parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return sorted(pid for pid in found if table.get(pid, ("Z",))[0] != "Z")


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def kill_everything(services: list[int], marker: str = "", wait: float = 30.0) -> list[int]:
    """SIGKILL everything the services started, at once, as a machine failure would: first
    frozen (SIGSTOP, so that nothing forks or writes while the tree is walked), then killed.
    Returns what is still alive after ``wait`` seconds (nothing, normally)."""
    frozen: set[int] = set()
    for _ in range(10):
        found = set(started_by(services, marker)) - frozen
        if not found:
            break
        _signal(sorted(found), signal.SIGSTOP)
        frozen |= found
    _signal(sorted(frozen), signal.SIGKILL)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        left = started_by(services, marker)
        if not left:
            return []
        _signal(left, signal.SIGKILL)
        time.sleep(0.2)
    return started_by(services, marker)


def down(quiet: bool = False) -> int:
    state = load_state()
    if not state:
        if not quiet:
            say("nothing to stop")
        return 0
    services = [s["pid"] for s in state.get("services", {}).values()]
    marker = state["marker"]
    _signal(started_by(services, marker), signal.SIGTERM)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and started_by(services, marker):
        time.sleep(0.3)
    left = kill_everything(services, marker, wait=10.0) if started_by(services, marker) else []
    if left:
        say(f"error: processes still running: {left}")
        return 1
    for folder in state.get("cleanup", []):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(STATE, ignore_errors=True)
    if not quiet:
        say("stack stopped; nothing left running")
    return 0


def listeners(state: dict[str, Any]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of the stack's processes."""
    sockets: dict[str, tuple[str, int]] = {}
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                host, port = fields[1].split(":")
                sockets[fields[9]] = (_proc_address(host, family), int(port, 16))
    found = []
    services = [service["pid"] for service in state.get("services", {}).values()]
    for pid in started_by(services, state["marker"]):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                inode = target[len("socket:[") : -1] if target.startswith("socket:[") else ""
                if inode in sockets:
                    found.append((pid, *sockets[inode]))
    return sorted(set(found))


def _proc_address(hexed: str, family: int) -> str:
    """An address as /proc/net/tcp* writes it (little-endian 32-bit words) in text."""
    import ipaddress

    raw = bytes.fromhex(hexed)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.IPv4Address(words) if family == 4 else ipaddress.IPv6Address(words))


def status() -> int:
    state = load_state()
    if not state:
        say("the stack is not running")
        return 1
    down = []
    for name, service in state["services"].items():
        up = _alive(service["pid"])
        down += [] if up else [name]
        say(f"{name:22s} pid {service['pid']:7d} {'up' if up else 'DOWN'}")
    if down:  # compose's "restart: always" has no native counterpart
        say(f"nothing restarts a dead service here: scripts/stack.py start {down[0]}")
    for pid, address, port in listeners(state):
        say(f"listening: pid {pid} on {address}:{port}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="start the stack, run the DAG once, print the result")
    d.add_argument("--sample", type=int, default=200, help="rows of the CSV (default: 200)")
    d.add_argument(
        "--epochs",
        type=int,
        default=DEMO_CONF["epochs"],
        help="epochs of the retrain (the first run trains 1) (default: %(default)s)",
    )
    d.add_argument(
        "--retrain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a quick first model, then a retrain with --epochs, to show the promotion decision",
    )
    d.add_argument("--csv", default=None, help="CSV to sample (default: the CrowdFlower file)")
    d.add_argument("--topology", choices=("local", "celery"), default="local", help="see up")
    d.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds to wait for each run; the run goes on after (default: %(default)s)",
    )
    d.add_argument(
        "--real",
        action="store_true",
        help="keep the CSV's own image URLs (a "
        "machine with internet); with --sample 0 it is the whole real dataset",
    )
    u = commands.add_parser("up", help="start the stack")
    u.add_argument(
        "--topology",
        choices=("local", "celery"),
        default="local",
        help="local: SQLite and LocalExecutor; celery: docker-compose.yaml's topology run "
        "natively (Postgres, Redis, CeleryExecutor, a default and a gpu worker)",
    )
    commands.add_parser("down", help="stop everything the stack started")
    for verb, text in (
        ("stop", "stop one service and all it started (SIGTERM, 30 s, SIGKILL)"),
        ("restart", "stop one service, then start it again"),
        ("start", "start a stopped service again"),
    ):
        one = commands.add_parser(verb, help=text)
        one.add_argument("service")
        if verb != "start":
            one.add_argument("--kill", action="store_true", help="SIGKILL at once (a crash)")
    commands.add_parser("status", help="show the stack's processes")
    v = commands.add_parser("serve", help="serve the stack's champion model over HTTP")
    v.add_argument("--port", type=int, default=5001)
    v.add_argument("--model", default=None, help="default: models:/image-sentiment@champion")
    args = parser.parse_args()
    if args.command == "demo":
        return demo(args)
    if args.command == "up":
        up(args.topology)
        return 0
    if args.command == "down":
        return down()
    if args.command == "serve":
        return serve(args.port, args.model)
    if args.command in ("stop", "start", "restart"):
        return one_service(args.command, args.service, kill=getattr(args, "kill", False))
    return status()


if __name__ == "__main__":
    raise SystemExit(main())
