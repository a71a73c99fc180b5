"""docker-compose.yaml invariants (no Docker engine runs here, so the file is checked as data)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ONE_SHOT = {name for name, s in SERVICES.items() if s.get("restart") == "no"}
#: Variables that third-party programs read (not our code), allowed in the environment.
THIRD_PARTY = re.compile(
    r"^(AIRFLOW__|POSTGRES_|MINIO_|MLFLOW_S3_ENDPOINT_URL$|"
    r"MLFLOW_SERVER_ENABLE_JOB_EXECUTION$|PG(HOST|PORT|USER|PASSWORD|DATABASE)$|AWS_DEFAULT_REGION$"
    r"|ML_BUCKET$|AIRFLOW_ADMIN_|MLFLOW_TRACKING_(USERNAME|PASSWORD)$|"
    r"MLFLOW_AUTH_|MLFLOW_BACKEND_STORE_URI$|MLFLOW_FLASK_SERVER_SECRET_KEY$|"
    r"ML_GPU_WORKERS$)"
)


def _code_reads() -> set[str]:
    names: set[str] = set()
    pattern = re.compile(r"""(?:environ(?:\.get)?|env\.get|getenv)\(?\[?\s*["']([A-Z][A-Z0-9_]+)""")
    for folder in ("ml", "dags", "plugins", "deploy"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(pattern.findall(path.read_text()))
    from deploy.check_env import SECRETS  # read by name from a table
    from ml.params import PARAMETERS  # form defaults the deployment sets

    return names | set(SECRETS) | {p.env for p in PARAMETERS.values() if p.env}


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        if name not in ONE_SHOT:
            assert "healthcheck" in service, f"{name} has no healthcheck"
            assert service["healthcheck"]["test"], name


def test_dependencies_wait_on_health_or_completion() -> None:
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must state conditions"
        for target, rule in depends.items():
            assert target in SERVICES and target != name, (name, target)
            wanted = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert rule["condition"] == wanted, (name, target, rule)
    waited = {t for s in SERVICES.values() for t in s.get("depends_on", {})}
    assert waited >= ONE_SHOT  # every init job gates something


TARGETS = {
    "airflow-apiserver": "airflow",
    "airflow-scheduler": "airflow",
    "airflow-dag-processor": "airflow",
    "airflow-triggerer": "airflow",
    "airflow-init": "airflow",
    "config-check": "airflow",
    "store-init": "airflow",
    "airflow-worker": "worker",
    "airflow-worker-gpu": "worker",
    "mlflow": "mlflow",
    "postgres-databases": "mlflow",
    "mlflow-users": "mlflow",
}
#: Variables set in the shell when building, not in .env.
BUILD_ONLY = {"ML_CODE_VERSION"}


def test_each_service_runs_the_image_it_needs() -> None:
    """Airflow's own services run the image without torch; both workers the one with it."""
    for name, target in TARGETS.items():
        service = SERVICES[name]
        assert service["build"]["context"] == "." and service["build"]["target"] == target
        assert service["image"].startswith(f"image-sentiment-pipeline/{target}:"), name
        if service.get("restart") != "no" or name == "airflow-init":
            assert service.get("init") is True, f"{name} runs without an init process"
    for name in (
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
    ):
        assert (
            SERVICES[name]["depends_on"]["airflow-init"]["condition"]
            == "service_completed_successfully"
        )
    for name in ("airflow-worker", "airflow-worker-gpu"):  # through the API server, not the DB
        assert SERVICES[name]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    init = " ".join(SERVICES["airflow-init"]["command"])
    assert "airflow db migrate" in init and "passwords.json" in init
    assert 'airflow pools set gpu "$${ML_GPU_WORKERS}"' in init


def _target_block(name: str) -> str:
    text = (REPO / "Dockerfile").read_text()
    start = re.search(rf"^FROM \S+ AS {re.escape(name)}$", text, re.M)
    assert start, name
    rest = text[start.end() :]
    following = re.search(r"^FROM ", rest, re.M)
    return rest[: following.start()] if following else rest


def _locked(path: str) -> dict[str, str]:
    """Package -> version of a hashed lock (every entry must carry a hash)."""
    text = (REPO / path).read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M))
    assert pins and text.count("--hash=sha256:") >= len(pins), path
    return {name.lower().replace("_", "-"): version for name, version in pins.items()}


def test_each_image_installs_its_own_hashed_lock_before_the_code() -> None:
    """Each target installs a hashed lock of its own with the pinned installer; only the
    workers' has torch; the code is copied after the lock and the code version set last, so a
    code change never reinstalls the packages."""
    dockerfile = (REPO / "Dockerfile").read_text()
    installs = {
        target: re.findall(r"--require-hashes -r /tmp/build/(\S+)", _target_block(target))
        for target in ("airflow", "mlflow", "worker")
    }
    assert installs == {
        "airflow": ["airflow.txt"],
        "mlflow": ["mlflow.txt"],
        "worker": ["requirements.txt"],
    }
    assert "--index-url" not in dockerfile and "--extra-index-url" not in dockerfile
    assert "installer.txt" in _target_block("base")
    assert set(_locked("deploy/locks/installer.txt")) == {"uv"}
    for lock in ("deploy/locks/airflow.txt", "deploy/locks/mlflow.txt"):
        pins = _locked(lock)
        assert not {"torch", "torchvision"} & set(pins), lock
        assert not any(name.startswith("nvidia-") for name in pins), lock
        assert not {"pytest", "moto", "mypy", "ruff"} & set(pins), lock
    runtime = _locked("requirements.txt")
    assert runtime["torch"] == "2.14.1" and "pytest" not in runtime and "moto" not in runtime
    for target in ("airflow", "mlflow", "worker"):
        lines = [line for line in _target_block(target).splitlines() if line.strip()]
        install = next(i for i, line in enumerate(lines) if "--require-hashes" in line)
        code = next(i for i, line in enumerate(lines) if line.startswith("COPY --from=code"))
        assert install < code, target
        assert lines[-2:] == [
            "ARG ML_CODE_VERSION=unknown",
            "ENV ML_CODE_VERSION=${ML_CODE_VERSION}",
        ]


def test_the_locks_agree_and_follow_pyproject() -> None:
    from deploy.extras import requirements

    dev = _locked("requirements-dev.txt")
    for lock in (
        "requirements.txt",
        "deploy/locks/airflow.txt",
        "deploy/locks/mlflow.txt",
        "deploy/locks/installer.txt",
    ):
        for name, version in _locked(lock).items():
            assert dev[name] == version, (lock, name)
    groups = ("core", "torch", "airflow", "mlflow-server", "dev")
    for spec in requirements(list(groups), REPO / "pyproject.toml"):
        name = re.split(r"[=<>\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-")
        assert name in dev, f"{spec} is declared in pyproject.toml but not in the lock"


def test_every_mounted_folder_exists_in_the_image_with_its_owner() -> None:
    """A named volume takes the owner of the folder it mounts over; a folder the image lacks
    is created by Docker as root's, and the airflow user cannot write to it."""
    dockerfile = (REPO / "Dockerfile").read_text()
    made = dockerfile[dockerfile.index("mkdir -p") :].split("&&")[0]
    folders = [f for f in made.split()[2:] if f != "\\"]
    owned = dockerfile[dockerfile.index("chown -R airflow:0") :].splitlines()[0].split()[3:]
    for name in TARGETS:
        for volume in SERVICES[name].get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith(("./", "/")):
                continue  # a bind mount from the host
            assert any(f == target or f.startswith(target + "/") for f in folders), (
                f"{name} mounts {target}, which the image does not create"
            )
            assert any(target == o or target.startswith(o + "/") for o in owned), target


def test_every_documented_setting_reaches_the_containers() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Configuration reference") :]
    documented = set(re.findall(r"`(ML_[A-Z_]+)`", table))
    env = set(COMPOSE["x-airflow-common"]["environment"])
    for worker in ("airflow-worker", "airflow-worker-gpu", "airflow-init"):
        env |= set(SERVICES[worker].get("environment", {}))
    not_in_env = {"ML_DEBUG": "a CLI switch", "ML_CODE_VERSION": "set when the images are built"}
    assert documented - env - set(not_in_env) == set()
    dockerfile = (REPO / "Dockerfile").read_text()
    assert (
        "ARG ML_CODE_VERSION" in dockerfile
        and "ENV ML_CODE_VERSION=${ML_CODE_VERSION}" in dockerfile
    )
    assert COMPOSE["x-build"]["args"]["ML_CODE_VERSION"].startswith("${ML_CODE_VERSION")
    for env in (COMPOSE["x-airflow-common"]["environment"], COMPOSE["x-worker-env"]):
        assert env["AIRFLOW__API__SECRET_KEY"].startswith("${AIRFLOW_API_SECRET_KEY:?")


def test_the_gpu_worker_proves_its_gpus() -> None:
    worker = SERVICES["airflow-worker-gpu"]
    health = " ".join(worker["healthcheck"]["test"])
    assert "torch.cuda.is_available()" in health and "ML_TRAIN_GPUS" in health
    assert worker["environment"]["ML_TRAIN_DEVICE"] == "cuda"
    devices = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["count"] == "${ML_TRAIN_GPUS:-1}"
    assert worker["environment"]["ML_TRAIN_GPUS"] == "${ML_TRAIN_GPUS:-1}"
    assert _seconds(worker["stop_grace_period"]) >= 300
    assert _seconds(SERVICES["airflow-worker"]["stop_grace_period"]) >= 60


def _seconds(text: str) -> int:
    number, unit = int(text[:-1]), text[-1]
    return number * {"s": 1, "m": 60, "h": 3600}[unit]


def test_third_party_images_are_pinned() -> None:
    for name, service in SERVICES.items():
        if name in TARGETS:
            continue
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?(-[a-z]+)?|RELEASE\.[0-9TZ-]+", tag), (
            f"{name} uses {image}: pin a version"
        )
    assert "minio/mc" not in (REPO / "docker-compose.yaml").read_text()


