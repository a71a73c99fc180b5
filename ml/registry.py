"""Register a training run's model in the MLflow model registry and manage its aliases.

Every registered run becomes a version with alias ``challenger``. Alias ``champion`` moves to it
only when its test macro-F1 beats the current champion's by ``margin`` (the first version becomes
champion). Consumers load ``models:/<name>@champion``. Registering the same run again creates no
second version.

Usage: ``register_model(run_id, name="image-sentiment", margin=0.01)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ml.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "image-sentiment"
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


def register_model(
    run_id: str,
    *,
    name: str = DEFAULT_MODEL_NAME,
    margin: float = 0.0,
    orchestrator_run_id: str = "",
    client: Any | None = None,
) -> dict[str, Any]:
    """Create (or find) the version for ``run_id``; set challenger; maybe promote to champion."""
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise PipelineError(
            f"no MLflow run {run_id!r} at {_tracking_uri()}: {str(exc).splitlines()[0][:200]}"
        ) from None
    model_uri = run.data.tags.get("model_uri")
    score = run.data.metrics.get("test_macro_f1")
    if not model_uri or score is None:
        raise PipelineError(
            f"run {run_id} has no logged model or test metrics; did training "
            "finish? (rerun the train stage: it resumes)"
        )
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        client.create_registered_model(name, description=DESCRIPTION.format(name=name))

    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        version = str(min(int(v.version) for v in existing))
        created = False
        log.info("run %s is already version %s of %s", run_id, version, name)
    else:
        import mlflow

        version = str(mlflow.register_model(model_uri, name).version)
        created = True
        tags = {
            "dataset": run.data.tags.get("dataset", ""),
            "split": run.data.tags.get("split", ""),
            "split_counts": _split_counts(client, run_id),
            "code_version": code_version(),
            "test_macro_f1": f"{score:.6f}",
            "test_accuracy": f"{run.data.metrics.get('test_accuracy', float('nan')):.6f}",
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
            description=f"Run {run_id}: test macro-F1 {score:.4f}, accuracy "
            f"{run.data.metrics.get('test_accuracy', float('nan')):.4f}.",
        )
    client.set_registered_model_alias(name, "challenger", version)

    champion = _alias(client, name, "champion")
    promoted = False
    champion_score: float | None = None
    if champion is None:
        promoted = True
    elif champion.version != version:
        champion_score = client.get_run(champion.run_id).data.metrics.get("test_macro_f1")
        promoted = champion_score is None or score > champion_score + margin
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
        log.info("version %s of %s is the new champion (test macro-F1 %.4f)", version, name, score)
    elif champion is not None and champion.version != version:
        log.info(
            "version %s stays challenger: macro-F1 %.4f does not beat champion %s (%.4f) by %.4f",
            version,
            score,
            champion.version,
            champion_score or 0.0,
            margin,
        )
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


def _tracking_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())
