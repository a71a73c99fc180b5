"""Training data: a torch Dataset over the split manifest, reading images from the store through
a local cache; the transforms themselves are in :mod:`ml.transforms`. Stored images are already
small (shorter side 256 by default), so decoding is cheap.

Usage::

    train = SplitImages(rows, bucket, cache_dir, train_transform(224))
    x, y = next(iter(DataLoader(train, batch_size=64)))
    x = to_model_input(x, device, mean, std)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from ml.storage import ObjectStore, S3Uri
from ml.transforms import Transform, decode


class SplitImages(Dataset[tuple[torch.Tensor, int]]):
    """Images of one split: (uint8 CHW tensor, class index) from the store or a local cache."""

    def __init__(
        self, rows: pd.DataFrame, bucket: str, cache_dir: Path | None, transform: Transform
    ) -> None:
        self.keys = rows["object_key"].tolist()
        self.hashes = rows["sha256"].tolist()
        self.targets = [int(v) for v in rows["label_index"]]
        self.bucket = bucket
        self.cache_dir = cache_dir
        self.transform = transform
        self._store: ObjectStore | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, index: int) -> bytes:
        cached = self.cache_dir / f"{self.hashes[index]}.jpg" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        if self._store is None or self._pid != os.getpid():
            # boto3 clients must not cross a fork: one per DataLoader worker.
            self._store, self._pid = ObjectStore(), os.getpid()
        data = self._store.get_bytes(S3Uri(self.bucket, self.keys[index]))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(data)
            partial.replace(cached)
        return data

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode(self._read(index))), self.targets[index]


def class_counts(targets: Sequence[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for t in targets:
        counts[t] += 1
    return counts


def balanced_class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """``n / (k * count_c)`` per class (1 for an absent class): rare classes weigh more."""
    counts = class_counts(targets, num_classes)
    n = len(targets)
    return torch.tensor([n / (num_classes * c) if c else 1.0 for c in counts], dtype=torch.float32)
