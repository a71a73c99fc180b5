"""Training data: a torch Dataset over the split manifest, reading images from the store through
a local cache, with uint8 transforms on the CPU and normalization on the device.

Decoding uses libjpeg-turbo (``torchvision.io.decode_jpeg``) straight into a uint8 tensor; the
crop and flip run on uint8 too, and batches cross to the GPU as uint8 (4× less than float32), to
be converted and normalized there (:func:`to_model_input`). Stored images are already small
(shorter side 256 by default), so decoding is cheap.

Usage::

    train = SplitImages(rows, bucket, cache_dir, train_transform(224))
    x, y = next(iter(DataLoader(train, batch_size=64)))
    x = to_model_input(x, device, mean, std)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from ml.storage import ObjectStore, S3Uri

Transform = Callable[[torch.Tensor], torch.Tensor]

# torchvision 0.29 marks its (libjpeg-turbo) decoders deprecated in favour of TorchCodec, which
# is not packaged for every platform we run on; they still work and are the fastest option here.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning
)


def train_transform(size: int) -> Transform:
    """Random resized crop and horizontal flip, on uint8 CHW tensors."""
    return cast(
        Transform,
        v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]),
    )


def eval_transform(size: int, preset: dict[str, Any]) -> Transform:
    """The weights' own evaluation preprocessing (resize then centre crop), scaled to ``size``."""
    resize = round(size * preset["resize_size"] / preset["crop_size"])
    return cast(Transform, v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)]))


def to_model_input(
    batch: torch.Tensor,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 NCHW batch -> normalized float32 on ``device`` (channels_last when asked)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def decode(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 RGB CHW tensor."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return cast(torch.Tensor, decode_image(raw, mode=ImageReadMode.RGB))


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
