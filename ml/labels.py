"""The five sentiment classes and the normalization of label spellings to them."""

from __future__ import annotations

import re

#: Class names in sentiment order; a label's index in this tuple is its class id.
LABELS: tuple[str, ...] = (
    "Highly negative",
    "Negative",
    "Neutral",
    "Positive",
    "Highly positive",
)
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABELS)}

_BY_KEY: dict[str, str] = {name.lower(): name for name in LABELS}
_SEPARATORS = re.compile(r"[\s_\-]+")


def normalize_label(raw: object) -> str | None:
    """Map a label spelling ("highly_positive", " NEUTRAL ") to its class name, or None.

    Usage: ``normalize_label("highly_positive") == "Highly positive"``.
    """
    if not isinstance(raw, str):
        return None
    key = _SEPARATORS.sub(" ", raw).strip().lower()
    return _BY_KEY.get(key)
