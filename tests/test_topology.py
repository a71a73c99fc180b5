"""docker-compose.yaml's topology, run natively: Postgres, Redis, MLflow on Postgres, Airflow
with CeleryExecutor, a default-queue and a gpu-queue worker (scripts/stack --topology celery).

The compose file is the one source of the native run (devkit.topology), and the first tests
check the two against each other; the last starts the topology on loopback, runs the DAG on it,
and kills the default worker in the middle of a download batch.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from devkit.imageserver import ImageServer
from devkit.servers import free_port
from devkit.stack.demo_run import DEMO_CONF, prepare_demo_csv, wait_inference
from devkit.stack.local import BUCKET, DAG_ID, INFERENCE_DAG_ID, TOPOLOGY_PORTS, LocalStack
from devkit.topology import (
    AIRFLOW_SERVICES,
    BACKING_SERVICES,
    DIFFERENCES,
    NATIVE,
    celery_plan,
    compose_databases,
    interpolate,
    load_compose,
    rewrite_hosts,
)
from ml.labels import LABELS
from tests.helpers import labelled_urls, plain_csv

REPO = Path(__file__).resolve().parent.parent
COMPOSE = load_compose()
PORTS = {
    "airflow": 8080,
    "mlflow": 5000,
    "s3": 9000,
    "images": 8000,
    "postgres": 5432,
    "redis": 6379,
    "scheduler_health": 8974,
}
#: Names the native run adds to compose's environment, each because a container has it some
#: other way (its image's AIRFLOW_HOME and folders, the listening address of its network).
NATIVE_ONLY = {
    "STACK_MARKER",
    "PATH",
    "PYTHONPATH",
    "HOME",
    "LANG",
    "AIRFLOW_HOME",
    "AIRFLOW__CORE__DAGS_FOLDER",
    "AIRFLOW__CORE__PLUGINS_FOLDER",
    "AIRFLOW__API__HOST",
    "AIRFLOW__API__PORT",
    "AIRFLOW__API__WORKERS",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL",
    "STACK_WORKER_ROLE",
    "AIRFLOW__CORE__HOSTNAME_CALLABLE",
    "PGPORT",  # compose's Postgres listens on libpq's default port; the native one on a free one
    *NATIVE,
}


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Any:
    state = tmp_path_factory.mktemp("plan")
    return celery_plan(state, PORTS, "0" * 32, "pipeline", {})


# ------------------------------------------------------- compose and the native run agree


def test_every_compose_service_has_a_native_counterpart(plan: Any) -> None:
    assert set(COMPOSE["services"]) == set(AIRFLOW_SERVICES) | set(BACKING_SERVICES)
    assert {s.name for s in plan.steps} == set(COMPOSE["services"]) - {"postgres", "redis"} | {
        "postgres",
        "redis",
        "images",
    }


def test_every_difference_from_compose_is_listed_with_its_reason(plan: Any) -> None:
    """What the native run sets that compose does not (or otherwise) is in NATIVE or in
    DIFFERENCES, and the README's table shows every DIFFERENCES row."""
    readme = (REPO / "README.md").read_text()
    for what, compose, native, why in DIFFERENCES:
        assert f"| {what} | {compose} | {native} | {why} |" in readme, what
    listed = " ".join(" ".join(row) for row in DIFFERENCES)
    for name in ("AIRFLOW__API__WORKERS", "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL"):
        assert name in listed, name
    worker = next(s for s in plan.steps if s.name == "airflow-worker")
    assert "--skip-serve-logs" in worker.command and "log serving" in listed
    mlflow = next(s for s in plan.steps if s.name == "mlflow")
    assert mlflow.command[mlflow.command.index("--workers") + 1] == "1" and "MLflow" in listed
    # The download parallelism is compose's own (the DAG's max_active_tis_per_dag).
    assert "ML_DOWNLOAD_PARALLELISM" not in " ".join(NATIVE)
    default = COMPOSE["x-pipeline-env"]["ML_DOWNLOAD_PARALLELISM"]
    assert worker.env["ML_DOWNLOAD_PARALLELISM"] == interpolate(default, plan.values)


