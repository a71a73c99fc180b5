"""Drift between training and scoring: does a batch look like the images the model was tested on?

Each batch-inference run is compared with the scoring model's own test images (its training
run's ``evaluation/test_predictions.parquet`` names them; they are read from the store):

- **Predicted-label mix**: the counts of each predicted class in the batch against those on the
  test images, a chi-square test of homogeneity on the 2 x K table (classes neither predicts
  are left out). It answers "does the model now say different things?", cheaply.
- **Penultimate-layer features** (the 2048 numbers a ResNet-152 feeds its last layer): a
  kernel two-sample test, the maximum mean discrepancy (MMD) with a Gaussian kernel whose
  width is the median distance between the pooled samples, and a permutation p-value. It
  catches a change of pictures even when the predicted mix happens to stay put, needs no
  assumption about the features' distribution, and works in many dimensions with a few hundred
  images, where per-feature tests would need a correction over 2048 tests.

Over the threshold (``ML_DRIFT_P_VALUE``: either p-value below it) the report says ``alarm``.

Usage: ``check_drift(batch_labels, batch_features, reference_labels, reference_features)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ml.labels import LABELS

#: Alarm when a test's p-value falls below this (the deployment's ML_DRIFT_P_VALUE).
DEFAULT_P_VALUE = 0.01
PERMUTATIONS = 500
#: Images per side in the feature test (a random subset beyond: the kernel is quadratic).
MAX_SAMPLES = 1000
FEATURE_TEST = (
    "maximum mean discrepancy of the penultimate-layer features, Gaussian kernel (median "
    f"heuristic), {PERMUTATIONS}-permutation p-value"
)
LABEL_TEST = "chi-square test of homogeneity of the predicted-label counts"


def label_mix(batch: Sequence[str], reference: Sequence[str]) -> dict[str, Any]:
    """Counts of each predicted class in both, and the chi-square test's p-value."""
    from scipy.stats import chi2_contingency

    counts = np.array(
        [[sum(1 for v in side if v == label) for label in LABELS] for side in (batch, reference)]
    )
    used = counts.sum(axis=0) > 0
    result: dict[str, Any] = {
        "test": LABEL_TEST,
        "batch": dict(zip(LABELS, counts[0].tolist(), strict=True)),
        "reference": dict(zip(LABELS, counts[1].tolist(), strict=True)),
    }
    if used.sum() < 2 or counts[0].sum() == 0 or counts[1].sum() == 0:
        return {**result, "statistic": 0.0, "p_value": 1.0}
    statistic, p_value, _, _ = chi2_contingency(counts[:, used])
    return {**result, "statistic": float(statistic), "p_value": float(p_value)}


def _subset(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[rng.choice(len(x), MAX_SAMPLES, replace=False)] if len(x) > MAX_SAMPLES else x


def mmd_test(
    batch: np.ndarray, reference: np.ndarray, *, permutations: int = PERMUTATIONS, shuffle: int = 0
) -> dict[str, Any]:
    """MMD^2 (biased estimate) between two samples of feature vectors, and the share of label
    permutations whose MMD^2 is at least as large (the p-value, with the +1 correction)."""
    rng = np.random.default_rng(shuffle)
    x, y = (
        _subset(np.asarray(batch, np.float64), rng),
        _subset(np.asarray(reference, np.float64), rng),
    )
    if len(x) < 2 or len(y) < 2:
        return {"test": FEATURE_TEST, "mmd2": 0.0, "p_value": 1.0, "images": [len(x), len(y)]}
    pooled = np.vstack([x, y])
    squared = (pooled**2).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * pooled @ pooled.T, 0.0)
    width = np.median(distances[np.triu_indices(len(pooled), 1)]) or 1.0
    kernel = np.exp(-distances / width)
    # MMD^2 = w' K w with w = 1/n on the batch's rows and -1/m on the reference's: every
    # permutation's statistic at once is one matrix product.
    n, m = len(x), len(y)
    weights = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    shuffled = np.stack([rng.permutation(weights) for _ in range(permutations)], axis=1)
    observed = float(weights @ kernel @ weights)
    permuted = np.einsum("ip,ip->p", shuffled, kernel @ shuffled)
    larger = int((permuted >= observed - 1e-12).sum())
    return {
        "test": FEATURE_TEST,
        "mmd2": observed,
        "p_value": (larger + 1) / (permutations + 1),
        "images": [len(x), len(y)],
    }


def check_drift(
    batch_labels: Sequence[str],
    batch_features: np.ndarray | None,
    reference_labels: Sequence[str],
    reference_features: np.ndarray | None,
    threshold: float = DEFAULT_P_VALUE,
) -> dict[str, Any]:
    """Both tests and the verdict: ``alarm`` when either p-value is below ``threshold``."""
    labels = label_mix(batch_labels, reference_labels)
    report: dict[str, Any] = {"threshold": threshold, "label_mix": labels}
    p_values = [labels["p_value"]]
    if batch_features is not None and reference_features is not None:
        report["features"] = mmd_test(batch_features, reference_features)
        p_values.append(report["features"]["p_value"])
    else:
        report["features"] = None  # a model logged before features could be read
    report["alarm"] = min(p_values) < threshold
    report["verdict"] = (
        f"drift: p = {min(p_values):.4g} < {threshold}"
        if report["alarm"]
        else f"no drift: every p-value >= {threshold} (smallest {min(p_values):.4g})"
    )
    return report


