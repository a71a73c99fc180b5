"""Everything a training tells MLflow: params and tags at the start, metrics per epoch, and at
the end the test metrics, the evaluation artifacts, a model card written from the data the run
used, and the served model (:mod:`ml.serving`). Only rank 0 calls these.

Usage::

    with start_run(cfg, run_id) as run:
        log_start(cfg, weights, loaders, rt, folder, split_sha256)
        log_epoch(row)
        result = log_end(cfg, classifier, test, history, best_epoch, loaders, preprocessing, run)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml import fencing
from ml.data import Loaders
from ml.errors import PipelineError
from ml.evaluate import (
    BAND_RULE,
    band_metrics,
    calibration,
    confidently_wrong,
    plot_confusion,
    plot_curves,
    plot_image_grid,
    plot_reliability,
)
from ml.labels import LABELS
from ml.layout import SplitLayout
from ml.model import Classifier, WeightsInfo
from ml.redact import first_line, get_logger, redact_text
from ml.runtime import Runtime
from ml.serving import (
    ENTRY,
    IMAGE_COLUMN,
    PACKAGE,
    ImageClassifier,
    export,
    network_forward,
    probability_column,
)
from ml.train_config import TrainConfig
from ml.transforms import Preprocessing

log = get_logger(__name__)


@contextmanager
def start_run(cfg: TrainConfig, run_id: str | None) -> Iterator[Any]:
    """The training's MLflow run: a new one, or the one a resumed checkpoint names."""
    import mlflow

    try:
        mlflow.set_experiment(cfg.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name(cfg))
    except Exception as exc:
        from ml.mlflow_access import failed, tracking_uri, unauthenticated

        if unauthenticated(exc):  # a wrong password, not a failing server
            raise failed(exc, "starting the training run") from None
        raise PipelineError(
            f"the MLflow tracking server at {tracking_uri()} refused to start the run: "
            f"{first_line(exc)}; check the server and MLFLOW_TRACKING_URI"
        ) from None
    try:
        yield run
    except fencing.StaleAttemptError:
        _leave_to_the_newer_attempt()
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run()


def run_name(cfg: TrainConfig, now: datetime | None = None) -> str:
    """The MLflow run's name: the one given, else what started it (the Airflow run, or a
    command-line call and when), never MLflow's random words."""
    if cfg.run_name:
        return cfg.run_name
    if cfg.orchestrator_run_id:
        return f"airflow {cfg.orchestrator_run_id}"
    now = now or datetime.now(UTC)
    return f"cli {now:%Y-%m-%d %H:%M:%S} UTC"


def _leave_to_the_newer_attempt() -> None:
    """Forget the active run without a word to the server: it belongs to the newer attempt
    now, so no status is written (MLflow's exit handler would mark it FINISHED or FAILED)."""
    from mlflow.environment_variables import MLFLOW_RUN_ID
    from mlflow.tracking import fluent

    with contextlib.suppress(AttributeError, IndexError):
        fluent._active_run_stack.get().pop()  # type: ignore[no-untyped-call]
    MLFLOW_RUN_ID.unset()  # type: ignore[no-untyped-call]


#: The run tag that says where training is, for people and tools watching a running task.
PROGRESS_TAG = "progress"


def set_progress(text: str) -> None:
    """Where training is now (the run's ``progress`` tag: the MLflow UI shows it, and the
    local stack's progress line reads it)."""
    fencing.check()  # a superseded attempt logs nothing more
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tag(PROGRESS_TAG, text)


def progress_reporter(label: str, total: int, every: float = 10.0) -> Callable[[int], None]:
    """A step counter that sets the progress tag ("epoch 2/3: step 14/40") on its first step,
    then at most every ``every`` seconds, and on the last step."""
    done, last = 0, -math.inf

    def report(count: int = 1) -> None:
        nonlocal done, last
        done += count
        if time.monotonic() - last >= every or done >= total:
            last = time.monotonic()
            set_progress(f"{label}: step {done}/{total}")

    return report


