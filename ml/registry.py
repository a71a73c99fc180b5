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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml import audit, fencing, mlflow_access
from ml.containment import check_name
from ml.errors import ParameterError, PipelineError
from ml.imaging import ImageConfig
from ml.labels import LABELS
from ml.layout import SplitLayout
from ml.lineage import keep_split
from ml.params import PARAMETERS
from ml.predict import classify
from ml.promotion import FALLBACKS, Comparison, compare, decide
from ml.redact import get_logger
from ml.serving import probability_column
from ml.storage import ObjectStore
from ml.uri import S3Uri

log = get_logger(__name__)

DEFAULT_MODEL_NAME = PARAMETERS["model_name"].default
_RUN_ID = re.compile(r"[0-9a-f]{32}")
DESCRIPTION = (
    "Image sentiment classifier: ResNet fine-tuned to 5 classes ({labels}). {interface} Load the "
    "current best with models:/{name}@champion; `python -m ml serve` serves it over HTTP, "
    "`python -m ml predict` scores a CSV of image URLs."
)


def model_description(name: str, signature: Any | None) -> str:
    """The registered model's description, its input and output read from a version's logged
    signature (so the two cannot disagree)."""
    from ml.serving import describe_signature

    interface = describe_signature(signature) if signature is not None else ""
    return DESCRIPTION.format(name=name, labels=", ".join(LABELS), interface=interface)


def _run_versions(client: Any, name: str, run_id: str) -> list[int]:
    return sorted(
        int(v.version) for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    )


def _ensure_registered_model(client: Any, name: str) -> None:
    """Create ``name`` unless it exists. Under MLflow's auth app a user who may not see a model
    is answered 403 whether or not it exists: then creating it tells which (created: it is ours
    now; exists: it belongs to someone else). Two registrations creating it at the same time
    both succeed: the loser uses the model the winner created."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not (mlflow_access.missing(exc) or mlflow_access.denied(exc)):
            raise
    try:
        client.create_registered_model(name, description=model_description(name, None))
    except MlflowException as again:
        if not mlflow_access.exists(again):
            raise
        try:  # created by a registration running at the same time, or someone else's
            client.get_registered_model(name)
        except MlflowException as third:
            if not mlflow_access.denied(third):
                raise
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
            raise PipelineError(
                f"the registered model {name!r} exists and MLflow user {user!r} may not use "
                "it; choose another model name, or have an MLflow admin grant that user MANAGE "
                "on it"
            ) from None


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
    margin: float = PARAMETERS["promotion_margin"].default,
    resamples: int = PARAMETERS["promotion_resamples"].default,
    confidence: float = PARAMETERS["promotion_confidence"].default,
    band: str = PARAMETERS["promotion_band"].default,
    orchestrator_run_id: str = PARAMETERS["orchestrator_run_id"].default,
    client: Any | None = None,
    store: Any | None = None,
) -> dict[str, Any]:
    """Create (or find) the version for ``run_id``; set challenger; promote it to champion only
    when it beats the champion on the same test images beyond noise (see ml.promotion)."""
    check_name(name, "model_name")
    if not _RUN_ID.fullmatch(run_id or ""):
        raise PipelineError(f"--run-id must be an MLflow run id (32 hex digits), got {run_id!r}")
    client = mlflow_access.checked_client(client)
    run, model_uri, score = _finished_run(client, run_id)
    fencing.check()  # a superseded attempt registers nothing
    _ensure_registered_model(client, name)
    version, created = _version_for_run(client, name, run_id, model_uri)
    objects = store or ObjectStore()
    split = run.data.tags.get("split", "")
    root = SplitLayout.parse(split).dataset.store
    keep_split(objects, root, name, version, split)  # lineage: the split as trained on
    ledger = audit.alias_ledger(objects, root, name)
    by = audit.actor(orchestrator_run_id)
    audit.move_alias(
        client,
        ledger,
        name,
        "challenger",
        version,
        action="register",
        reason=f"registered from MLflow run {run_id}",
        by=by,
    )
    if not created:
        log.info("run %s is version %s of %s", run_id, version, name)
        decision = _recorded_decision(client, name, version)
    else:
        settings = (margin, resamples, confidence)
        decision = _decide(client, name, version, run, settings, objects, band)
        _describe_version(client, name, version, run, orchestrator_run_id, decision)
        _describe_model(client, name, model_uri, ledger)
        if decision.promoted:
            audit.move_alias(
                client,
                ledger,
                name,
                "champion",
                version,
                action="register",
                reason=decision.reason,
                by=by,
                decision=decision.to_json(),
            )
        log.info(
            "version %s of %s: %s (%s)",
            version,
            name,
            "champion" if decision.promoted else "stays challenger",
            decision.reason,
        )
    aliases = sorted(client.get_model_version(name, version).aliases)
    current = _alias(client, name, "champion")
    return {
        "model": name,
        "version": int(version),
        "aliases": aliases,
        "promoted": decision.promoted and created,
        "created": created,
        "run_id": run_id,
        "metrics": {"test_macro_f1": score, "test_accuracy": run.data.metrics.get("test_accuracy")},
        "promotion": decision.to_json(),
        "champion_version": int(current.version) if current else None,
        "model_uri": f"models:/{name}@champion",
        "agreement_bands": _band_figures(run.data.metrics),
        "label_issues": _top_label_issues(client, run_id),
    }


def _band_figures(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The run's test figures per annotator-agreement band (ml.evaluate.AGREEMENT_BANDS)."""
    from ml.evaluate import AGREEMENT_BANDS

    return {
        band: {
            "images": int(metrics[f"test_images_{band}"]),
            "macro_f1": metrics[f"test_macro_f1_{band}"],
            "accuracy": metrics[f"test_accuracy_{band}"],
        }
        for _, band in AGREEMENT_BANDS
        if f"test_images_{band}" in metrics
    }


