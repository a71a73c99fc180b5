"""Register a training run's model in the MLflow model registry and manage its aliases.

Every registered run becomes a version with alias ``challenger``. Alias ``champion`` moves to it
only when its test macro-F1 beats the current champion's by ``margin`` (the first version becomes
champion). Consumers load ``models:/<name>@champion``. Registering the same run again creates no
second version.

Usage: ``register_model(run_id, name="image-sentiment", margin=0.01)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ml.containment import check_name
from ml.errors import PipelineError
from ml.redact import get_logger, redact_text, redact_url

log = get_logger(__name__)

DEFAULT_MODEL_NAME = "image-sentiment"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
DESCRIPTION = (
    "Image sentiment classifier: ResNet fine-tuned to 5 classes (Highly negative, Negative, "
    "Neutral, Positive, Highly positive). Input: float32 RGB in [0, 1], shape (N, 3, H, W); "
    "output: class probabilities. Load the current best with models:/{name}@champion; "
    "`python -m ml predict` handles images end to end."
)


def code_version() -> str:
    """The code that trained the model: $ML_CODE_VERSION, else the git commit, else the package."""
    from ml import __version__

    git = shutil.which("git")
    if os.environ.get("ML_CODE_VERSION") or git is None:
        return os.environ.get("ML_CODE_VERSION") or __version__
    try:
        done = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
            check=False,
        )
    except OSError:
        return __version__
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else __version__


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _missing(exc: Exception) -> bool:
    return (
        "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", ""))
        or "not found" in str(exc).lower()
    )


def _exists(exc: Exception) -> bool:
    return "RESOURCE_ALREADY_EXISTS" in str(getattr(exc, "error_code", "")) or (
        "already exists" in str(exc).lower()
    )


def tracking_uri() -> str:
    """Where MLflow sends requests, with any credentials in it redacted (for messages)."""
    import mlflow

    return redact_url(str(mlflow.get_tracking_uri()))


def check_tracking_server(timeout: float = 20.0) -> None:
    """Fail within about ``timeout`` seconds, with one clear message, when the MLflow tracking
    server does not answer (MLflow's own client retries for minutes, then blames the request).

    Any HTTP answer counts as reachable; local stores (``file:``, ``sqlite:``) are not probed.
    """
    import mlflow
    import urllib3

    uri = str(mlflow.get_tracking_uri())
    if not uri.lower().startswith(("http://", "https://")):
        return
    probe = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            urllib3.request(
                "GET",
                probe,
                timeout=urllib3.Timeout(connect=min(5.0, max(left, 0.1)), read=min(10.0, left)),
                retries=False,
                redirect=False,
            )
            return
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            reason = type(exc).__name__
        if time.monotonic() + 1.0 >= deadline:
            break
        time.sleep(1.0)
    raise PipelineError(
        f"cannot reach the MLflow tracking server at {tracking_uri()} ({reason} for "
        f"{timeout:g}s); start it, or set MLFLOW_TRACKING_URI to where it runs"
    )


def _run_versions(client: Any, name: str, run_id: str) -> list[int]:
    return sorted(
        int(v.version) for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    )


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        try:
            client.create_registered_model(name, description=DESCRIPTION.format(name=name))
        except MlflowException as again:
            if not _exists(again):  # created by a registration running at the same time
                raise


def _version_for_run(client: Any, name: str, run_id: str, model_uri: str) -> tuple[str, bool]:
    """The one version of ``name`` for ``run_id``: (version, whether this call created it).

    Two registrations of the same run at the same time may both create a version; each then
    looks again, the lowest version wins, and a call whose version lost deletes it.
    """
    import mlflow

    existing = _run_versions(client, name, run_id)
    if existing:
        return str(existing[0]), False
    mine = int(mlflow.register_model(model_uri, name).version)
    winner = _run_versions(client, name, run_id)[0]
    if winner != mine:
        log.info("run %s was registered at the same time as version %d; keeping it", run_id, winner)
        client.delete_model_version(name, str(mine))
        return str(winner), False
    return str(mine), True


def register_model(
    run_id: str,
    *,
    name: str = DEFAULT_MODEL_NAME,
    margin: float = 0.0,
    orchestrator_run_id: str = "",
    client: Any | None = None,
) -> dict[str, Any]:
    """Create (or find) the version for ``run_id``; set challenger; maybe promote to champion."""
    check_name(name, "model_name")
    if not _RUN_ID.fullmatch(run_id or ""):
        raise PipelineError(f"--run-id must be an MLflow run id (32 hex digits), got {run_id!r}")
    if client is None:
        check_tracking_server()
        client = _client()
    run, model_uri, score = _finished_run(client, run_id)
    _ensure_registered_model(client, name)
    version, created = _version_for_run(client, name, run_id, model_uri)
    if created:
        _describe_version(client, name, version, run, orchestrator_run_id)
    else:
        log.info("run %s is version %s of %s", run_id, version, name)
    client.set_registered_model_alias(name, "challenger", version)
    promoted = _promote(client, name, version, score, margin)
    aliases = sorted(client.get_model_version(name, version).aliases)
    current = _alias(client, name, "champion")
    return {
        "model": name,
        "version": int(version),
        "aliases": aliases,
        "promoted": promoted,
        "created": created,
        "run_id": run_id,
        "metrics": {"test_macro_f1": score, "test_accuracy": run.data.metrics.get("test_accuracy")},
        "champion_version": int(current.version) if current else None,
        "model_uri": f"models:/{name}@champion",
    }


def _finished_run(client: Any, run_id: str) -> tuple[Any, str, float]:
    """The run, its model's URI and its test macro-F1; clear errors when it is not there."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if not _missing(exc):
            raise PipelineError(
                f"the MLflow tracking server at {tracking_uri()} failed to answer for run "
                f"{run_id}: {redact_text(str(exc).splitlines()[0][:200])}"
            ) from None
        raise PipelineError(
            f"no MLflow run {run_id!r} at {tracking_uri()}; pass the run_id that train printed"
        ) from None
    model_uri = run.data.tags.get("model_uri")
    score = run.data.metrics.get("test_macro_f1")
    if not model_uri or score is None:
        raise PipelineError(
            f"run {run_id} has no logged model or test metrics; did training "
            "finish? (rerun the train stage: it resumes)"
        )
    return run, str(model_uri), float(score)


def _describe_version(
    client: Any, name: str, version: str, run: Any, orchestrator_run_id: str
) -> None:
    """Tags and description of a new version: where it came from and how it scored."""
    metrics = run.data.metrics
    tags = {
        "dataset": run.data.tags.get("dataset", ""),
        "split": run.data.tags.get("split", ""),
        "split_counts": _split_counts(client, run.info.run_id),
        "code_version": code_version(),
        "test_macro_f1": f"{metrics['test_macro_f1']:.6f}",
        "test_accuracy": f"{metrics.get('test_accuracy', float('nan')):.6f}",
        "weights": run.data.tags.get("weights", ""),
    }
    orchestrator = orchestrator_run_id or run.data.tags.get("orchestrator_run_id", "")
    if orchestrator:
        tags["orchestrator_run_id"] = orchestrator
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(
        name,
        version,
        description=f"Run {run.info.run_id}: test macro-F1 {metrics['test_macro_f1']:.4f}, "
        f"accuracy {metrics.get('test_accuracy', float('nan')):.4f}.",
    )


def _promote(client: Any, name: str, version: str, score: float, margin: float) -> bool:
    """Move ``champion`` to ``version`` when it beats the champion by ``margin``."""
    champion = _alias(client, name, "champion")
    if champion is not None and champion.version == version:
        return False
    champion_score = (
        None
        if champion is None
        else client.get_run(champion.run_id).data.metrics.get("test_macro_f1")
    )
    if champion is not None and champion_score is not None and score <= champion_score + margin:
        log.info(
            "version %s stays challenger: macro-F1 %.4f does not beat champion %s (%.4f) by %.4f",
            version,
            score,
            champion.version,
            champion_score,
            margin,
        )
        return False
    client.set_registered_model_alias(name, "champion", version)
    log.info("version %s of %s is the new champion (test macro-F1 %.4f)", version, name, score)
    return True


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _split_counts(client: Any, run_id: str) -> str:
    try:
        path = client.download_artifacts(run_id, "data/split_counts.json")
        counts = json.loads(Path(path).read_text())
        return json.dumps({k: sum(v.values()) for k, v in counts.items()})
    except Exception:  # an older run without the artifact is still registrable
        return ""
