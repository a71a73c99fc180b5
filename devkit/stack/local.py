"""The local stack as an object: its folder, its ports, its services and how to start, stop
and talk to them. ``LocalStack.from_environment()`` reads ``STACK_DIR`` and ``STACK_*_PORT``,
so that two stacks (a test's and a person's) never share anything."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from deploy.init_env import write_private
from devkit.servers import mlflow_command
from devkit.servers import wait_http as wait_for
from devkit.stack import processes
from devkit.stack.airflow_api import AirflowApi
from devkit.stack.report import TrainingProgress, progress_line

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: Each port's setting and default.
PORT_DEFAULTS = {
    "airflow": ("STACK_AIRFLOW_PORT", 8080),
    "mlflow": ("STACK_MLFLOW_PORT", 5000),
    "s3": ("STACK_S3_PORT", 9000),
    "images": ("STACK_IMAGES_PORT", 8000),
    "worker_logs": ("STACK_WORKER_LOG_PORT", 8793),
    "trigger_logs": ("STACK_TRIGGER_LOG_PORT", 8794),
    # the Celery topology's own (docker-compose.yaml run natively)
    "postgres": ("STACK_POSTGRES_PORT", 5432),
    "redis": ("STACK_REDIS_PORT", 6379),
    "scheduler_health": ("STACK_SCHEDULER_HEALTH_PORT", 8974),
}
#: The ports each topology listens on.
TOPOLOGY_PORTS = {
    "local": ("airflow", "mlflow", "s3", "images", "worker_logs", "trigger_logs"),
    "celery": ("airflow", "mlflow", "s3", "images", "postgres", "redis", "scheduler_health"),
}
BUCKET = "pipeline"
DAG_ID = "image_sentiment"
INFERENCE_DAG_ID = "image_sentiment_batch_inference"
DEMO_CSV = f"s3://{BUCKET}/input/sample.csv"
SCORE_CSV = f"s3://{BUCKET}/input/score.csv"


def say(message: str) -> None:
    print(message, flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class LocalStack:
    """The services of one stack, their state in ``folder`` (``state.json``, logs, the
    databases), listening on ``ports`` of 127.0.0.1."""

    def __init__(self, folder: Path, ports: Mapping[str, int]) -> None:
        self.folder = folder.resolve()
        self.ports = dict(ports)
        self._airflow: AirflowApi | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> LocalStack:
        folder = Path(env.get("STACK_DIR", str(REPO / ".run" / "stack")))
        ports = {name: int(env.get(var, str(port))) for name, (var, port) in PORT_DEFAULTS.items()}
        return cls(folder, ports)

    # ------------------------------------------------------------------ state and endpoints

    def url(self, name: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def load_state(self) -> dict[str, Any]:
        path = self.folder / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_state(self, state: dict[str, Any]) -> None:
        (self.folder / "state.json").write_text(json.dumps(state, indent=2))

    def _services(self, state: dict[str, Any] | None = None) -> list[int]:
        state = self.load_state() if state is None else state
        return [service["pid"] for service in state.get("services", {}).values()]

    def environment(self, marker: str) -> dict[str, str]:
        """What every service of the local topology (and so every Airflow task) sees."""
        return {
            **os.environ,
            "STACK_MARKER": marker,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "AWS_ENDPOINT_URL": self.url("s3"),
            "AWS_ACCESS_KEY_ID": "stack",
            "AWS_SECRET_ACCESS_KEY": "stack-local-only",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "MLFLOW_UI_URL": f"http://localhost:{self.ports['mlflow']}",
            "MLFLOW_S3_ENDPOINT_URL": self.url("s3"),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "ML_STORE": f"s3://{BUCKET}/store",
            "ML_ALLOW_NETWORKS": "127.0.0.0/8",
            "ML_CSV": DEMO_CSV,
            "ML_SCHEDULE": "none",
            "ML_DOWNLOAD_PARALLELISM": "2",
            "ML_ARCH": "resnet18",  # the demo shows the pipeline on a CPU, not ResNet-152's score
            "ML_INFERENCE_CSV": SCORE_CSV,
            "AIRFLOW_HOME": str(self.folder / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.ports["airflow"]),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{self.ports['airflow']}"
            "/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.ports["worker_logs"]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.ports["trigger_logs"]),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        }

    def client_environment(self) -> dict[str, str]:
        """What a client of the running stack needs (endpoints and credentials)."""
        state = self.load_state()
        if state.get("topology") == "celery":
            loaded: dict[str, str] = json.loads((self.folder / "client.json").read_text())
            return {**os.environ, **loaded}
        return self.environment(state.get("marker", ""))

    @contextlib.contextmanager
    def session(self, env: dict[str, str] | None = None) -> Iterator[None]:
        """This process talks to the stack's services (its S3 endpoint, its MLflow) while
        inside: their settings are in ``os.environ``, and put back after."""
        saved = dict(os.environ)
        os.environ.update(self.client_environment() if env is None else env)
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    # ------------------------------------------------------------------ Airflow

    @property
    def airflow(self) -> AirflowApi:
        """Airflow's REST API: the Celery topology signs in as compose's admin; the local
        stack's API lets everyone in."""
        if self._airflow is None:
            credentials: Callable[[], tuple[str, str]] | None = None
            if self.load_state().get("topology") == "celery":

                def credentials() -> tuple[str, str]:
                    env = self.client_environment()
                    return env["AIRFLOW_ADMIN_USER"], env["AIRFLOW_ADMIN_PASSWORD"]

            self._airflow = AirflowApi(self.url("airflow"), credentials)
        return self._airflow

    def api(self, method: str, path: str, body: Any | None = None) -> Any:
        return self.airflow.call(method, path, body)

    def trigger(self, conf: dict[str, Any]) -> str:
        """One run of the training DAG (the batch-inference DAG unpaused first, so that it
        runs on the new model)."""
        self.api("PATCH", f"/dags/{INFERENCE_DAG_ID}", {"is_paused": False})
        return self.airflow.trigger(DAG_ID, conf)

    def tasks(self, run_id: str, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        return self.airflow.task_instances(dag_id, run_id)

    def xcom(self, run_id: str, task_id: str, dag_id: str = DAG_ID) -> Any:
        return self.airflow.xcom(dag_id, run_id, task_id)

    def wait(self, run_id: str, timeout: float) -> str:
        """The run's final state, printing a progress line whenever it changes; "timeout" when
        it is still going after ``timeout`` seconds."""
        started = time.monotonic()
        order = self.airflow.task_order(DAG_ID)
        training = TrainingProgress(self.session, run_id)
        shown = ""
        while time.monotonic() - started < timeout:
            state = self.airflow.run_state(DAG_ID, run_id)
            line = progress_line(self.tasks(run_id), order, training)
            if line != shown:
                say(f"[{time.monotonic() - started:5.0f}s] {line}")
                shown = line
            if state in ("success", "failed"):
                return state
            time.sleep(3)
        return "timeout"

    def _wait_airflow_ready(self, timeout: float = 180) -> None:
        if not self.airflow.wait_ready(DAG_ID, timeout):
            raise SystemExit(
                "error: Airflow did not become healthy or did not parse the DAG; see "
                f"{self.folder / 'logs' / 'airflow.log'}"
            )

    # ------------------------------------------------------------------ starting

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Service ``name`` in its own process group, its output appended to its log."""
        with (self.folder / "logs" / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                command,
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_http(
        self, target: str, name: str, timeout: float, process: subprocess.Popen[bytes]
    ) -> None:
        try:
            wait_for(target, timeout, process, accept=lambda status: status < 500)
        except RuntimeError as exc:
            log = self.folder / "logs" / f"{name}.log"
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise SystemExit(f"error: {name}: {exc}; its log ends:\n{tail}") from None

    def up(self, topology: str = "local") -> dict[str, Any]:
        state = self.load_state()
        running = state.get("services") and all(
            processes.alive(pid) for pid in self._services(state)
        )
        if running and state.get("topology", "local") == topology:
            say(f"the stack is already up (state in {self.folder})")
            return state
        if state:
            self.down(quiet=True)
        busy = [
            f"{name} ({self.ports[name]})"
            for name in TOPOLOGY_PORTS[topology]
            if not port_free(self.ports[name])
        ]
        if busy:
            raise SystemExit(
                f"error: ports in use: {', '.join(busy)}; stop what uses them or set "
                "STACK_*_PORT (see devkit/stack)"
            )
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        self._airflow = None  # the new topology decides how the API is signed into
        marker = uuid.uuid4().hex
        try:
            if topology == "celery":
                return self._up_celery(marker)
            return self._up_local(marker)
        except BaseException:
            self.down(quiet=True)
            raise

    def _local_services(self) -> list[tuple[str, list[str], str | None, float]]:
        """(name, command, health URL, seconds to become healthy) of the local topology."""
        python, airflow = str(VENV_BIN / "python"), str(VENV_BIN / "airflow")
        mlflow = mlflow_command(
            f"sqlite:///{self.folder / 'mlflow.db'}", f"s3://{BUCKET}/mlflow", self.ports["mlflow"]
        )
        health = self.url("airflow", "/api/v2/monitor/health")
        s3 = [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.ports["s3"])]
        images = [python, "-m", "devkit", "-q", "imageserver", "--port", str(self.ports["images"])]
        return [
            ("s3", s3, self.url("s3", "/"), 60),
            ("images", images, self.url("images", "/health.jpg"), 60),
            ("mlflow", mlflow, self.url("mlflow", "/health"), 120),
            # Airflow's components one by one (what `airflow standalone` runs), so that each can
            # be told to listen on loopback only: the scheduler's and triggerer's log servers
            # would bind every interface, and task logs are local files here anyway.
            ("airflow", [airflow, "api-server"], health, 180),
            ("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], None, 0),
            ("airflow-dag-processor", [airflow, "dag-processor"], None, 0),
            ("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], None, 0),
        ]

    def _up_local(self, marker: str) -> dict[str, Any]:
        """SQLite and LocalExecutor: S3, the image server, MLflow, Airflow's components."""
        env = self.environment(marker)
        state: dict[str, Any] = {
            "marker": marker,
            "services": {},
            "ports": self.ports,
            "topology": "local",
        }
        for name, command, health, timeout in self._local_services():
            if name == "airflow":
                say("migrating the Airflow database ...")
                with (self.folder / "logs" / "airflow-db.log").open("ab") as log:
                    subprocess.run(
                        [str(VENV_BIN / "airflow"), "db", "migrate"],
                        env=env,
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        check=True,
                    )
            say(f"starting {name} ...")
            process = self._spawn(name, command, env)
            state["services"][name] = {"pid": process.pid, "port": self.ports.get(name)}
            self._save_state(state)
            if name == "mlflow":
                self._create_bucket(env)
            if health:
                self._wait_http(health, name, timeout, process)
        self._wait_airflow_ready()
        self.api(
            "POST",
            "/pools",
            {"name": "gpu", "slots": 1, "description": "one training job at a time"},
        )
        say(
            f"stack up: Airflow {self.url('airflow')} · MLflow {self.url('mlflow')} · "
            f"S3 {self.url('s3')} · images {self.url('images')}"
        )
        return state

    def _up_celery(self, marker: str) -> dict[str, Any]:
        """docker-compose.yaml's topology on this machine (devkit.topology): Postgres, Redis,
        MLflow on Postgres, Airflow with CeleryExecutor and two workers (queues default and
        gpu)."""
        from devkit.topology import celery_plan

        extra = {
            "ML_SCHEDULE": "none",
            "ML_ALLOW_NETWORKS": "127.0.0.0/8",
            "ML_CSV": DEMO_CSV,
            "ML_INPUT_ROOTS": f"s3://{BUCKET}/input s3://{BUCKET}/pipeline",
            "ML_INFERENCE_CSV": SCORE_CSV,
        }
        plan = celery_plan(self.folder, self.ports, marker, BUCKET, extra)
        write_private(self.folder / "client.json", json.dumps(plan.client_env))
        state: dict[str, Any] = {
            "marker": marker,
            "services": {},
            "ports": self.ports,
            "topology": "celery",
            "cleanup": [str(p) for p in plan.cleanup],
        }
        self._save_state(state)
        for step in plan.steps:
            say(f"{'running' if step.once else 'starting'} {step.name} ...")
            if step.before:
                step.before()
            process = self._spawn(step.name, step.command, step.env)
            if step.once:
                if process.wait(timeout=step.timeout) != 0:
                    log = self.folder / "logs" / f"{step.name}.log"
                    tail = log.read_text(errors="replace")[-3000:]
                    raise SystemExit(f"error: {step.name} failed; its log ends:\n{tail}")
                continue
            state["services"][step.name] = {"pid": process.pid}
            self._save_spec(step.name, step.command, step.env)
            self._save_state(state)
            if step.health:
                self._wait_http(step.health, step.name, step.timeout, process)
            if step.after:
                step.after()
        self._wait_airflow_ready()
        say(
            f"celery topology up: Airflow {self.url('airflow')} (admin, password in "
            f"{self.folder / '.env'}) · MLflow {self.url('mlflow')} · Postgres "
            f"127.0.0.1:{self.ports['postgres']} · Redis 127.0.0.1:{self.ports['redis']} · "
            f"S3 {self.url('s3')} · images {self.url('images')}"
        )
        return state

    def _create_bucket(self, env: dict[str, str]) -> None:
        try:
            wait_for(self.url("s3", "/"), 60, accept=lambda status: True)
        except RuntimeError:
            raise SystemExit("error: the local S3 endpoint did not start") from None
        with self.session(env):
            from ml.storage import ObjectStore

            ObjectStore().ensure_bucket(BUCKET)

    # ------------------------------------------------------------------ one service

    def _save_spec(self, name: str, command: list[str], env: dict[str, str]) -> None:
        """How a service was started (its environment holds secrets: owner-only), for
        restarts."""
        folder = self.folder / "services"
        folder.mkdir(mode=0o700, exist_ok=True)
        write_private(folder / f"{name}.json", json.dumps({"command": command, "env": env}))

    def _service(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        state = self.load_state()
        service = state.get("services", {}).get(name)
        if service is None:
            raise SystemExit(f"error: no service {name!r} in this stack")
        return state, service

    def stop(self, name: str, *, kill: bool = False, grace: float = 30.0) -> None:
        """Stop service ``name`` and everything it started, task processes in groups of their
        own included: SIGTERM and ``grace`` seconds, as ``docker compose stop`` gives, then
        SIGKILL; with ``kill``, SIGKILL at once, as a machine failure or a container's cgroup
        would."""
        _, service = self._service(name)
        doomed = processes.started_by([service["pid"]])
        if kill:
            left = processes.kill_everything(doomed)
        else:
            left = processes.terminate(doomed, grace=grace)
        if left:
            raise SystemExit(f"error: {name}'s processes {left} survived SIGKILL")

    def start(self, name: str) -> int:
        """Start service ``name`` again as it was first started (it must be stopped); its
        pid."""
        state, service = self._service(name)
        if processes.started_by([service["pid"]]):
            raise SystemExit(f"error: {name} is running (pid {service['pid']}): stop it first")
        spec = json.loads((self.folder / "services" / f"{name}.json").read_text())
        process = self._spawn(name, spec["command"], spec["env"])
        state["services"][name]["pid"] = process.pid
        self._save_state(state)
        return process.pid

    def restart(self, name: str, *, kill: bool = False) -> int:
        """``stop`` (with ``kill``: SIGKILL everything it started at once), then ``start``."""
        self.stop(name, kill=kill)
        return self.start(name)

    def started_by(self, services: list[int], marker: str = "") -> list[int]:
        """Every living process ``services`` started, and with ``marker`` every process that
        carries it (see :func:`devkit.stack.processes.started_by`)."""
        return processes.started_by(services, marker)

    # ------------------------------------------------------------------ stopping, looking

    def down(self, quiet: bool = False) -> int:
        """Stop every process the stack started (by process group, then by the marker in their
        environment, so nothing is orphaned) and delete its state."""
        state = self.load_state()
        if not state:
            if not quiet:
                say("nothing to stop")
            return 0
        left = processes.terminate(self._services(state), state["marker"])
        if left:
            say(f"error: processes still running: {left}")
            return 1
        for folder in state.get("cleanup", []):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        if not quiet:
            say("stack stopped; nothing left running")
        return 0

    def listeners(self) -> list[tuple[int, str, int]]:
        """(pid, address, port) of every listening TCP socket of the stack's processes."""
        state = self.load_state()
        return processes.listeners(self._services(state), state["marker"])

    def status(self) -> int:
        state = self.load_state()
        if not state:
            say("the stack is not running")
            return 1
        stopped = []
        for name, service in state["services"].items():
            running = processes.alive(service["pid"])
            stopped += [] if running else [name]
            say(f"{name:22s} pid {service['pid']:7d} {'up' if running else 'DOWN'}")
        if stopped:  # compose's "restart: always" has no native counterpart
            say(f"nothing restarts a dead service here: scripts/stack start {stopped[0]}")
        for pid, address, port in self.listeners():
            say(f"listening: pid {pid} on {address}:{port}")
        return 0

    def serve(self, port: int, model: str | None) -> int:
        """``python -m ml serve`` with the running stack's MLflow and S3, until Ctrl-C (it
        carries the stack's marker, so ``down`` stops it too)."""
        if not self.load_state():
            raise SystemExit("error: the stack is not running: start it with bash scripts/demo")
        env = {**self.client_environment(), "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "ml", "serve", "--port", str(port)]
        command += ["--model", model] if model else []
        with contextlib.suppress(KeyboardInterrupt):
            return subprocess.run(command, env=env, check=False).returncode
        return 130