def _top_label_issues(client: Any, run_id: str, count: int = 3) -> dict[str, Any] | None:
    """How many likely label errors the run listed, and the first few (ml.quality)."""
    import pandas as pd

    columns = ["url", "given_label", "suggested_label", "confidence"]
    issues = mlflow_access.optional_artifact(
        client, run_id, "evaluation/label_issues.csv", lambda path: pd.read_csv(path)[columns]
    )
    if issues is None:  # a run logged before the list existed, or an unreadable one
        return None
    top = issues.head(count)
    return {"listed": len(issues), "top": top.to_dict("records")}


@dataclass
class Decision:
    """Whether a new version becomes champion, why, and the comparison it rests on."""

    promoted: bool
    reason: str
    champion_version: int | None = None
    comparison: Comparison | None = None
    rule: str = "same test images, paired bootstrap"

    def to_json(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "reason": self.reason,
            "rule": self.rule,
            "champion_version": self.champion_version,
            "comparison": self.comparison.to_json() if self.comparison else None,
        }


def _decide(
    client: Any,
    name: str,
    version: str,
    run: Any,
    settings: tuple[float, int, float],
    store: Any | None,
    band: str,
) -> Decision:
    margin, resamples, confidence = settings
    champion = _alias(client, name, "champion")
    if champion is None:
        return Decision(True, "the first version of the model becomes champion")
    if champion.version == version:
        return Decision(True, "already the champion", int(champion.version))
    number = int(champion.version)
    scored = _score_both(client, name, champion, run, store, band)
    if isinstance(scored, Decision):
        return scored
    truth, new_probs, old_probs = scored
    comparison = compare(truth, new_probs, old_probs, resamples=resamples, confidence=confidence)
    promoted, reason = decide(comparison, margin)
    where = "" if band == "all" else f" (test images of agreement band {band})"
    return Decision(promoted, f"against champion v{number}{where}: {reason}", number, comparison)


