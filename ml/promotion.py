"""Promotion: does a new model version beat the champion, on the same images, beyond noise?

A version's recorded test score was measured on its own test split; the champion's on another.
After the CSV grows, or the seed or ratios change, those splits differ, and with about 15
"Highly negative" test images one or two predictions move macro-F1 by several points. So the
champion is scored on the new version's test images, and the two are compared there:

- **gain** = new macro-F1 - champion macro-F1 on the same images;
- a **paired bootstrap**: the test images are resampled with replacement ``resamples`` times,
  both models scored on each resample, giving a ``confidence`` interval for the gain;
- **promote** only when the gain exceeds the margin *and* the interval's lower end is above 0.

When the champion cannot be scored, the rule falls back (:data:`FALLBACKS`): a champion that
cannot be loaded is replaced (a servable model beats one that is not); a champion with other
labels is kept, and a person decides; a new run without per-image test predictions (logged by
older code) is compared on the recorded scores, and the reason says so.

Usage: ``comparison = compare(y, new_probs, champion_probs, resamples=1000, confidence=0.95)``;
``promoted, reason = decide(comparison, margin=0.0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ml.params import PARAMETERS

FALLBACKS = {
    "unloadable": "the champion cannot be loaded: promote (a servable model replaces it)",
    "labels": "the champion predicts other labels: keep it, a person decides",
    "no_predictions": "the new run has no per-image test predictions: compare the recorded "
    "test scores (measured on different images)",
}


def macro_f1(truth: np.ndarray, predicted: np.ndarray, classes: int) -> float:
    """Macro-F1 over the classes present in ``truth`` (as ``ml.evaluate`` computes it)."""
    return float(_macro_f1_rows(truth[None, :], predicted[None, :], classes)[0])


def _macro_f1_rows(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Macro-F1 of each row of (resamples, n) label arrays, vectorized over the rows."""
    rows = truth.shape[0]
    offsets = (np.arange(rows) * classes)[:, None]
    size = rows * classes

    def count(values: np.ndarray) -> np.ndarray:
        return np.bincount((values + offsets).ravel(), minlength=size).reshape(rows, classes)

    hits = truth == predicted
    true_positive = np.bincount((truth + offsets)[hits], minlength=size).reshape(rows, classes)
    support, guessed = count(truth), count(predicted)
    denominator = support + guessed
    f1 = np.divide(
        2 * true_positive, denominator, out=np.zeros(denominator.shape), where=denominator > 0
    )
    present = support > 0
    scores: np.ndarray = np.where(present, f1, 0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return scores


@dataclass(frozen=True)
class Comparison:
    """Both models on the same test images, and the paired-bootstrap interval of the gain."""

    images: int
    new_score: float
    champion_score: float
    gain: float
    low: float
    high: float
    resamples: int
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    truth: Sequence[int] | np.ndarray,
    new_probs: np.ndarray,
    champion_probs: np.ndarray,
    *,
    resamples: int = PARAMETERS["promotion_resamples"].default,
    confidence: float = PARAMETERS["promotion_confidence"].default,
    bootstrap_seed: int = 0,
) -> Comparison:
    """Macro-F1 of both models on the same images, and a paired bootstrap of the gain."""
    y = np.asarray(truth, dtype=int)
    classes = max(new_probs.shape[1], champion_probs.shape[1])
    new, old = new_probs.argmax(axis=1), champion_probs.argmax(axis=1)
    new_score, old_score = macro_f1(y, new, classes), macro_f1(y, old, classes)
    rng = np.random.default_rng(bootstrap_seed)
    gains = np.empty(resamples)
    step = max(1, 200_000 // max(1, len(y)))  # resamples per vectorized block
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        picks = rng.integers(0, len(y), size=(count, len(y)))
        gains[start : start + count] = _macro_f1_rows(y[picks], new[picks], classes) - (
            _macro_f1_rows(y[picks], old[picks], classes)
        )
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(gains, [tail, 1.0 - tail])
    return Comparison(
        images=len(y),
        new_score=new_score,
        champion_score=old_score,
        gain=new_score - old_score,
        low=float(low),
        high=float(high),
        resamples=resamples,
        confidence=confidence,
    )


def decide(comparison: Comparison, margin: float) -> tuple[bool, str]:
    """Promote only when the gain exceeds ``margin`` and the interval's lower end is above 0."""
    c = comparison
    interval = f"{c.confidence:.0%} interval {c.low:+.4f} to {c.high:+.4f}"
    if c.gain <= margin:
        return False, (
            f"gain {c.gain:+.4f} on the same {c.images} test images does not exceed the margin "
            f"{margin:g} ({interval})"
        )
    if c.low <= 0:
        return False, (
            f"gain {c.gain:+.4f} on the same {c.images} test images is within noise: the "
            f"{interval} reaches 0"
        )
    return True, f"gain {c.gain:+.4f} on the same {c.images} test images ({interval})"
