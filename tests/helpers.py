"""Small builders shared by tests."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from devkit.imageserver import ImageServer


def plain_csv(rows: Iterable[Sequence[object]], header: Sequence[str] = ("url", "label")) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def labelled_urls(
    server: ImageServer, per_label: dict[str, int], prefix: str = "img", **query: object
) -> list[tuple[str, str]]:
    """(url, label) pairs whose images carry their label's colour."""
    rows = []
    for label, count in per_label.items():
        for i in range(count):
            path = f"{prefix}/{label.replace(' ', '_')}/{i}.jpg"
            rows.append((server.url(path, label=label, **query), label))
    return rows