def test_same_environment_names_executor_broker_and_databases(plan: Any) -> None:
    steps = {s.name: s for s in plan.steps}
    for service in (
        *AIRFLOW_SERVICES,
        "mlflow",
        "airflow-init",
        "store-init",
        "config-check",
        "postgres-databases",
        "mlflow-users",
    ):
        compose_names = set(COMPOSE["services"][service].get("environment") or {})
        native_names = set(steps[service].env)
        assert compose_names <= native_names, service
        assert native_names - compose_names <= NATIVE_ONLY | set(os.environ), service
    worker = steps["airflow-worker"].env
    assert worker["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    postgres = f"127.0.0.1:{PORTS['postgres']}"
    broker = f"redis://:{plan.values['REDIS_PASSWORD']}@127.0.0.1:{PORTS['redis']}/0"
    assert worker["AIRFLOW__CELERY__BROKER_URL"] == broker
    assert worker["AIRFLOW__CELERY__RESULT_BACKEND"] == broker[: -len("/0")] + "/1"
    scheduler = steps["airflow-scheduler"].env
    assert scheduler["AIRFLOW__CELERY__RESULT_BACKEND"] == worker["AIRFLOW__CELERY__RESULT_BACKEND"]
    assert scheduler["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith(f"@{postgres}/airflow")
    # Least privilege: the workers hold neither the database nor the Fernet and JWT secrets.
    for name in ("airflow-worker", "airflow-worker-gpu"):
        held = steps[name].env
        for secret in (
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
            "AIRFLOW__CORE__FERNET_KEY",
            "AIRFLOW__API_AUTH__JWT_SECRET",
        ):
            assert secret not in held, (name, secret)
        assert plan.values["POSTGRES_PASSWORD"] not in " ".join(held.values()), name
        # MLflow: the pipeline's own user (made by the mlflow-users step), never the admin
        assert held["MLFLOW_TRACKING_USERNAME"] == plan.values["MLFLOW_PIPELINE_USER"], name
        assert held["MLFLOW_TRACKING_PASSWORD"] == plan.values["MLFLOW_PIPELINE_PASSWORD"], name
        assert plan.values["MLFLOW_ADMIN_PASSWORD"] not in " ".join(held.values()), name
    databases = steps["postgres-databases"].env
    assert (databases["PGHOST"], databases["PGPORT"]) == ("127.0.0.1", str(PORTS["postgres"]))
    assert steps["mlflow"].env["MLFLOW_BACKEND_STORE_URI"].endswith(f"@{postgres}/mlflow")
    assert compose_databases(COMPOSE) == ["airflow", "mlflow"]  # what the native run creates
    # NATIVE replaces values compose sets, and adds none of its own.
    heartbeat = "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"
    assert steps["airflow-scheduler"].env[heartbeat] == NATIVE[heartbeat][0]
    assert heartbeat not in steps["mlflow"].env


def test_same_queues_concurrency_and_pool(plan: Any) -> None:
    steps = {s.name: s for s in plan.steps}
    for service, queue in (("airflow-worker", "default"), ("airflow-worker-gpu", "gpu")):
        compose_command = COMPOSE["services"][service]["command"]
        native = steps[service].command
        assert native[1 : len(compose_command)] == compose_command[1:]  # same queue, concurrency
        assert compose_command[compose_command.index("--queues") + 1] == queue
    init = " ".join(steps["airflow-init"].command)
    assert 'airflow pools set gpu "${ML_GPU_WORKERS}"' in init  # compose's own script runs
    from dags.image_sentiment import GPU_QUEUE

    assert GPU_QUEUE == "gpu" == COMPOSE["services"]["airflow-worker-gpu"]["command"][4]


def test_the_broker_wants_the_same_password_in_both(plan: Any, tmp_path: Path) -> None:
    """Compose's Redis and the native one both require REDIS_PASSWORD (the native one reads
    it from an owner-only config file, as the generated .env is kept) and persist."""
    redis = COMPOSE["services"]["redis"]
    assert "requirepass $$REDIS_PASSWORD" in redis["command"][-1]
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    for env in (COMPOSE["x-airflow-common"]["environment"], COMPOSE["x-worker-env"]):
        assert re.match(
            r"redis://:\$\{REDIS_PASSWORD:\?[^}]*\}@redis:", env["AIRFLOW__CELERY__BROKER_URL"]
        )
    step = next(s for s in plan.steps if s.name == "redis")
    config = Path(step.command[-1])
    assert f"requirepass {plan.values['REDIS_PASSWORD']}\n" in config.read_text()
    assert config.stat().st_mode & 0o077 == 0
    assert (config.parent.parent / ".env").stat().st_mode & 0o077 == 0
    # Both keep queued tasks across a restart: an append-only file on a volume / in the stack.
    for text in (redis["command"][-1], config.read_text()):
        assert "appendonly yes" in text and "appendfsync everysec" in text
    assert "redis-data:/data" in redis["volumes"] and "dir /data" in redis["command"][-1]


def test_passwords_never_on_a_command_line(plan: Any) -> None:
    secrets = {v for k, v in plan.values.items() if "PASSWORD" in k or "SECRET" in k or "KEY" in k}
    for step in plan.steps:
        text = " ".join(step.command)
        assert not [s for s in secrets if s and s in text], step.name


def test_interpolation_and_host_rewriting_follow_compose_rules() -> None:
    values = {"A": "x", "EMPTY": ""}
    assert interpolate("${A}-${EMPTY:-d}-${EMPTY-d}-${MISSING-d}-$${A}", values) == "x-d--d-${A}"
    assert interpolate("${MISSING:-${A:-y}}-${A:?set A}", values) == "x-x"
    for text in ("${EMPTY:?set EMPTY}", "${MISSING?set MISSING}"):
        with pytest.raises(ValueError, match="set "):
            interpolate(text, values)
    assert interpolate("${EMPTY?set EMPTY}", values) == ""  # set, though empty
    addresses = {"postgres": "127.0.0.1:5433", "minio": "127.0.0.1:9001"}
    assert (
        rewrite_hosts("postgresql+psycopg2://u:p@postgres/airflow", addresses)
        == "postgresql+psycopg2://u:p@127.0.0.1:5433/airflow"
    )
    assert rewrite_hosts("http://minio:9000", addresses) == "http://127.0.0.1:9001"
    assert rewrite_hosts("http://minio-console:9000", addresses) == "http://minio-console:9000"
    assert rewrite_hosts("postgres", addresses) == "127.0.0.1"  # libpq's PGHOST


def test_each_service_runs_from_its_images_lock(plan: Any) -> None:
    """The native run uses the environment built from the lock each service's image installs
    (so a package missing from an image fails here too); the stand-ins for third-party
    services (moto, the image server, Postgres, Redis) are not the project's images."""
    from devkit import imagevenvs

    assert imagevenvs.dockerfile_locks((REPO / "Dockerfile").read_text()) == {
        "airflow": "deploy/locks/airflow.txt",
        "mlflow": "deploy/locks/mlflow.txt",
        "worker": "requirements.txt",
    }
    for step in plan.steps:
        if step.name not in COMPOSE["services"] or "build" not in COMPOSE["services"][step.name]:
            continue
        target = imagevenvs.service_target(COMPOSE, step.name)
        venv = imagevenvs.ROOT / target
        if step.command[0] != "/bin/bash":  # airflow-init's script: its PATH finds the tools
            assert Path(step.command[0]).parent == venv / "bin", (step.name, step.command[0])
        assert step.env["PATH"].split(os.pathsep)[0] == str(venv / "bin"), step.name
    # the airflow image has no torch and no pandas: they are not importable from its venv
    python = imagevenvs.ROOT / "airflow" / "bin" / "python"
    for module in ("torch", "pandas"):
        done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
        assert done.returncode != 0, module


def test_the_airflow_image_runs_store_init_and_parses_the_dags(plan: Any) -> None:
    """What the airflow image runs besides Airflow: store-init's import of the store, and the
    DAG files the DAG processor parses (with the image's packages only)."""
    from devkit import imagevenvs

    python = str(imagevenvs.ROOT / "airflow" / "bin" / "python")
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        # The image's plugins folder ($AIRFLOW_HOME/plugins there): Airflow puts it on the
        # import path, and the DAG files import the task policy from it.
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    }
    done = subprocess.run(
        [python, "-c", "from ml.storage import ObjectStore"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-800:]
    for dag in sorted((REPO / "dags").glob("*.py")):
        code = f"import runpy; runpy.run_path({str(dag)!r})"
        done = subprocess.run(
            [python, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (dag.name, done.stderr[-800:])


# ------------------------------------------------------------- the topology, end to end


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    names = ("AIRFLOW", "MLFLOW", "S3", "IMAGES", "POSTGRES", "REDIS", "SCHEDULER_HEALTH")
    env = {f"STACK_{name}_PORT": str(free_port()) for name in names}
    env["STACK_DIR"] = str(tmp_path_factory.mktemp("celery") / "stack")
    stack = LocalStack.from_environment(env)
    started = time.monotonic()
    try:
        stack.up("celery")
        stack.STARTED_IN = time.monotonic() - started
        yield stack
    finally:
        assert stack.down(quiet=True) == 0


def _parse(stamp: str | None) -> float:
    return datetime.fromisoformat(stamp).timestamp() if stamp else 0.0


def _run(stack: LocalStack, conf: dict[str, Any], timeout: float = 900) -> tuple[str, str]:
    run_id = stack.trigger(conf)
    return run_id, stack.wait(run_id, timeout)


@pytest.mark.integration
@pytest.mark.slow
def test_the_dag_runs_on_the_celery_topology(topology: LocalStack) -> None:
    stack = topology
    print(json.dumps({"topology_started_in_s": round(stack.STARTED_IN, 1)}))
    assert stack.STARTED_IN < 300
    # Every file that holds a secret is its owner's alone.
    held = [".env", "client.json", "secrets/passwords.json", "redis/redis.conf"]
    for path in [stack.folder / name for name in held] + list(stack.folder.glob("services/*")):
        assert path.stat().st_mode & 0o077 == 0, path
    with socket.create_connection(("127.0.0.1", stack.ports["redis"])) as broker:
        broker.sendall(b"PING\r\n")
        assert broker.recv(100).startswith(b"-NOAUTH")  # no task without the password
    # Every socket of every service is on loopback, Postgres and Redis included.
    sockets = stack.listeners()
    assert all(address in ("127.0.0.1", "::1") for _, address, _ in sockets), sockets
    assert {port for _, _, port in sockets} >= {
        stack.ports[name] for name in TOPOLOGY_PORTS["celery"]
    }, sockets
    prepare_demo_csv(stack, None)
    conf = {**DEMO_CONF, "sample": 60, "epochs": 1, "download_batch_size": 15}
    run_id = _redis_crashes_while_a_task_is_queued(stack, conf)
    state = stack.wait(run_id, 900)
    tasks = stack.tasks(run_id)
    assert state == "success", [(t["task_id"], t["state"]) for t in tasks]
    gpu_tasks = {"preflight", "train", "register"}
    for task in tasks:
        role = "gpu" if task["task_id"] in gpu_tasks else "default"
        assert task["queue"] == role, task["task_id"]
        assert task["hostname"].endswith(f"-{role}"), (task["task_id"], task["hostname"])
    assert stack.api("GET", "/pools/gpu")["slots"] == 1  # airflow-init's pool, ML_GPU_WORKERS
    # A successful task's log holds no error lines (MLflow's messages keep their own level).
    for task in tasks:
        if task["task_id"] in ("ingest", "train", "register"):
            assert _error_lines(stack, run_id, task) == [], task["task_id"]
    assert next(t for t in tasks if t["task_id"] == "train")["pool"] == "gpu"
    batches = [t for t in tasks if t["task_id"] == "download_batch"]
    assert len(batches) == 4 and len({t["pid"] for t in batches}) >= 2
    spans = sorted((_parse(t["start_date"]), _parse(t["end_date"])) for t in batches)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans  # in parallel

    env = stack.client_environment()
    registered = stack.xcom(run_id, "register")
    assert registered["aliases"] == ["challenger", "champion"]
    import psycopg2

    with (
        psycopg2.connect(
            env["POSTGRES_DSN"], password=env["POSTGRES_PASSWORD"], dbname="mlflow"
        ) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
            (registered["model"],),
        )
        assert dict(cursor.fetchall()) == {"challenger": 1, "champion": 1}

    scored = wait_inference(stack, 300)
    assert scored and scored["predicted"] >= 15
    inference = stack.api("GET", f"/dags/{INFERENCE_DAG_ID}/dagRuns")["dag_runs"]
    assert [r["run_type"] for r in inference] == ["asset_triggered"]
    quoted = urllib.parse.quote(inference[0]["dag_run_id"], safe="")
    path = f"/dags/{INFERENCE_DAG_ID}/dagRuns/{quoted}/taskInstances"
    scored_by = stack.api("GET", path)["task_instances"]
    assert scored_by and all(
        t["queue"] == "default" and t["hostname"].endswith("-default") for t in scored_by
    ), [(t["task_id"], t["queue"], t["hostname"]) for t in scored_by]


def _error_lines(stack: LocalStack, run_id: str, task: dict[str, Any]) -> list[str]:
    """The error-level lines of a task's log (Airflow marks anything on stderr so)."""
    quoted = urllib.parse.quote(run_id, safe="")
    path = (
        f"/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/{task['task_id']}/logs/{task['try_number']}"
    )
    entries = stack.api("GET", path)["content"]
    assert len(entries) > 3, entries  # the log was read
    return [
        str(entry.get("event"))[:300]
        for entry in entries
        if isinstance(entry, dict) and str(entry.get("level", "")).lower() in ("error", "critical")
    ]


def _redis_crashes_while_a_task_is_queued(stack: LocalStack, conf: dict[str, Any]) -> str:
    """Trigger a run with the default worker stopped, so that ``ingest`` waits in Redis;
    SIGKILL Redis and start it again: its append-only file still holds the task, which runs
    as soon as the worker is back (without it the task would wait in queued until the
    scheduler's task_queued_timeout, 600 s, requeued it). Returns the run's id."""
    from devkit.topology import redis_ready

    stack.stop("airflow-worker")
    run_id = stack.trigger(conf)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not _broker(stack, "LLEN", "default"):
        time.sleep(0.5)
    waiting = _broker(stack, "LLEN", "default")
    assert waiting == 1, "ingest was not seen waiting in Redis"
    assert _task_state(stack, run_id, "ingest") == "queued"
    old = stack.load_state()["services"]["redis"]["pid"]
    stack.restart("redis", kill=True)
    assert not stack.started_by([old])  # the old server is gone: a crash, not a shutdown
    redis_ready(stack.ports["redis"], _broker_password(stack))
    assert _broker(stack, "LLEN", "default") == waiting  # the crash lost no queued task
    back = time.monotonic()
    stack.start("airflow-worker")
    while time.monotonic() < back + 300 and _task_state(stack, run_id, "ingest") == "queued":
        time.sleep(0.5)
    started = time.monotonic() - back
    assert _task_state(stack, run_id, "ingest") in ("running", "success"), "ingest never ran"
    print(json.dumps({"queued_task_ran_after_redis_crash_s": round(started, 1)}))
    return str(run_id)


def _task_state(stack: LocalStack, run_id: str, task_id: str) -> str | None:
    states = {t["task_id"]: t["state"] for t in stack.tasks(run_id)}
    return states.get(task_id)


def _broker_password(stack: LocalStack) -> str:
    config = (stack.folder / "redis" / "redis.conf").read_text()
    return next(line.split(" ", 1)[1] for line in config.splitlines() if "requirepass" in line)


def _broker(stack: LocalStack, *words: str) -> int:
    """One integer-answering Redis command, sent with the broker's password."""

    def encode(*parts: str) -> bytes:
        body = b"".join(f"${len(p.encode())}\r\n{p}\r\n".encode() for p in parts)
        return f"*{len(parts)}\r\n".encode() + body

    with socket.create_connection(("127.0.0.1", stack.ports["redis"]), timeout=10) as broker:
        broker.sendall(encode("AUTH", _broker_password(stack)) + encode(*words))
        reply = b""
        while reply.count(b"\r\n") < 2:
            chunk = broker.recv(4096)
            assert chunk, reply
            reply += chunk
    auth, answer = reply.split(b"\r\n")[:2]
    assert auth == b"+OK" and answer.startswith(b":"), reply
    return int(answer[1:])


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing(
    topology: LocalStack, image_server: ImageServer
) -> None:
    """SIGKILL the default worker while two download batches run, start it again: the run
    finishes with one ok manifest row per URL and one stored object per image, and rows the
    manifest parts held at the kill are not fetched again (a part is written every 20 s)."""
    stack = topology
    rows = labelled_urls(image_server, dict.fromkeys(LABELS, 8), prefix="killed", delay=1.5)
    env = stack.client_environment()
    with stack.session(env):
        from ml.storage import ObjectStore, S3Uri

        store = ObjectStore()
        csv = S3Uri(BUCKET, "input/killed.csv")
        store.put_bytes(csv, plain_csv(rows), content_type="text/csv")
    conf = {
        **DEMO_CONF,
        "csv": str(csv),
        "epochs": 1,
        "max_steps_per_epoch": 1,
        "download_batch_size": 20,  # two batches of about 30 s: one part each before the kill
        "download_concurrency": 1,
    }
    run_id = stack.trigger(conf)
    deadline = time.monotonic() + 300
    recorded: set[str] = set()
    dataset = ""
    while time.monotonic() < deadline:  # a batch is running and has written some rows
        states = {(t["task_id"], t["map_index"]): t["state"] for t in stack.tasks(run_id)}
        if not dataset and states.get(("ingest", -1)) == "success":
            dataset = stack.xcom(run_id, "ingest")["dataset"]
        running = [k for k, v in states.items() if k[0] == "download_batch" and v == "running"]
        recorded = _recorded_urls(store, dataset) if dataset else set()
        if running and len(recorded) >= 4:
            break
        time.sleep(0.5)
    assert recorded, "no download batch was seen running"
    time.sleep(5)  # a few more images fetched that no manifest part holds yet
    recorded, in_flight = _kill_the_worker(stack, run_id, store, env, image_server, dataset)
    state = stack.wait(run_id, 900)
    tasks = stack.tasks(run_id)
    assert state == "success", [(t["task_id"], t["state"], t["try_number"]) for t in tasks]
    assert max(t["try_number"] for t in tasks if t["task_id"] == "download_batch") >= 2

    manifest = stack.xcom(run_id, "collect_manifest")
    assert manifest["statuses"] == {"ok": len(rows)} and manifest["urls"] == len(rows)
    with stack.session(env):
        from ml.layout import DatasetLayout, StoreLayout

        table = store.read_parquet(DatasetLayout.parse(dataset).download_manifest)
        images = StoreLayout.parse(env["ML_STORE"]).root.child("images")
        stored = {key for key, _ in store.list_objects(images)}
    assert len(table) == len(rows) and table["row"].is_unique
    assert set(table["object_key"]) <= stored
    hits = {path: count for path, count in image_server.hits.items() if "/killed/" in path}
    assert len(hits) == len(rows)
    for url in recorded:  # written to the manifest before the kill: never fetched again
        path = urllib.parse.urlsplit(url)
        assert hits[f"{path.path}?{path.query}"] == 1, url
    for path in in_flight:  # fetched by the killed attempt, never recorded: the retry refetched
        assert hits[path] == 2, path
    assert max(hits.values()) <= 2


def _kill_the_worker(
    stack: LocalStack,
    run_id: str,
    store: Any,
    env: dict[str, str],
    image_server: ImageServer,
    dataset: str,
) -> tuple[set[str], set[str]]:
    """SIGKILL the default worker and everything it started, and prove that all of it died:
    its task processes (each in a process group of its own) are gone, and for 25 s nothing
    is fetched or written. Returns the URLs recorded at the kill and the image paths fetched
    without a manifest row (the retry must fetch those again)."""
    worker = stack.load_state()["services"]["airflow-worker"]["pid"]
    doomed = stack.started_by([worker])
    task_pids = {t["pid"] for t in stack.tasks(run_id) if t["task_id"] == "download_batch"}
    task_pids.discard(None)
    assert task_pids and task_pids <= set(doomed), (task_pids, doomed)
    assert all(os.getpgid(pid) != worker for pid in task_pids)  # groups of their own
    stack.restart("airflow-worker", kill=True)
    living = set(stack.started_by(doomed))  # zombies excluded: they hold nothing
    assert not living & set(doomed), living & set(doomed)
    recorded = _recorded_urls(store, dataset)
    fetched = _hits(image_server)
    written = _objects(store, env)
    in_flight = {path for path in fetched if _url(image_server, path) not in recorded}
    assert in_flight, "no image was fetched without its manifest row: nothing to refetch"
    # A live orphan would go on fetching (an image every 1.5 s) and write a part within 20 s.
    time.sleep(25)
    tries = {t["try_number"] for t in stack.tasks(run_id) if t["task_id"] == "download_batch"}
    assert tries == {1}, "the retry started too early to tell"
    assert _hits(image_server) == fetched and _objects(store, env) == written
    return recorded, in_flight


def _hits(image_server: ImageServer) -> dict[str, int]:
    return {path: count for path, count in image_server.hits.items() if "/killed/" in path}


def _url(image_server: ImageServer, path: str) -> str:
    return image_server.base_url.rstrip("/") + path


def _objects(store: Any, env: dict[str, str]) -> set[tuple[str, str]]:
    """Every object of the stack's store, with its ETag."""
    from ml.uri import S3Uri

    root = S3Uri.parse(env["ML_STORE"])
    pages = store.client.get_paginator("list_objects_v2").paginate(
        Bucket=root.bucket, Prefix=root.key
    )
    return {(item["Key"], item["ETag"]) for page in pages for item in page.get("Contents", [])}


def _recorded_urls(store: Any, dataset: str) -> set[str]:
    """URLs with an ok row in the dataset's manifest parts so far."""
    from ml.download import read_parts
    from ml.layout import DatasetLayout

    parts = read_parts(DatasetLayout.parse(dataset), store).rows
    return set(parts.loc[parts["status"] == "ok", "url"])


@pytest.mark.integration
@pytest.mark.slow
def test_stop_during_a_running_task_leaves_nothing(
    topology: LocalStack, image_server: ImageServer
) -> None:
    """``scripts/stop`` (scripts/stack down) while a download task runs: the task processes (in
    process groups of their own, their marker hidden by setproctitle) end with the rest.
    Runs last: it stops the module's stack."""
    stack = topology
    rows = labelled_urls(image_server, dict.fromkeys(LABELS, 4), prefix="stopped", delay=2)
    env = stack.client_environment()
    with stack.session(env):
        from ml.storage import ObjectStore, S3Uri

        csv = S3Uri(BUCKET, "input/stopped.csv")
        ObjectStore().put_bytes(csv, plain_csv(rows), content_type="text/csv")
    conf = {**DEMO_CONF, "csv": str(csv), "download_concurrency": 1}
    run_id = stack.trigger(conf)
    deadline = time.monotonic() + 300
    task_pids: set[int] = set()
    while time.monotonic() < deadline and not task_pids:
        running = [t for t in stack.tasks(run_id) if t["task_id"] == "download_batch"]
        task_pids = {t["pid"] for t in running if t["state"] == "running" and t["pid"]}
        time.sleep(0.5)
    assert task_pids, "no download task was seen running"
    state = stack.load_state()
    services = [s["pid"] for s in state["services"].values()]
    everything = stack.started_by(services, state["marker"])
    assert task_pids <= set(everything)
    assert stack.down(quiet=True) == 0
    assert stack.started_by(everything) == []  # every one of them, task processes included