def log_precision(used: str, note: str) -> None:
    """The precision training really ran in (tags; ``precision`` is what was asked for)."""
    fencing.check()  # a superseded attempt logs nothing more
    import mlflow

    mlflow.set_tags({"precision_used": used, **({"precision_note": note} if note else {})})


def log_start(
    cfg: TrainConfig,
    weights: WeightsInfo,
    loaders: Loaders,
    rt: Runtime,
    folder: Any,
    split_sha256: str,
) -> None:
    """Params (the configuration, redacted), tags and the data's counts."""
    fencing.check()  # a superseded attempt logs nothing more
    import mlflow

    params = {k: redact_text(str(v)) for k, v in dataclasses.asdict(cfg).items()}
    mlflow.log_params({**params, "split_sha256": split_sha256})
    tags = {
        "weights": weights.source,
        "pretrained": str(weights.pretrained).lower(),
        "weights_sha256": weights.sha256,
        "split": cfg.split,
        "dataset": SplitLayout.parse(cfg.split).dataset.uri,
        "device": str(rt.device),
        "world_size": str(rt.world),
        "checkpoint": str(folder),
        "training_key": cfg.key(split_sha256),
        **({"orchestrator_run_id": cfg.orchestrator_run_id} if cfg.orchestrator_run_id else {}),
        **(
            {"warning": "trained from random weights (--weights none)"}
            if not weights.pretrained
            else {}
        ),
    }
    mlflow.set_tags({k: redact_text(str(v)) for k, v in tags.items()})
    mlflow.log_dict(loaders.counts, "data/split_counts.json")
    mlflow.log_dict({str(i): name for i, name in enumerate(LABELS)}, "data/label_map.json")


def log_epoch(row: dict[str, float]) -> None:
    fencing.check()  # a superseded attempt logs nothing more
    import mlflow

    mlflow.log_metrics(
        {k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
    )


def test_metrics(test: dict[str, Any], best_epoch: int) -> dict[str, float]:
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"],
        "best_epoch": float(best_epoch),
    }
    for name, values in test["per_class"].items():
        key = name.lower().replace(" ", "_")
        metrics.update(
            {
                f"test_f1_{key}": values["f1"],
                f"test_precision_{key}": values["precision"],
                f"test_recall_{key}": values["recall"],
            }
        )
    return metrics