def _score_both(
    client: Any,
    name: str,
    champion: Any,
    run: Any,
    store: Any | None,
    band: str = "all",
    load: Callable[[str], Any] = mlflow_access.load_registered,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | Decision:
    """(true classes, new probabilities, champion probabilities) on the new version's test
    images (those of agreement ``band`` unless it is "all"), or the fallback Decision when
    the champion cannot be scored there."""
    number = int(champion.version)
    columns = [probability_column(label) for label in LABELS]
    predictions = mlflow_access.test_predictions(
        client, run.info.run_id, needs=["object_key", "label_index", *columns]
    )
    if predictions is not None and band != "all":
        predictions = _in_band(predictions, band)
    if predictions is None:
        score = float(run.data.metrics["test_macro_f1"])
        old = client.get_run(champion.run_id).data.metrics.get("test_macro_f1")
        promoted = old is None or score > float(old)
        return Decision(
            promoted,
            f"{FALLBACKS['no_predictions']}: {score:.4f} against "
            f"{old if old is None else f'{old:.4f}'}",
            number,
            rule="recorded test scores (fallback)",
        )
    try:
        model = load(f"models:/{name}/{number}")
    except PipelineError as exc:
        return Decision(True, f"{FALLBACKS['unloadable']} ({exc})", number, rule="fallback")
    labels = list((model.metadata.metadata or {}).get("labels", LABELS))
    if labels != list(LABELS):
        return Decision(False, f"{FALLBACKS['labels']}: {labels}", number, rule="fallback")
    bucket = S3Uri.parse(run.data.tags["split"]).bucket
    images = _read_images(store, bucket, list(predictions["object_key"]))
    rows = classify(model, images, ImageConfig(), PARAMETERS["inference_batch_size"].default)
    usable = (rows["status"] == "ok").to_numpy()
    return (
        predictions["label_index"].to_numpy()[usable],
        predictions[columns].to_numpy()[usable],
        rows[columns].to_numpy(dtype=np.float64)[usable],
    )


def _in_band(predictions: Any, band: str) -> Any:
    """The test predictions of one agreement band; one clear error when there are none."""
    from ml.evaluate import agreement_band

    values = predictions.get("agreement", [])
    inside = [agreement_band(float(v)) == band for v in values]
    if not any(inside):
        raise ParameterError(
            f"parameter 'promotion_band' {band!r}: the new version's test split has no images "
            "of that agreement band (the CSV's confidence column decides it); use "
            "promotion_band all"
        )
    return predictions[inside].reset_index(drop=True)


def _read_images(store: Any | None, bucket: str, keys: list[str]) -> list[bytes]:
    from concurrent.futures import ThreadPoolExecutor

    store = store or ObjectStore()
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda key: store.get_bytes(S3Uri(bucket, key)), keys))


def _recorded_decision(client: Any, name: str, version: str) -> Decision:
    """The decision made when the version was created (registering again changes nothing)."""
    tags = client.get_model_version(name, version).tags
    return Decision(
        tags.get("promotion_decision") == "promoted",
        tags.get("promotion_reason", "registered before"),
    )


