"""The docker-compose deployment's topology, run natively on loopback: no Docker needed.

``docker-compose.yaml`` is the one source: every Airflow and MLflow process gets the
environment compose gives its service (``${VAR}`` filled from a ``.env`` made like
``deploy/init_env.py`` makes it), and runs the command compose runs. Only what cannot be the
same without containers changes, each listed in :data:`NATIVE` and :func:`native_command` with its
reason: service host names become loopback addresses, container paths become folders of the
stack, and ports move to free ones. Postgres and Redis are the distribution's packages
(``scripts/setup-services`` installs them), MinIO's stand-in is the moto S3 server.

Usage (through ``scripts/stack up --topology celery``)::

    compose = load_compose()
    env = service_environment(compose, "airflow-worker", values, addresses)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The .env is made as deploy/init_env.py makes it (which reads deploy/check_env.py's table).
from deploy.ensure_databases import DATABASES as EXTRA_DATABASES
from deploy.init_env import parse_env, render, write_private
from devkit import imagevenvs

REPO = Path(__file__).resolve().parent.parent

COMPOSE = REPO / "docker-compose.yaml"
#: The compose services the native topology runs, by role (compose name -> what runs it).
AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
)
#: The other compose services, and what stands in for each natively.
BACKING_SERVICES = {
    "postgres": "PostgreSQL from the distribution's packages",
    "redis": "Redis from the distribution's packages",
    "minio": "the moto S3 server (MinIO's S3 API)",
    "mlflow": "mlflow server, the same command and environment",
    "airflow-init": "the same steps: db migrate, the admin's password file, the gpu pool",
    "postgres-databases": "the same script: deploy/ensure_databases.py",
    "store-init": "the same call: ObjectStore().ensure_bucket",
    "mlflow-users": "the same script: deploy/mlflow_users.py",
    "config-check": "deploy/check_env.py on the generated .env",
}
#: Values the native run sets in place of compose's, and why (only where compose sets the name).
NATIVE = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": (
        "60",
        "a killed worker's task is retried after a minute, not compose's default five",
    ),
    "ML_TRAIN_DEVICE": ("cpu", "no GPU on these machines: the gpu-queue worker trains on the CPU"),
    "ML_ARCH": ("resnet18", "on the CPU, ResNet-18 keeps a run short (compose: ResNet-152)"),
    "ML_ALLOW_NETWORKS": ("127.0.0.0/8", "the image server stands in for the internet"),
}
#: Every other way the native topology differs from docker-compose.yaml, with its reason:
#: (what, compose, native, why). The README's table lists each (its test checks).
DIFFERENCES: tuple[tuple[str, str, str, str], ...] = (
    (
        "API server and MLflow web workers",
        "Airflow's default (4) and MLflow --workers 2",
        "1 each (AIRFLOW__API__WORKERS, native_command)",
        "2 cores here; one serves the tests' requests",
    ),
    (
        "DAG refresh interval",
        "Airflow's default, 300 s",
        "10 s (AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL)",
        "a stack started by a test sees the DAG files at once",
    ),
    (
        "log serving",
        "each worker serves its task logs on port 8793",
        "--skip-serve-logs; logs are files the API server reads directly",
        "two workers on one machine would share the port",
    ),
    (
        "stop grace periods",
        "2 min (default worker), 10 min (GPU worker), then SIGKILL",
        "30 s for everything, then SIGKILL (scripts/stack down)",
        "a test stack holds no checkpoint upload worth waiting for; stop the DAG run first",
    ),
    (
        "restart policy",
        "restart: always",
        "none: a dead service stays down (status says so; scripts/stack start NAME)",
        "no supervisor process outlives scripts/stack; the tests restart what they kill",
    ),
    (
        "Redis",
        "7.4.5",
        "the distribution's (7.0 on Debian 12)",
        "no image registry here; both keep queued tasks across a restart in an append-only "
        "file (fsync every second: the redis-data volume, the stack's redis/ folder)",
    ),
    (
        "object store",
        "MinIO",
        "moto's S3 server",
        "no image registry here; both speak S3 with conditional writes",
    ),
)
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:\$\{[^}]*\}|[^}])*))?\}")


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    import yaml  # type: ignore[import-untyped]

    loaded: dict[str, Any] = yaml.safe_load(path.read_text())  # resolves the anchors and <<
    return loaded


def interpolate(text: str, values: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` (the default interpolated
    too), ``${VAR:?message}``, ``${VAR?message}`` (refused when unset) and ``$$``."""

    def fill(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, kind, default = match.group(1), match.group(2), match.group(3) or ""
        value = values.get(name)
        missing = value is None if kind in ("-", "?") else not value
        if kind in (":-", "-") and missing:
            return interpolate(default, values)
        if kind in (":?", "?") and missing:
            raise ValueError(f"required variable {name} is missing a value: {default}")
        return value or ""

    return _VARIABLE.sub(fill, text)


def rewrite_hosts(value: str, addresses: Mapping[str, str]) -> str:
    """``scheme://service[:port]`` of a compose service -> its loopback ``host:port``; a value
    that is only a service's name (libpq's ``PGHOST``) -> its loopback host."""
    for service, address in addresses.items():
        if value == service:
            return address.rpartition(":")[0]
        value = re.sub(
            rf"(://(?:[^/@\s]*@)?){re.escape(service)}(?::\d+)?(?=[/\s]|$)",
            rf"\g<1>{address}",
            value,
        )
    return value


def service_environment(
    compose: Mapping[str, Any],
    service: str,
    values: Mapping[str, str],
    addresses: Mapping[str, str],
) -> dict[str, str]:
    """The environment compose gives ``service``, filled in and pointed at loopback."""
    raw = compose["services"][service].get("environment") or {}
    env = {}
    for name, value in raw.items():
        text = interpolate("" if value is None else str(value), values)
        env[name] = rewrite_hosts(text, addresses)
    for name, (value, _) in NATIVE.items():
        if name in env:
            env[name] = value
    return env


def service_command(
    compose: Mapping[str, Any], service: str, values: Mapping[str, str]
) -> list[str]:
    """The command compose runs for ``service``, filled in."""
    command = compose["services"][service].get("command") or []
    return [interpolate(str(part), values) for part in command]


def native_command(command: list[str], *, port: int | None = None) -> list[str]:
    """A compose command as it runs here: listening on loopback (``--host``), on this stack's
    port (``--port``), with one web worker (2 cores); anything else unchanged."""
    out = list(command)
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port)), ("--workers", "1")):
        if flag in out and (flag != "--port" or port is not None):
            out[out.index(flag) + 1] = value
    return out