def band_metric_names(bands: dict[str, dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of the agreement bands: test_macro_f1_all_agree, ... and the images."""
    metrics: dict[str, float] = {}
    for band, values in bands.items():
        metrics[f"test_images_{band}"] = float(values["images"])
        metrics[f"test_accuracy_{band}"] = values["accuracy"]
        metrics[f"test_macro_f1_{band}"] = values["macro_f1"]
        for label, recall in values["recall"].items():
            metrics[f"test_recall_{label.lower().replace(' ', '_')}_{band}"] = recall
    return metrics


@dataclass
class TestOutcome:
    """What the test split said: metrics, class probabilities per image, and the images."""

    metrics: dict[str, Any]
    probs: np.ndarray
    images: Any  # ml.data.SplitImages: keys, hashes, targets and read(i)
    #: The valid split's probabilities and images (held out too: label errors use both).
    valid: tuple[np.ndarray, Any] | None = None


def log_end(
    cfg: TrainConfig,
    classifier: Classifier,
    test: TestOutcome,
    history: list[dict[str, Any]],
    best_epoch: int,
    loaders: Loaders,
    preprocessing: Preprocessing,
    weights: WeightsInfo,
) -> str:
    """Test metrics, the evaluation report (per class, confusion, calibration, confidently
    wrong images), per-image test predictions, model card and the served model; its URI."""
    fencing.check()  # a superseded attempt logs nothing more
    import mlflow

    calibrated = calibration(test.probs, test.images.targets)
    bands = band_metrics(test.images.agreement, test.images.targets, test.probs)
    mlflow.log_metrics(
        {
            **test_metrics(test.metrics, best_epoch),
            "test_ece": calibrated["ece"],
            **band_metric_names(bands),
        }
    )
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        plot_confusion(test.metrics, tmp / "confusion_matrix.png")
        plot_curves(history, tmp / "training_curves.png")
        plot_reliability(calibrated, tmp / "reliability.png")
        _plot_wrong(test, tmp / "confidently_wrong.png")
        issues = _label_issues(test, tmp)
        mlflow.log_metric("label_issues", float(len(issues)))
        report = {
            **test.metrics,
            "calibration": calibrated,
            "agreement_bands": {"rule": BAND_RULE, "bands": bands},
        }
        (tmp / "test_report.json").write_text(json.dumps(report, indent=2))
        test_predictions(test).to_parquet(tmp / "test_predictions.parquet", index=False)
        card = model_card(cfg, test.metrics, loaders.counts, preprocessing, weights, best_epoch)
        (tmp / "MODEL_CARD.md").write_text(card)
        mlflow.log_artifacts(str(tmp), "evaluation")
    model_uri = log_model(cfg, classifier, preprocessing)
    mlflow.set_tag("model_uri", model_uri)
    return model_uri


def _label_issues(test: TestOutcome, tmp: Path) -> Any:
    """Likely label errors among the held-out images (ml.quality): ``label_issues.csv`` for a
    labeller (cells a spreadsheet would run are neutralized) and a contact sheet of the top."""
    from ml.predict import neutralize_formulas
    from ml.quality import SHEET_SIZE, held_out_frame, label_issues

    parts = [("test", test.images, test.probs)]
    if test.valid is not None:
        parts.append(("valid", test.valid[1], test.valid[0]))
    issues = label_issues(held_out_frame(parts))
    neutralize_formulas(issues).to_csv(tmp / "label_issues.csv", index=False)
    by_split = {name: images for name, images, _ in parts}
    pictures, captions = [], []
    for row in issues.head(SHEET_SIZE).itertuples():
        images = by_split[row.split]
        pictures.append(images.read(images.hashes.index(row.sha256)))
        captions.append(
            f"#{row.rank} given: {row.given_label}\nmodel: {row.suggested_label} "
            f"({row.confidence:.2f})"
        )
    plot_image_grid(
        pictures,
        captions,
        tmp / "label_issues.png",
        "Likely label errors: held-out images whose label the model contradicts most",
        empty="no likely label errors",
    )
    return issues


def test_predictions(test: TestOutcome) -> Any:
    """One row per test image: which image, its true class, the probability of each class.
    The registry scores the champion on the same images from this."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "object_key": list(test.images.keys),
            "sha256": list(test.images.hashes),
            "label_index": list(test.images.targets),
            "agreement": list(test.images.agreement),
        }
    )
    for j, label in enumerate(LABELS):
        frame[probability_column(label)] = test.probs[:, j] if len(test.probs) else []
    return frame


def _plot_wrong(test: TestOutcome, path: Path) -> None:
    indices = confidently_wrong(test.probs, test.images.targets)
    images, captions = [], []
    for i in indices:
        predicted = int(test.probs[i].argmax())
        images.append(test.images.read(i))
        captions.append(
            f"true: {LABELS[test.images.targets[i]]}\n"
            f"predicted: {LABELS[predicted]} ({test.probs[i][predicted]:.2f})"
        )
    plot_image_grid(images, captions, path, "Test images the model was surest of, and wrong")


