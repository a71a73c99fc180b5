"""Small builders shared by tests."""

from __future__ import annotations

import contextlib
import csv
import io
import threading
from collections.abc import Iterable, Iterator, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from devkit.imageserver import ImageServer
from ml.train_config import TrainConfig


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    """``server`` answering on daemon threads; yields its base URL, and shuts it down and
    closes its socket on the way out."""
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def plain_csv(rows: Iterable[Sequence[object]], header: Sequence[str] = ("url", "label")) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def image_server_bytes(server: ImageServer, path: str, **query: object) -> bytes:
    """The bytes the image server answers for ``path`` (a client's own picture)."""
    import urllib.request

    with urllib.request.urlopen(server.url(path, **query), timeout=10) as response:
        data: bytes = response.read()
    return data


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


def small_config(split: str, cache: Path, **changes: Any) -> TrainConfig:
    """A ResNet-152 training small enough for a CPU: 64 px, 6 epochs, no pretrained weights."""
    base = TrainConfig(
        split=split,
        weights="none",
        epochs=6,
        batch_size=12,
        optimizer="sgd",
        learning_rate=0.03,
        warmup_epochs=0.5,
        image_size=64,
        workers=0,
        patience=0,
        cache_dir=str(cache),
        experiment="tests",
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base