# ------------------------------------------------------------------ Postgres and Redis


def postgres_bin() -> Path:
    """The folder of the distribution's PostgreSQL server programs."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: run bash scripts/setup-services (apt-get install "
            "postgresql redis-server)"
        )
    return found[0].parent


def _as_postgres(command: list[str]) -> list[str]:
    """Postgres refuses to run as root: root runs it as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def init_postgres(folder: Path, log: Path) -> None:
    """A new cluster in ``folder``: local socket connections trusted (the superuser sets up
    roles), TCP connections by password (scram), as compose's Postgres does."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        folder.chmod(0o700)
    with log.open("ab") as out:
        subprocess.run(
            _as_postgres(
                [
                    str(postgres_bin() / "initdb"),
                    "-D",
                    str(folder / "data"),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-U",
                    "postgres",
                ]
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )


def postgres_command(folder: Path, port: int) -> list[str]:
    """The server in the foreground, on loopback only, its socket in ``folder``."""
    return _as_postgres(
        [
            str(postgres_bin() / "postgres"),
            "-D",
            str(folder / "data"),
            "-p",
            str(port),
            "-k",
            str(folder),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
    )


def create_databases(
    folder: Path, port: int, user: str, password: str, databases: list[str]
) -> None:
    """What compose's Postgres image makes on a new volume: ``POSTGRES_USER`` as a superuser
    with its password, owning ``databases`` (``POSTGRES_DB``). SQL goes on stdin: no password in
    argv. The other databases are the ``postgres-databases`` step's, as in compose."""
    quoted = password.replace("'", "''")
    statements = [f"CREATE ROLE \"{user}\" LOGIN SUPERUSER PASSWORD '{quoted}';"]
    statements += [f'CREATE DATABASE "{name}" OWNER "{user}";' for name in databases]
    psql = [str(postgres_bin() / "psql"), "-h", str(folder), "-p", str(port), "-U", "postgres"]
    subprocess.run(
        _as_postgres([*psql, "-v", "ON_ERROR_STOP=1", "-q", "-d", "postgres"]),
        input="\n".join(statements).encode(),
        capture_output=True,
        check=True,
    )