def _finished_run(client: Any, run_id: str) -> tuple[Any, str, float]:
    """The run, its model's URI and its test macro-F1; clear errors when it is not there."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if not mlflow_access.missing(exc):
            raise mlflow_access.failed(exc, f"run {run_id}") from None
        raise PipelineError(
            f"no MLflow run {run_id!r} at {mlflow_access.tracking_uri()}; pass the run_id that "
            "train printed"
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
    client: Any,
    name: str,
    version: str,
    run: Any,
    orchestrator_run_id: str,
    decision: Decision,
) -> None:
    """Tags and description of a new version: where it came from, how it scored, and the
    promotion decision with both scores on the same images and the interval."""
    metrics = run.data.metrics
    tags = {
        "dataset": run.data.tags.get("dataset", ""),
        "split": run.data.tags.get("split", ""),
        "split_counts": _split_counts(client, run.info.run_id),
        "code_version": mlflow_access.code_version(),
        "training_key": run.data.tags.get("training_key", ""),
        "test_macro_f1": f"{metrics['test_macro_f1']:.6f}",
        "test_accuracy": f"{metrics.get('test_accuracy', float('nan')):.6f}",
        "weights": run.data.tags.get("weights", ""),
        "promotion_decision": "promoted" if decision.promoted else "kept champion",
        "promotion_reason": decision.reason[:5000],
        "promotion_rule": decision.rule,
    }
    c = decision.comparison
    if c is not None:
        tags.update(
            compared_with_version=str(decision.champion_version),
            same_data_images=str(c.images),
            same_data_macro_f1=f"{c.new_score:.6f}",
            same_data_champion_macro_f1=f"{c.champion_score:.6f}",
            gain_interval=f"{c.low:+.6f}..{c.high:+.6f} ({c.confidence:.0%}, {c.resamples} "
            "paired resamples)",
        )
    orchestrator = orchestrator_run_id or run.data.tags.get("orchestrator_run_id", "")
    if orchestrator:
        tags["orchestrator_run_id"] = orchestrator
    fencing.check()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=_description(run, decision))


def _describe_model(client: Any, name: str, model_uri: str, ledger: audit.Ledger) -> None:
    """The registered model's description, from the newest version's logged signature, ending
    with the latest alias moves."""
    signature = mlflow_access.model_signature(model_uri)
    description = audit.with_history(model_description(name, signature), ledger.entries())
    fencing.check()
    client.update_registered_model(name, description=description)


def _description(run: Any, decision: Decision) -> str:
    metrics = run.data.metrics
    lines = [
        f"Run {run.info.run_id}: test macro-F1 {metrics['test_macro_f1']:.4f}, accuracy "
        f"{metrics.get('test_accuracy', float('nan')):.4f}, calibration error (ECE) "
        f"{metrics.get('test_ece', float('nan')):.3f}, on its own test split.",
    ]
    c = decision.comparison
    if c is not None:
        lines.append(
            f"Against champion v{decision.champion_version} on the same {c.images} test images: "
            f"macro-F1 {c.new_score:.4f} vs {c.champion_score:.4f}, gain {c.gain:+.4f} "
            f"({c.confidence:.0%} interval {c.low:+.4f} to {c.high:+.4f}, {c.resamples} paired "
            "bootstrap resamples)."
        )
    verdict = "Became champion" if decision.promoted else "Stays challenger"
    lines.append(f"{verdict}: {decision.reason}.")
    lines.append(
        "Report: the run's evaluation/ artifacts (per-class metrics, confusion matrix, "
        "reliability diagram, confidently wrong test images)."
    )
    return "\n\n".join(lines)


def champion_training(name: str, client: Any | None = None) -> dict[str, Any] | None:
    """The current champion's version, run and training key (dataset content and training
    settings, see :meth:`ml.train_config.TrainConfig.key`); None without a champion."""
    check_name(name, "model_name")
    client = mlflow_access.checked_client(client)
    champion = _alias(client, name, "champion")
    if champion is None:
        return None
    key = champion.tags.get("training_key") or ""
    if not key and champion.run_id:  # a version registered before the tag existed
        from mlflow.exceptions import MlflowException

        try:
            key = client.get_run(champion.run_id).data.tags.get("training_key", "")
        except MlflowException as exc:  # its run removed: no key; a failure is an error
            if not mlflow_access.missing(exc):
                raise mlflow_access.failed(exc, f"run {champion.run_id}") from None
            key = ""
    return {"version": int(champion.version), "run_id": champion.run_id, "training_key": key}


def _alias(client: Any, name: str, alias: str) -> Any | None:
    """The version ``alias`` points at; None only when the registry says there is none, or that
    we may not see it (a server that fails to answer is an error: taken for "no champion", it
    would promote a version untested)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # Under MLflow's auth app a model not yet made (or not ours: registration refuses
        # it) answers 403.
        if mlflow_access.missing(exc) or mlflow_access.denied(exc):
            return None
        raise mlflow_access.failed(
            exc,
            f"the {alias} of {name}",
            then="trigger the run again when it answers (a rerun finds what this one registered)",
        ) from None


def _split_counts(client: Any, run_id: str) -> str:
    """Images per split, as JSON, or "" for a run without the artifact (still registrable)."""

    def totals(path: Path) -> str:
        counts = json.loads(path.read_text())
        return json.dumps({k: sum(v.values()) for k, v in counts.items()})

    found = mlflow_access.optional_artifact(client, run_id, "data/split_counts.json", totals)
    return found or ""