def test_the_mlflow_ui_follows_the_public_host() -> None:
    command = SERVICES["mlflow"]["command"]
    hosts = command[command.index("--allowed-hosts") + 1]
    assert "${MLFLOW_PUBLIC_HOST" in hosts
    assert COMPOSE["x-airflow-common"]["environment"]["MLFLOW_UI_URL"].startswith(
        "${MLFLOW_PUBLIC_URL"
    )


def test_secrets_are_generated_and_placeholders_refused(tmp_path: Any) -> None:
    from deploy.check_env import IN_URLS, SECRETS, problems

    def parse(text: str) -> dict[str, str]:
        return dict(
            line.split("=", 1)
            for line in text.splitlines()
            if "=" in line and not line.startswith("#")
        )

    example = parse((REPO / ".env.example").read_text())
    found = problems(example)
    assert {p.split()[0] for p in found} == set(SECRETS)  # every secret named
    out = tmp_path / ".env"
    done = subprocess.run(
        [sys.executable, "-m", "deploy.init_env", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    generated = parse(out.read_text())
    assert problems(generated) == []
    # A password that would change the meaning of a database or broker URL is refused.
    for name, value in (("POSTGRES_PASSWORD", "pa55@evil:1/x"), ("REDIS_PASSWORD", "a/b#cdefghij")):
        found = problems({**generated, name: value})
        assert len(found) == 1 and found[0].startswith(f"{name} has characters"), found
    second = tmp_path / "second.env"
    subprocess.run(
        [sys.executable, "-m", "deploy.init_env", "--out", str(second)], check=True, cwd=REPO
    )
    again_generated = parse(second.read_text())
    for name in SECRETS:  # fresh values each time, never a fixed default
        assert generated[name] != again_generated[name], name
    again = subprocess.run(
        [sys.executable, "-m", "deploy.init_env", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites silently
    referenced = set(
        re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", (REPO / "docker-compose.yaml").read_text())
    )
    assert referenced - BUILD_ONLY <= set(generated), referenced - set(generated)
    check = subprocess.run(
        [sys.executable, "-m", "deploy.check_env"],
        cwd=REPO,
        env={**os.environ, **example},
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 1 and "python3 -m deploy.init_env" in check.stderr
    assert SERVICES["config-check"]["entrypoint"] == ["python", "-m", "deploy.check_env"]
    wanted = set(SECRETS) | set(IN_URLS)
    checked = set(SERVICES["config-check"]["environment"])
    assert checked >= wanted, wanted - checked
    for name in ("postgres", "redis", "minio"):
        assert (
            SERVICES[name]["depends_on"]["config-check"]["condition"]
            == "service_completed_successfully"
        )


def test_the_image_leaves_out_what_it_does_not_run() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".env", ".venv*", "tests", "benchmarks", ".run"):
        assert path in ignored, path


def test_environment_matches_what_the_code_reads() -> None:
    env = COMPOSE["x-worker-env"]
    reads = _code_reads()
    for needed in (
        "ML_STORE",
        "ML_ALLOW_NETWORKS",
        "ML_CSV",
        "ML_SCHEDULE",
        "ML_GPU_QUEUE",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_UI_URL",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert needed in env, needed
    for service in SERVICES.values():
        for name in service.get("environment", {}):
            if name.startswith(("ML_", "MLFLOW_")) and not THIRD_PARTY.match(name):
                assert name in reads, f"{name} is set in docker-compose.yaml but no code reads it"
    assert {"ML_STORE", "ML_ALLOW_NETWORKS", "MLFLOW_UI_URL", "ML_GPU_QUEUE"} <= reads


def test_gpu_worker_serves_the_train_tasks_queue() -> None:
    worker = SERVICES["airflow-worker-gpu"]
    command = worker["command"]
    queue = command[command.index("--queues") + 1]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    env = COMPOSE["x-airflow-common"]["environment"]
    code = (
        "import importlib.util, json, sys; spec = importlib.util.spec_from_file_location("
        "'d', sys.argv[1]); m = importlib.util.module_from_spec(spec); "
        "spec.loader.exec_module(m); dag = m.image_sentiment(); "
        "print(json.dumps(dag.get_task('train').queue))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "dags" / "image_sentiment.py")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ML_GPU_QUEUE": env["ML_GPU_QUEUE"]},
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == queue == "gpu"
    default = SERVICES["airflow-worker"]["command"]
    assert default[default.index("--queues") + 1] == "default"


def test_no_credentials_in_the_file_and_all_in_the_example() -> None:
    text = (REPO / "docker-compose.yaml").read_text()
    secret = re.compile(r"(PASSWORD|SECRET|FERNET|_KEY)", re.IGNORECASE)
    for service in [COMPOSE["x-airflow-common"], *SERVICES.values()]:
        for name, value in (service.get("environment") or {}).items():
            if secret.search(name) and not name.endswith("_FILE") and value not in ("", None):
                assert "${" in str(value), f"{name} is hard-coded"
    for line in re.findall(r"postgresql\S*://[^\s\"']+", text):
        assert "${POSTGRES_PASSWORD" in line
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    example = set(re.findall(r"^([A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.M))
    assert referenced - BUILD_ONLY <= example, referenced - example


def test_mlflow_server_is_reachable_by_name_and_proxies_artifacts() -> None:
    command = SERVICES["mlflow"]["command"]
    hosts = command[command.index("--allowed-hosts") + 1]
    assert "mlflow" in hosts.split(",") and "localhost" in hosts.split(",")
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    env = SERVICES["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "ensure_bucket" in " ".join(SERVICES["store-init"]["entrypoint"])


def test_images_carry_the_code_and_the_lock() -> None:
    """Read from the COPY instructions themselves, never from comments."""
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            copied.update(w for w in words[1:-1] if not w.startswith("--"))
    assert {"dags", "plugins", "ml", "deploy", "requirements.txt"} <= copied
    assert {"deploy/locks/airflow.txt", "deploy/locks/mlflow.txt"} <= copied


def _command_lines(service: dict[str, Any]) -> list[str]:
    """Everything a service runs as argv: command, entrypoint and health check."""
    found = []
    for key in ("command", "entrypoint"):
        value = service.get(key)
        found.append(" ".join(value) if isinstance(value, list) else str(value or ""))
    test = (service.get("healthcheck") or {}).get("test") or []
    if isinstance(test, list) and test[:1] in (["CMD"], ["CMD-SHELL"]):
        test = test[1:]  # compose's marker of how to run the rest, not part of it
    found.append(" ".join(test) if isinstance(test, list) else str(test))
    return found


def test_no_password_on_any_command_line() -> None:
    """Secrets go through the environment or files; argv is visible to every local user.

    A command may not interpolate a secret (``${X}`` at compose time, or ``$$X`` passed to a
    program at run time) nor carry ``user:password@`` in a URL; a shell test of whether a
    secret is set (``[[ -z ... ]]``, a builtin) passes nothing to another process, nor do a
    here-document's body (the program's stdin) and a ``NAME="$$SECRET" program`` prefix (its
    environment).
    """
    name_re = r"[A-Z_]*(PASSWORD|SECRET|FERNET_KEY|SECRET_KEY)[A-Z_]*"
    interpolated = re.compile(r"\$\$?\{?" + name_re)
    userinfo = re.compile(r"://[^/\s:@$]+:[^@\s]+@")
    heredoc = re.compile(r"<<-?\s*'?(\w+)'?\s*\n.*?\n\s*\1\s*$", re.S | re.M)
    env_prefix = re.compile(r"(^|;|&&|\|\|)\s*[A-Z_]+=\"?\$\$\{?" + name_re + r"\}?\"?\s+")
    for name, service in SERVICES.items():
        for command in _command_lines(service):
            argv = env_prefix.sub(r"\1 ", heredoc.sub("<<STDIN", command))
            for line in argv.splitlines():
                if line.strip().startswith(("if [[ -z", "#", "echo")):
                    continue
                assert not interpolated.search(line), f"{name} puts a secret in argv: {line}"
                assert not userinfo.search(line), f"{name} puts credentials in argv: {line}"


def test_mlflow_is_not_published_without_authentication() -> None:
    mlflow = SERVICES["mlflow"]
    command = mlflow["command"]
    published = bool(mlflow.get("ports"))
    if published:
        assert command[command.index("--app-name") + 1] == "basic-auth"
        path = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
        assert path.startswith("/opt/airflow/deploy/")
        config = (REPO / "deploy" / path.rsplit("/", 1)[1]).read_text()
        assert re.search(r"^default_permission\s*=\s*NO_PERMISSIONS", config, re.M)
        assert "admin_password" not in config.replace("# ", "")
        assert "${MLFLOW_ADMIN_PASSWORD" in str(mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"])
    # the pipeline signs in as its own user, never as the admin
    workers = COMPOSE["x-worker-env"]
    assert "${MLFLOW_PIPELINE_PASSWORD" in str(workers["MLFLOW_TRACKING_PASSWORD"])
    assert "${MLFLOW_PIPELINE_USER" in str(workers["MLFLOW_TRACKING_USERNAME"])
    users = SERVICES["mlflow-users"]
    assert users["entrypoint"] == ["python", "-m", "deploy.mlflow_users"]
    assert "${MLFLOW_ADMIN_PASSWORD" in str(users["environment"]["MLFLOW_TRACKING_PASSWORD"])
    for worker in ("airflow-worker", "airflow-worker-gpu"):
        assert SERVICES[worker]["depends_on"]["mlflow-users"] == {
            "condition": "service_completed_successfully"
        }
    holders = {
        name
        for name, service in SERVICES.items()
        if "MLFLOW_ADMIN_PASSWORD" in json.dumps(service.get("environment", {}))
    }
    assert holders == {"config-check", "mlflow", "mlflow-users"}


ADMIN = ("admin", "pw-for-test-1")


@pytest.fixture(scope="module")
def auth_mlflow(tmp_path_factory: Any) -> Any:
    """MLflow's basic-auth app with deploy/mlflow-auth.ini, run for real on SQLite."""
    import contextlib
    import signal

    from devkit.servers import free_port, wait_http

    folder = tmp_path_factory.mktemp("auth-mlflow")
    config = (
        (REPO / "deploy" / "mlflow-auth.ini")
        .read_text()
        .replace("sqlite:////var/lib/mlflow-auth/basic_auth.db", f"sqlite:///{folder / 'auth.db'}")
    )
    (folder / "auth.ini").write_text(config)
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-test",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder / 'mlflow.db'}",
    }
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--default-artifact-root", str(folder / "artifacts")]
    log = (folder / "server.log").open("wb")
    server = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", timeout=120, process=server)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


def _get(url: str, user: tuple[str, str] | None) -> int:
    import base64
    import urllib.error
    import urllib.request

    headers = {}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
@pytest.mark.slow
def test_the_deployments_mlflow_auth_config_refuses_anonymous_requests(auth_mlflow: str) -> None:
    search = f"{auth_mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(search, None) == 401
    assert _get(search, ADMIN) == 200


def _users_step(base: str, password: str) -> subprocess.CompletedProcess[str]:
    """``python -m deploy.mlflow_users`` as compose's mlflow-users service runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ML_MODEL"))}
    env.update(
        MLFLOW_TRACKING_URI=base,
        MLFLOW_TRACKING_USERNAME=ADMIN[0],
        MLFLOW_TRACKING_PASSWORD=ADMIN[1],
        MLFLOW_PIPELINE_USER="pipeline",
        MLFLOW_PIPELINE_PASSWORD=password,
        ML_MODEL_NAME="image-sentiment",
    )
    return subprocess.run(
        [sys.executable, "-m", "deploy.mlflow_users"],
        env={**env, "PYTHONPATH": str(REPO)},  # as the image sets it
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )


@pytest.mark.integration
@pytest.mark.slow
def test_the_pipeline_signs_in_as_an_ordinary_user_scoped_to_its_resources(
    auth_mlflow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mlflow-users step against the real auth app: the pipeline's user works on the
    pipeline's experiment and model (made before it by an admin, or by itself), and cannot
    touch another team's, nor manage users."""
    from mlflow import MlflowClient

    from ml.errors import PipelineError
    from ml.registry import _ensure_registered_model

    base = auth_mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    admin = MlflowClient(base)
    # made by an admin before the step: an upgrade from a deployment that used the admin
    pipeline_experiment = admin.create_experiment("image-sentiment")
    admin.create_registered_model("image-sentiment")
    other_experiment = admin.create_experiment("other-team")
    admin.create_registered_model("other-team-model")

    first = _users_step(base, "first-password-1")
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    assert "experiment image-sentiment" in first.stdout and "model image-sentiment" in first.stdout
    again = _users_step(base, "second-password-2")  # a rotated .env, next `up`
    assert again.returncode == 0 and "password set" in again.stdout, again.stderr
    users_api = f"{base}/api/2.0/mlflow/users/get?username=admin"
    assert _get(users_api, ("pipeline", "first-password-1")) == 401
    assert _get(users_api, ("pipeline", "second-password-2")) == 403  # not an admin

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "second-password-2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(base)
    run = client.create_run(pipeline_experiment)
    client.log_metric(run.info.run_id, "valid_macro_f1", 0.5)
    _ensure_registered_model(client, "image-sentiment")
    client.set_registered_model_tag("image-sentiment", "checked", "yes")
    # a model name nobody uses yet: the pipeline makes it, and manages it
    _ensure_registered_model(client, "image-sentiment-v2")
    client.set_registered_model_tag("image-sentiment-v2", "checked", "yes")
    new = client.create_experiment("image-sentiment-trial")
    client.create_run(new)
    # another team's work stays out of reach, with one clear message for the model
    with pytest.raises(Exception, match="PERMISSION_DENIED|403"):
        client.create_run(other_experiment)
    with pytest.raises(PipelineError, match="may not use it.*grant that user MANAGE"):
        _ensure_registered_model(client, "other-team-model")

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    assert not admin.get_registered_model("other-team-model").tags
    refused = _users_step(base, "")
    assert refused.returncode == 1 and "MLFLOW_PIPELINE_PASSWORD" in refused.stderr