def redis_command(folder: Path, port: int, password: str) -> tuple[list[str], Path]:
    """``redis-server`` with a config file in ``folder`` (loopback, an append-only file, the
    broker's password, as compose's Redis has them): the password is in that owner-only file,
    never in the command."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError(
            "Redis is not installed: run bash scripts/setup-services (apt-get install "
            "postgresql redis-server)"
        )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = folder / "redis.conf"
    write_private(
        config,
        f'bind 127.0.0.1\nport {port}\nsave ""\nappendonly yes\nappendfsync everysec\n'
        f"dir {folder}\n"
        f"protected-mode yes\nrequirepass {password}\n",
    )
    return [server, str(config)], config


def redis_ready(port: int, password: str, timeout: float = 30) -> None:
    """Wait until Redis answers PING after AUTH with ``password``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
                connection.sendall(b"AUTH %s\r\nPING\r\n" % password.encode())
                answer = b""
                while b"PONG" not in answer and b"-" not in answer[:1]:
                    chunk = connection.recv(256)
                    if not chunk:
                        break
                    answer += chunk
                if b"PONG" in answer:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis did not answer on 127.0.0.1:{port} within {timeout:.0f} s")
        time.sleep(0.2)


def worker_hostname() -> str:
    """The host name a task instance records (``AIRFLOW__CORE__HOSTNAME_CALLABLE``): this
    machine's, plus the worker's role, so that two workers on one machine can be told apart as
    two containers can."""
    role = os.environ.get("STACK_WORKER_ROLE", "")
    host = socket.gethostname()
    return f"{host}-{role}" if role else host


# ------------------------------------------------------------------ the plan of a start


@dataclass
class Step:
    """One process of the topology: a service (kept running) or a one-off step (``once``)."""

    name: str
    command: list[str]
    env: dict[str, str]
    health: str | None = None  # a URL that answers once the service is ready
    timeout: float = 120.0
    once: bool = False
    before: Callable[[], None] | None = None  # runs first (e.g. preparing a data folder)
    after: Callable[[], None] | None = None  # runs once it is ready (e.g. creating roles)


@dataclass
class Plan:
    steps: list[Step]
    values: dict[str, str]  # the generated .env
    client_env: dict[str, str]  # what a client of the stack needs (the test, the demo)
    cleanup: list[Path] = field(default_factory=list)


#: Container paths of the compose file and the folders that stand in for them natively.
def _paths(state: Path) -> dict[str, str]:
    return {
        "/opt/airflow/secrets": str(state / "secrets"),
        "/opt/airflow/deploy/mlflow-auth.ini": str(state / "mlflow-auth.ini"),
        "/opt/airflow/deploy": str(REPO / "deploy"),
    }


def generated_env() -> dict[str, str]:
    """The values of a .env made as ``deploy/init_env.py`` makes it: .env.example with every
    secret generated."""
    return parse_env(render((REPO / ".env.example").read_text()))


def write_env(path: Path, values: Mapping[str, str]) -> None:
    """``values`` as an owner-only .env file (it holds secrets)."""
    write_private(path, "".join(f"{k}={v}\n" for k, v in values.items()))


