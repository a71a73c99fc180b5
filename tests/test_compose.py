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
IMAGE = COMPOSE["x-airflow-common"]["image"]
#: Variables that third-party programs read (not our code), allowed in the environment.
THIRD_PARTY = re.compile(r"^(AIRFLOW__|POSTGRES_|MINIO_|MLFLOW_S3_ENDPOINT_URL$|"
                         r"MLFLOW_SERVER_ENABLE_JOB_EXECUTION$|DUMB_INIT_SETSID$|AWS_DEFAULT_REGION$"
                         r"|ML_BUCKET$|AIRFLOW_ADMIN_|MLFLOW_TRACKING_(USERNAME|PASSWORD)$|"
                         r"MLFLOW_AUTH_|MLFLOW_BACKEND_STORE_URI$|MLFLOW_FLASK_SERVER_SECRET_KEY$|MC_HOST_)")


def _code_reads() -> set[str]:
    names: set[str] = set()
    pattern = re.compile(r"""(?:environ(?:\.get)?|env\.get|getenv)\(?\[?\s*["']([A-Z][A-Z0-9_]+)""")
    for folder in ("ml", "dags", "plugins"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(pattern.findall(path.read_text()))
    return names


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
            wanted = ("service_completed_successfully" if target in ONE_SHOT
                      else "service_healthy")
            assert rule["condition"] == wanted, (name, target, rule)
    waited = {t for s in SERVICES.values() for t in s.get("depends_on", {})}
    assert waited >= ONE_SHOT  # every init job gates something


def test_airflow_services_share_the_common_block() -> None:
    airflow = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
               "airflow-triggerer", "airflow-worker", "airflow-worker-gpu", "airflow-init"}
    assert airflow <= set(SERVICES)
    for name in airflow:
        service = SERVICES[name]
        assert service["image"] == IMAGE and service["build"] == "."
        if name != "airflow-init":
            assert service["depends_on"]["airflow-init"]["condition"] == \
                "service_completed_successfully"
    init = " ".join(SERVICES["airflow-init"]["command"])
    assert "airflow db migrate" in init and "passwords.json" in init
    assert "airflow pools set gpu 1" in init


def test_environment_matches_what_the_code_reads() -> None:
    env = COMPOSE["x-airflow-common"]["environment"]
    reads = _code_reads()
    for needed in ("ML_STORE", "ML_ALLOW_NETWORKS", "ML_CSV", "ML_SCHEDULE", "ML_GPU_QUEUE",
                   "MLFLOW_TRACKING_URI", "MLFLOW_UI_URL", "AWS_ENDPOINT_URL",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
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
    code = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location("
            "'d', sys.argv[1]); m = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); dag = m.image_sentiment(); "
            "print(json.dumps(dag.get_task('train').queue))")
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "dags" / "image_sentiment.py")],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "ML_GPU_QUEUE": env["ML_GPU_QUEUE"]})
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
        assert "${POSTGRES_PASSWORD}" in line
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", text))
    example = set(re.findall(r"^([A-Z_]+)=", (REPO / ".env.example").read_text(), re.M))
    assert referenced <= example, referenced - example


def test_mlflow_server_is_reachable_by_name_and_proxies_artifacts() -> None:
    command = SERVICES["mlflow"]["command"]
    hosts = command[command.index("--allowed-hosts") + 1]
    assert "mlflow" in hosts.split(",") and "localhost" in hosts.split(",")
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    env = SERVICES["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mc mb" in " ".join(SERVICES["minio-init"]["command"])


@pytest.mark.parametrize("path", ["ml", "dags", "plugins", "requirements.txt"])
def test_image_carries_the_code_and_the_lock(path: str) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert path in dockerfile


def _command_lines(service: dict[str, Any]) -> list[str]:
    """Everything a service runs as argv: command, entrypoint and health check."""
    found = []
    for key in ("command", "entrypoint"):
        value = service.get(key)
        found.append(" ".join(value) if isinstance(value, list) else str(value or ""))
    test = (service.get("healthcheck") or {}).get("test") or []
    found.append(" ".join(test) if isinstance(test, list) else str(test))
    return found


def test_no_password_on_any_command_line() -> None:
    """Secrets go through the environment or files; argv is visible to every local user.

    A command may not interpolate a secret (``${X}`` at compose time, or ``$$X`` passed to a
    program at run time) nor carry ``user:password@`` in a URL; a shell test of whether a
    secret is set (``[[ -z ... ]]``, a builtin) passes nothing to another process.
    """
    name_re = r"[A-Z_]*(PASSWORD|SECRET|FERNET_KEY|SECRET_KEY)[A-Z_]*"
    interpolated = re.compile(r"\$\$?\{?" + name_re)
    userinfo = re.compile(r"://[^/\s:@$]+:[^@\s]+@")
    for name, service in SERVICES.items():
        for text in _command_lines(service):
            for line in text.splitlines():
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
    common = COMPOSE["x-airflow-common"]["environment"]
    assert "${MLFLOW_ADMIN_PASSWORD" in str(common["MLFLOW_TRACKING_PASSWORD"])


@pytest.mark.integration
@pytest.mark.slow
def test_the_deployments_mlflow_auth_config_refuses_anonymous_requests(tmp_path: Any) -> None:
    """The basic-auth app with deploy/mlflow-auth.ini, run for real: 401 without a user."""
    import base64
    import contextlib
    import signal
    import urllib.error
    import urllib.request

    from ml.demo import free_port
    from tests.servers import wait_http

    config = (REPO / "deploy" / "mlflow-auth.ini").read_text().replace(
        "sqlite:////var/lib/mlflow-auth/basic_auth.db", f"sqlite:///{tmp_path / 'auth.db'}")
    (tmp_path / "auth.ini").write_text(config)
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "pw-for-test-1",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-test",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", timeout=120, process=server)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(search, timeout=10)
        assert anonymous.value.code == 401
        token = base64.b64encode(b"admin:pw-for-test-1").decode()
        request = urllib.request.Request(search, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()