# ------------------------------------------------------------------------------ in batch inference


#: Scores encoded images: (rows with label and status, the penultimate features captured).
Score = Callable[[list[bytes]], tuple[Any, "list[np.ndarray] | None"]]


def reference(name: str, version: int, store: Any, score: Score) -> tuple[list[str], Any] | None:
    """(predicted labels, penultimate features or None) of the version's own test images,
    kept in the store after the first time (``drift/<model>/v<N>-reference.npz`` under the
    store its training split is in); None when the version logged no test predictions."""
    import io

    from ml import mlflow_access
    from ml.layout import SplitLayout, StoreLayout
    from ml.uri import S3Uri

    client = mlflow_access.client()
    run = client.get_run(client.get_model_version(name, str(version)).run_id)
    split = run.data.tags.get("split", "")
    if not split:
        return None
    kept = StoreLayout(SplitLayout.parse(split).dataset.store).drift_reference(name, version)
    if store.exists(kept):
        saved = np.load(io.BytesIO(store.get_bytes(kept)), allow_pickle=False)
        features = saved["features"] if saved["features"].size else None
        return [str(v) for v in saved["labels"]], features
    predictions = mlflow_access.test_predictions(client, run.info.run_id)
    if predictions is None:
        return None
    keys = list(predictions["object_key"])[:MAX_SAMPLES]
    images = _readable(store, S3Uri.parse(split).bucket, keys)
    rows, captured = score(images)
    ok = rows["status"] == "ok"
    labels = [str(v) for v in rows.loc[ok, "label"]]
    features = _stacked(captured, int(ok.sum()))
    buffer = io.BytesIO()
    np.savez(
        buffer,
        labels=np.array(labels),
        features=features if features is not None else np.zeros((0, 0)),
    )
    store.put_bytes(kept, buffer.getvalue(), if_absent=True)
    return labels, features


def _readable(store: Any, bucket: str, keys: list[str]) -> list[bytes]:
    """The test images still in the store (one forgotten since is left out, not an error)."""
    from concurrent.futures import ThreadPoolExecutor

    from ml.errors import PipelineError
    from ml.uri import S3Uri

    def read(key: str) -> bytes | None:
        try:
            return bytes(store.get_bytes(S3Uri(bucket, key)))
        except PipelineError:
            return None

    with ThreadPoolExecutor(16) as pool:
        return [data for data in pool.map(read, keys) if data is not None]


def _stacked(captured: list[np.ndarray] | None, rows: int) -> np.ndarray | None:
    """The captured features as one array, when there is one row per scored image."""
    if not captured:
        return None
    features = np.concatenate(captured)
    return features if len(features) == rows else None


def assess(
    name: str,
    version: int,
    scored: Any,
    captured: list[np.ndarray] | None,
    store: Any,
    threshold: float,
    score: Score,
) -> dict[str, Any] | None:
    """The drift report of a batch that version ``version`` of ``name`` scored (``score`` is
    how it scores images); None when the version has nothing to compare with."""
    found = reference(name, version, store, score)
    if found is None:
        return None
    ok = scored["status"] == "ok"
    report = check_drift(
        [str(v) for v in scored.loc[ok, "label"]],
        _stacked(captured, int(ok.sum())),
        found[0],
        found[1],
        threshold,
    )
    return {"model": name, "model_version": version, **report}


def record(report: dict[str, Any], predictions: str) -> str:
    """The report as an MLflow run of the experiment ``<model>-batch-inference`` (metrics,
    the predictions' location, ``drift.json``); returns the run's id."""
    import json

    from ml import mlflow_access

    client = mlflow_access.client()
    experiment = f"{report['model']}-batch-inference"
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(
        experiment_id,
        tags={
            "mlflow.runName": f"drift of v{report['model_version']}",
            "model_version": str(report["model_version"]),
            "predictions": predictions,
            "drift_verdict": report["verdict"],
        },
    )
    run_id = str(run.info.run_id)
    metrics = {
        "drift_alarm": float(report["alarm"]),
        "drift_label_mix_p_value": report["label_mix"]["p_value"],
        "drift_label_mix_statistic": report["label_mix"]["statistic"],
    }
    if report["features"] is not None:
        metrics["drift_feature_p_value"] = report["features"]["p_value"]
        metrics["drift_feature_mmd2"] = report["features"]["mmd2"]
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_text(run_id, json.dumps(report, indent=2, default=str), "drift.json")
    client.set_terminated(run_id)
    return run_id