def stack_values(ports: Mapping[str, int], bucket: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The .env a person would write for this machine: generated secrets (as
    ``deploy/init_env.py`` makes them) and the stack's own settings."""
    values = generated_env()
    values.update(
        ML_BUCKET=bucket,
        MLFLOW_PUBLIC_URL=f"http://localhost:{ports['mlflow']}",
        MLFLOW_PUBLIC_HOST=f"localhost:{ports['mlflow']}",
        MLFLOW_PORT=str(ports["mlflow"]),
        ML_GPU_WORKERS="1",
        **extra,
    )
    return values


def celery_plan(
    state: Path,
    ports: Mapping[str, int],
    marker: str,
    bucket: str,
    extra: Mapping[str, str],
) -> Plan:
    """Every process of the compose topology, in start order, as it runs here."""
    native = _NativeCompose(state, ports, marker, stack_values(ports, bucket, extra))
    write_env(state / ".env", native.values)
    (state / "secrets").mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_auth_config(state)
    steps = native.backing_steps() + native.airflow_steps()
    for service, role in (("airflow-worker", "default"), ("airflow-worker-gpu", "gpu")):
        steps.append(worker_step(native.compose, service, role, native.values, native.airflow_env))
    return Plan(steps, native.values, native.client_env(), cleanup=[native.pg_folder])


class _NativeCompose:
    """docker-compose.yaml's services as processes on this machine: each one's command and
    environment from the compose file, with loopback addresses and the stack's folders."""

    def __init__(
        self, state: Path, ports: Mapping[str, int], marker: str, values: dict[str, str]
    ) -> None:
        self.compose = load_compose()
        self.state, self.ports, self.values = state, ports, values
        self.addresses = {
            "postgres": f"127.0.0.1:{ports['postgres']}",
            "redis": f"127.0.0.1:{ports['redis']}",
            "minio": f"127.0.0.1:{ports['s3']}",
            "mlflow": f"127.0.0.1:{ports['mlflow']}",
            "airflow-apiserver": f"127.0.0.1:{ports['airflow']}",
        }
        self.paths = _paths(state)
        self.pg_folder = Path(tempfile.gettempdir()) / f"stack-postgres-{marker[:12]}"
        self.common = {
            "STACK_MARKER": marker,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "HOME": os.environ.get("HOME", str(state)),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
        self.native_airflow = {
            "AIRFLOW_HOME": str(state / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(ports["airflow"]),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(
                ports["scheduler_health"]
            ),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        }

    def env_of(self, service: str, **more: str) -> dict[str, str]:
        """Compose's environment for ``service``, run from its image's environment (PATH)."""
        env = service_environment(self.compose, service, self.values, self.addresses)
        env = {k: _replace_paths(v, self.paths) for k, v in env.items()}
        path = f"{_image_bin(self.compose, service)}{os.pathsep}{self.common['PATH']}"
        return {**self.common, "PATH": path, **env, **more}

    def airflow_env(self, service: str, **more: str) -> dict[str, str]:
        return self.env_of(service, **self.native_airflow, **more)

    def once(self, service: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> Step:
        """A one-off compose step: its entrypoint with the stack's folders, compose's
        environment unless ``env`` is given."""
        command = [_replace_paths(p, self.paths) for p in _entrypoint(self.compose, service)]
        env = self.env_of(service) if env is None else env
        return Step(service, command, env, once=True, timeout=timeout)

    def airflow(self, service: str, *args: str, health: str | None = None) -> Step:
        """An Airflow service, run by its image's ``airflow`` command."""
        command = [str(_image_bin(self.compose, service) / "airflow"), *args]
        timeout = 180.0 if health else 120.0
        return Step(service, command, self.airflow_env(service), health=health, timeout=timeout)

    def backing_steps(self) -> list[Step]:
        """The store, the image server, the databases, Redis and MLflow, with their set-up."""
        ports, values, common = self.ports, self.values, self.common
        mlflow = native_command(
            service_command(self.compose, "mlflow", values), port=ports["mlflow"]
        )
        mlflow[0] = str(_image_bin(self.compose, "mlflow") / mlflow[0])
        store = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])]
        images = [sys.executable, "-m", "devkit", "-q", "imageserver"]
        return [
            self.once("config-check"),
            Step("minio", store, common, health=f"http://127.0.0.1:{ports['s3']}/"),
            Step(
                "images",
                [*images, "--port", str(ports["images"])],
                common,
                health=f"http://127.0.0.1:{ports['images']}/health.jpg",
            ),
            Step(
                "postgres",
                postgres_command(self.pg_folder, ports["postgres"]),
                common,
                before=lambda: init_postgres(
                    self.pg_folder, self.state / "logs" / "postgres-init.log"
                ),
                after=lambda: _postgres_ready_then_databases(
                    self.pg_folder, ports["postgres"], values, compose_databases(self.compose)[0]
                ),
            ),
            self.once(
                "postgres-databases",
                self.env_of("postgres-databases", PGPORT=str(ports["postgres"])),
            ),
            Step(
                "redis",
                redis_command(self.state / "redis", ports["redis"], values["REDIS_PASSWORD"])[0],
                common,
                after=lambda: redis_ready(ports["redis"], values["REDIS_PASSWORD"]),
            ),
            Step(
                "store-init",
                _entrypoint(self.compose, "store-init"),
                self.env_of("store-init"),
                once=True,
            ),
            Step(
                "mlflow",
                mlflow,
                self.env_of("mlflow"),
                health=f"http://127.0.0.1:{ports['mlflow']}/health",
                timeout=180,
            ),
            self.once("mlflow-users"),
        ]

    def airflow_steps(self) -> list[Step]:
        """Airflow's migration and services (the workers are added by the caller)."""
        health = f"http://127.0.0.1:{self.ports['airflow']}/api/v2/monitor/health"
        return [
            self.once("airflow-init", self.airflow_env("airflow-init"), timeout=300),
            self.airflow("airflow-apiserver", "api-server", health=health),
            self.airflow("airflow-scheduler", "scheduler"),
            self.airflow("airflow-dag-processor", "dag-processor"),
            # Log servers would bind every interface; task logs are local files here.
            self.airflow("airflow-triggerer", "triggerer", "--skip-serve-logs"),
        ]

    def client_env(self) -> dict[str, str]:
        """What a client of the stack needs: the worker's settings, the admin login, the DSN."""
        values = self.values
        return {
            **self.env_of("airflow-worker"),
            **self.native_airflow,
            "PATH": self.common["PATH"],
            "AIRFLOW_ADMIN_USER": values["AIRFLOW_ADMIN_USER"],
            "AIRFLOW_ADMIN_PASSWORD": values["AIRFLOW_ADMIN_PASSWORD"],
            "POSTGRES_DSN": (
                f"host=127.0.0.1 port={self.ports['postgres']} user={values['POSTGRES_USER']}"
            ),
            "POSTGRES_PASSWORD": values["POSTGRES_PASSWORD"],
        }


def _image_bin(compose: Mapping[str, Any], service: str) -> Path:
    """The ``bin`` folder of the environment built from ``service``'s image lock."""
    return imagevenvs.ensure(imagevenvs.service_target(compose, service)) / "bin"


def worker_step(
    compose: Mapping[str, Any],
    service: str,
    role: str,
    values: Mapping[str, str],
    airflow_env: Callable[..., dict[str, str]],
) -> Step:
    """A Celery worker as compose runs it, named by its role (two share this machine) and
    without a log server (they would share its port; logs are local files here)."""
    command = service_command(compose, service, values)
    command = [str(_image_bin(compose, service) / "airflow"), *command[1:]]
    command += ["--celery-hostname", f"{role}@%h", "--skip-serve-logs"]
    env = airflow_env(
        service,
        STACK_WORKER_ROLE=role,
        AIRFLOW__CORE__HOSTNAME_CALLABLE="devkit.topology.worker_hostname",
    )
    return Step(service, command, env)


def _entrypoint(compose: Mapping[str, Any], service: str) -> list[str]:
    spec = compose["services"][service]
    entry = spec.get("entrypoint") or []
    command = spec.get("command") or []
    parts = [str(p) for p in (*entry, *command)]
    if parts and parts[0] == "python":  # the image's Python
        parts[0] = str(_image_bin(compose, service) / "python")
    return [p.replace("$$", "$") for p in parts]


def _replace_paths(text: str, paths: Mapping[str, str]) -> str:
    for container, native in paths.items():
        text = text.replace(container, native)
    return text


def _write_auth_config(state: Path) -> None:
    """deploy/mlflow-auth.ini with its user database in the stack's folder."""
    text = (REPO / "deploy" / "mlflow-auth.ini").read_text()
    text = text.replace("sqlite:////var/lib/mlflow-auth/", f"sqlite:///{state}/")
    (state / "mlflow-auth.ini").write_text(text)


def compose_databases(compose: Mapping[str, Any]) -> list[str]:
    """The databases compose's deployment has: Postgres's ``POSTGRES_DB`` and those the
    ``postgres-databases`` step (deploy/ensure_databases.py) creates."""
    return [str(compose["services"]["postgres"]["environment"]["POSTGRES_DB"]), *EXTRA_DATABASES]


def _postgres_ready_then_databases(
    folder: Path, port: int, values: Mapping[str, str], database: str
) -> None:
    """Once Postgres answers: the role and ``database`` (POSTGRES_DB), as its image makes them."""
    deadline = time.monotonic() + 60
    while not (folder / f".s.PGSQL.{port}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("PostgreSQL did not open its socket within 60 s")
        time.sleep(0.2)
    for attempt in range(50):
        try:
            create_databases(
                folder,
                port,
                values["POSTGRES_USER"],
                values["POSTGRES_PASSWORD"],
                [database],
            )
            return
        except subprocess.CalledProcessError:
            if attempt == 49:
                raise
            time.sleep(0.2)


def passwords_file(state: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads((state / "secrets" / "passwords.json").read_text())
    return data
