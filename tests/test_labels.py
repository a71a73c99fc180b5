from __future__ import annotations

import pytest

from ml.labels import LABEL_INDEX, LABELS, normalize_label


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Highly positive", "Highly positive"),
        ("highly_positive", "Highly positive"),
        ("  HIGHLY   NEGATIVE ", "Highly negative"),
        ("highly-negative", "Highly negative"),
        ("neutral", "Neutral"),
        ("Positive\t", "Positive"),
        ("very positive", None),
        ("", None),
        (None, None),
        (3, None),
    ],
)
def test_normalize_label(raw: object, expected: str | None) -> None:
    assert normalize_label(raw) == expected


def test_labels_are_ordered_by_sentiment() -> None:
    assert LABELS[0] == "Highly negative" and LABELS[-1] == "Highly positive"
    assert [LABEL_INDEX[name] for name in LABELS] == [0, 1, 2, 3, 4]
