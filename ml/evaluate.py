"""Evaluation: metrics that do not flatter a majority-class model, and the plots users look at.

Accuracy alone rewards predicting "Positive" (55% of the data); macro-F1 weighs every class the
same, so model selection and promotion use it.

Usage: ``metrics = compute_metrics(y_true, y_pred)``; ``plot_confusion(metrics, path)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ml.labels import LABELS

#: Agreement bands: the share of the (trust-weighted) judgments that chose the label. The
#: CrowdFlower export has 3 judgments per image, so its values cluster at about 1/3, 2/3 and 1:
#: all agree, a majority agrees, no majority. (lowest value, name), highest band first.
AGREEMENT_BANDS = ((0.99, "all_agree"), (0.5, "majority"), (0.0, "no_majority"))
BAND_RULE = (
    "all_agree: agreement >= 0.99; majority: 0.5 <= agreement < 0.99; no_majority: "
    "agreement < 0.5 (agreement: the share of the annotators' trust-weighted judgments that "
    "chose the label; the CrowdFlower export has 3 per image, so values cluster at 1/3, 2/3 "
    "and 1); images without an agreement value are in no band"
)


def agreement_band(value: float) -> str:
    """The band of one agreement value ("" when there is none)."""
    if math.isnan(value):  # the CSV gave no agreement
        return ""
    return next(name for low, name in AGREEMENT_BANDS if value >= low)


def band_metrics(
    agreement: Sequence[float], y_true: Sequence[int], probs: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Accuracy, macro-F1 and per-class recall for each agreement band that has images."""
    bands = np.array([agreement_band(float(v)) for v in agreement])
    true = np.asarray(y_true, dtype=int)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    out: dict[str, dict[str, Any]] = {}
    for _, name in AGREEMENT_BANDS:
        inside = bands == name
        if not inside.any():
            continue
        metrics = compute_metrics(true[inside], pred[inside])
        out[name] = {
            "images": int(inside.sum()),
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "recall": {
                label: values["recall"]
                for label, values in metrics["per_class"].items()
                if values["support"]
            },
        }
    return out


def compute_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str] = LABELS
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    index = list(range(len(labels)))
    true, pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=index, zero_division=0
    )
    present = support > 0
    return {
        "accuracy": float((true == pred).mean()) if len(true) else 0.0,
        # Macro over the classes present in this split: an absent class says nothing.
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion": confusion_matrix(true, pred, labels=index).tolist(),
        "labels": list(labels),
    }


def plot_confusion(
    metrics: dict[str, Any], path: Path, title: str = "Test confusion matrix"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(metrics["confusion"])
    labels = metrics["labels"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    high = matrix.max() if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > high / 2 else "black",
        )
    ax.set_title(
        f"{title} (accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    left.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="valid loss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [h["valid_accuracy"] for h in history], marker="o", label="valid accuracy")
    right.plot(epochs, [h["valid_macro_f1"] for h in history], marker="o", label="valid macro-F1")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibration(probs: np.ndarray, y_true: Sequence[int], bins: int = 15) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, and the bins themselves
    (how often the top class was right, against how sure the model was)."""
    truth = np.asarray(y_true, dtype=int)
    if len(truth) == 0:
        return {"ece": 0.0, "bins": []}
    confidence = probs.max(axis=1)
    right = probs.argmax(axis=1) == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows, ece = [], 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high) if low > 0 else confidence <= high
        count = int(inside.sum())
        if count:
            accuracy, mean_conf = float(right[inside].mean()), float(confidence[inside].mean())
            ece += count / len(truth) * abs(accuracy - mean_conf)
            rows.append(
                {
                    "low": float(low),
                    "high": float(high),
                    "count": count,
                    "accuracy": accuracy,
                    "confidence": mean_conf,
                }
            )
    return {"ece": float(ece), "bins": rows}


def plot_reliability(report: dict[str, Any], path: Path) -> Path:
    """The reliability diagram: accuracy per confidence bin against the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for row in report["bins"]:
        ax.bar(
            row["low"],
            row["accuracy"],
            width=row["high"] - row["low"],
            align="edge",
            alpha=0.7,
            edgecolor="black",
            color="tab:blue",
        )
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability on test (ECE {report['ece']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confidently_wrong(probs: np.ndarray, y_true: Sequence[int], limit: int = 16) -> list[int]:
    """Indices of the wrong predictions the model was surest of, surest first."""
    truth = np.asarray(y_true, dtype=int)
    if len(truth) == 0:
        return []
    wrong = np.flatnonzero(probs.argmax(axis=1) != truth)
    order = wrong[np.argsort(-probs[wrong].max(axis=1), kind="stable")]
    return [int(i) for i in order[:limit]]


def plot_image_grid(
    images: Sequence[bytes],
    captions: Sequence[str],
    path: Path,
    title: str,
    empty: str = "no wrong predictions",
) -> Path:
    """Images (encoded) in a grid with a caption under each."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = 4
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, data, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        ax.set_title(caption, fontsize=8)
    if not images:
        axes.flat[0].text(0.5, 0.5, empty, ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