def example_images(count: int = 2, size: int = 96) -> list[bytes]:
    """Small JPEGs for the logged model's input example (random pixels, seeded)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        out = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=85)
        images.append(out.getvalue())
    return images


def log_model(cfg: TrainConfig, classifier: Classifier, preprocessing: Preprocessing) -> str:
    """Log the served model (models from code, plain weights, the ``ml`` package as code):
    encoded images in, a label and the five class probabilities out."""
    fencing.check()  # a superseded attempt logs nothing more
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    classifier = classifier.to("cpu").float().eval()
    example = pd.DataFrame({IMAGE_COLUMN: example_images()})
    served = ImageClassifier(
        network_forward(classifier, torch.device("cpu")), preprocessing, LABELS
    )
    output = served.images(list(example[IMAGE_COLUMN]))
    config = {
        "arch": cfg.arch,
        "labels": list(LABELS),
        "preprocessing": preprocessing.to_dict(),
    }
    with tempfile.TemporaryDirectory() as name:
        artifacts = export(classifier, Path(name), config)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ENTRY),
            artifacts=artifacts,
            code_paths=[str(PACKAGE)],
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=served_requirements(),
            metadata={
                "labels": list(LABELS),
                "image_size": preprocessing.crop_size,
                "resize_size": preprocessing.resize_size,
                "preprocessing": preprocessing.to_dict(),
                "input": "column 'image': encoded images (bytes, or base64 text in JSON); or "
                "float32 RGB in [0, 1] shaped (N, 3, H, W)",
                "output": "label, confidence, p_<class> per class, status, error",
            },
        )
    return str(info.model_uri)


def _version(package: str) -> str:
    return version(package).split("+")[0]


#: What the served model imports beyond MLflow and its dependencies (``ml.serving`` and
#: ``ml.imaging``); a test checks the list against that import closure.
SERVED_DISTRIBUTIONS = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "opencv-python-headless",
    "simplejpeg",
)


def served_requirements() -> list[str]:
    """The served model's pip requirements: this environment's versions, pinned."""
    return [f"{name}=={_version(name)}" for name in SERVED_DISTRIBUTIONS]


def model_card(
    cfg: TrainConfig,
    test: dict[str, Any],
    counts: dict[str, dict[str, int]],
    preprocessing: Preprocessing,
    weights: WeightsInfo,
    best_epoch: int,
) -> str:
    """The model card, written from the data this run used (not from the reference dataset)."""
    totals = {label: sum(split[label] for split in counts.values()) for label in LABELS}
    images = sum(totals.values()) or 1
    share_rows = "\n".join(
        f"| {label} | {totals[label]} | {totals[label] / images:.1%} | "
        + " | ".join(str(counts[s][label]) for s in ("train", "valid", "test"))
        + " |"
        for label in LABELS
    )
    rows = "\n".join(
        f"| {name} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
        for name, v in test["per_class"].items()
    )
    rarest = min(LABELS, key=lambda label: totals[label])
    smallest_test = min(LABELS, key=lambda label: counts["test"][label])
    origin = (
        f"`{weights.source}` (SHA-256 {weights.sha256[:12]}...)"
        if weights.pretrained
        else "random weights (`--weights none`: a test or demo, not a usable model)"
    )
    loss = f"cross-entropy, imbalance remedy `{cfg.imbalance}`" + (
        ", each training image weighed by its annotators' agreement"
        if cfg.agreement_weighting
        else ""
    )
    return f"""# Image sentiment classifier

{cfg.arch} fine-tuned from {origin} to 5 sentiment classes: {", ".join(LABELS)}.

- Data: `{cfg.split}`: {images} images (train {sum(counts["train"].values())}, valid
  {sum(counts["valid"].values())}, test {sum(counts["test"].values())})
- Best epoch (validation macro-F1): {best_epoch}; trained {cfg.epochs} epochs at most
- Loss: {loss}
- Test accuracy {test["accuracy"]:.4f}, test macro-F1 {test["macro_f1"]:.4f}

## Classes in this run's data

| class | images | share | train | valid | test |
|---|---|---|---|---|---|
{share_rows}

## Test results

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

## Input
RGB images: resize the shorter side to {preprocessing.resize_size} px, centre-crop
{preprocessing.crop_size} px, scale to float32 in [0, 1], shape (N, 3, {preprocessing.crop_size},
{preprocessing.crop_size}). The model normalizes internally and returns class probabilities in
the order above. `python -m ml predict` does all of this from image URLs or object keys.

## Known limits
- The classes are imbalanced in this data ("{rarest}" is {totals[rarest] / images:.1%} of it):
  read macro-F1 and the per-class rows, not accuracy alone.
- The test split holds {counts["test"][smallest_test]} "{smallest_test}" images: that class's
  test figures move by several points with one or two predictions.
- Labels are crowd judgments of perceived sentiment, not ground truth.
"""
