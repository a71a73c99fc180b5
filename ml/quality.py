"""Likely label errors: held-out images whose given label the model contradicts most confidently.

In the spirit of confident learning (Northcutt et al., 2021): for each class, the threshold is
the model's mean probability of that class over the images *given* that class (its
self-confidence). An image is a likely label error when some other class reaches its own
threshold; the class with the highest probability among those is the suggested label, and the
images are ranked by how far that probability exceeds the given label's.

Only images the model did not train on are scored: the valid and test splits, predicted by the
final (best-epoch) model. The valid split chose that epoch, so its scores are slightly
optimistic; out-of-fold predictions over the training images would cover the whole dataset at
the cost of one training per fold, and are not made.

Usage: ``label_issues(held_out_frame(...))`` -> a ranked frame; ``LABEL_ISSUE_COLUMNS`` names its
columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ml.labels import LABELS
from ml.serving import probability_column

LABEL_ISSUE_COLUMNS = (
    "rank",
    "url",
    "sha256",
    "split",
    "given_label",
    "suggested_label",
    "confidence",
    "given_label_probability",
    "agreement",
    "score",
)
#: Images on the evaluation report's contact sheet of likely label errors.
SHEET_SIZE = 16


def held_out_frame(parts: Sequence[tuple[str, Any, np.ndarray]]) -> pd.DataFrame:
    """One row per held-out image from (split name, SplitImages, class probabilities)."""
    frames = []
    for name, images, probs in parts:
        frame = pd.DataFrame(
            {
                "url": list(images.urls),
                "sha256": list(images.hashes),
                "split": name,
                "label_index": list(images.targets),
                "agreement": list(images.agreement),
            }
        )
        for j, label in enumerate(LABELS):
            frame[probability_column(label)] = probs[:, j] if len(probs) else []
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def label_issues(frame: pd.DataFrame) -> pd.DataFrame:
    """The likely label errors of ``frame`` (held-out rows with class probabilities), most
    confident first, with the columns of :data:`LABEL_ISSUE_COLUMNS`."""
    if frame.empty:
        return pd.DataFrame(columns=list(LABEL_ISSUE_COLUMNS))
    probs = frame[[probability_column(label) for label in LABELS]].to_numpy(np.float64)
    given = frame["label_index"].to_numpy(int)
    thresholds = np.array(
        [probs[given == j, j].mean() if (given == j).any() else 1.0 for j in range(len(LABELS))]
    )
    others = probs >= thresholds  # each class at or above its own self-confidence
    others[np.arange(len(given)), given] = False
    flagged = others.any(axis=1)
    suggested = np.where(others, probs, -1.0).argmax(axis=1)
    rows = np.flatnonzero(flagged)
    chosen = probs[rows, suggested[rows]]
    own = probs[rows, given[rows]]
    issues = pd.DataFrame(
        {
            "url": frame["url"].to_numpy()[rows],
            "sha256": frame["sha256"].to_numpy()[rows],
            "split": frame["split"].to_numpy()[rows],
            "given_label": [LABELS[i] for i in given[rows]],
            "suggested_label": [LABELS[i] for i in suggested[rows]],
            "confidence": chosen.round(4),
            "given_label_probability": own.round(4),
            "agreement": frame["agreement"].to_numpy()[rows],
            "score": (chosen - own).round(4),
        }
    )
    issues = issues.sort_values(["score", "sha256"], ascending=[False, True], kind="stable")
    issues.insert(0, "rank", range(1, len(issues) + 1))
    return issues.reset_index(drop=True)[list(LABEL_ISSUE_COLUMNS)]
