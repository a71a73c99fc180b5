"""Training data: the split manifest, a torch Dataset over it reading the store through a local
cache, and the three loaders; the transforms themselves are in :mod:`ml.transforms`. Stored
images are already small (shorter side 256 by default), so decoding is cheap.

Usage::

    table, digest = load_split(split_uri, store)
    loaders = make_loaders(table, bucket, cfg, rt, preprocessing)
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, WeightedRandomSampler

from ml.errors import PipelineError
from ml.labels import LABELS
from ml.progress import Progress
from ml.redact import get_logger
from ml.runtime import Runtime, loader_workers, seed_worker
from ml.storage import ObjectStore, S3Uri
from ml.train_config import TrainConfig
from ml.transforms import Preprocessing, Transform, decode

log = get_logger(__name__)

SPLIT_REQUIRED = ("split", "label_index", "object_key", "sha256", "label")
SPLITS = ("train", "valid", "test")


def load_split(uri: str, store: ObjectStore) -> tuple[pd.DataFrame, str]:
    """The split manifest and the SHA-256 of its bytes; a clear error when it is missing, is
    not a split manifest, or has an empty split."""
    data = store.get_bytes(S3Uri.parse(uri))
    try:
        table = pd.read_parquet(io.BytesIO(data))
    except Exception:  # pyarrow raises several types for a damaged file
        raise PipelineError(
            f"{uri} is not a readable Parquet file; pass the 'split' URI that the split stage "
            "printed (.../splits/<name>/splits.parquet), or rerun the split stage"
        ) from None
    missing = [c for c in SPLIT_REQUIRED if c not in table.columns]
    if missing:
        raise PipelineError(
            f"{uri} is not a split manifest (no {', '.join(missing)} column); pass the 'split' "
            "URI that the split stage printed (.../splits/<name>/splits.parquet)"
        )
    for name in SPLITS:
        if not (table["split"] == name).any():
            raise PipelineError(
                f"the {name} split of {uri} is empty; use more images or other --ratios"
            )
    return table, hashlib.sha256(data).hexdigest()


class SplitImages(Dataset[tuple[Any, ...]]):
    """Images of one split: (uint8 CHW tensor, class index) from the store or a local cache,
    with the image's loss weight as a third item when ``weighted`` (see :meth:`weight`)."""

    def __init__(
        self,
        rows: pd.DataFrame,
        bucket: str,
        cache_dir: Path | None,
        transform: Transform,
        weighted: bool = False,
    ) -> None:
        self.keys = rows["object_key"].tolist()
        self.urls = rows["url"].tolist() if "url" in rows else [""] * len(self.keys)
        self.hashes = rows["sha256"].tolist()
        self.targets = [int(v) for v in rows["label_index"]]
        #: The annotators' agreement on each label (NaN where the CSV had none).
        self.agreement = (
            [float(v) for v in rows["agreement"]]
            if "agreement" in rows
            else [float("nan")] * len(self.keys)
        )
        self.weighted = weighted
        self.bucket = bucket
        self.cache_dir = cache_dir
        self.transform = transform
        self._store: ObjectStore | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.keys)

    def cached(self, index: int) -> Path | None:
        return self.cache_dir / f"{self.hashes[index]}.jpg" if self.cache_dir else None

    def read(self, index: int) -> bytes:
        cached = self.cached(index)
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        if self._store is None or self._pid != os.getpid():
            # boto3 clients must not cross a fork: one per DataLoader worker.
            self._store, self._pid = ObjectStore(), os.getpid()
        data = self._store.get_bytes(S3Uri(self.bucket, self.keys[index]))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.{id(data)}.partial")
            partial.write_bytes(data)
            partial.replace(cached)
        return data

    def weight(self, index: int) -> float:
        """The image's loss weight with ``--agreement-weighting``: its annotators' agreement
        (the CrowdFlower export's values lie in [1/3, 1]), 1 where the CSV gave none."""
        value = self.agreement[index]
        return 1.0 if math.isnan(value) else min(1.0, max(0.0, value))

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image = self.transform(decode(self.read(index)))
        if self.weighted:
            return image, self.targets[index], self.weight(index)
        return image, self.targets[index]


def prefetch(datasets: Sequence[SplitImages], threads: int = 32) -> int:
    """Fill the local cache from the store with many parallel reads before training starts,
    so the first epoch does not wait on one S3 request per image; returns the images fetched."""
    todo = [
        (dataset, i)
        for dataset in datasets
        for i in range(len(dataset))
        if (path := dataset.cached(i)) is not None and not path.is_file()
    ]
    if not todo:
        return 0
    with Progress(len(todo), "prefetch images") as bar, ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda job: job[0].read(job[1]), todo):
            bar.advance("ok")
    return len(todo)


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


@dataclass
class Loaders:
    train: DataLoader[Any]
    valid: DataLoader[Any]
    test: DataLoader[Any]
    train_sampler: Sampler[int] | None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    class_weights: torch.Tensor | None = None
    #: Random streams the loaders draw from (saved in checkpoints for an exact resume).
    generators: dict[str, torch.Generator] = field(default_factory=dict)


def _train_sampler(
    train_set: SplitImages,
    cfg: TrainConfig,
    rt: Runtime,
    generators: dict[str, torch.Generator],
) -> Sampler[int] | None:
    """A shard per rank under torchrun; class-balanced draws with ``--imbalance sampler``;
    else None (the loader shuffles)."""
    if rt.world > 1:
        if cfg.imbalance == "sampler":
            raise PipelineError(
                "--imbalance sampler runs in one process only; use class_weights with torchrun"
            )
        return DistributedSampler(train_set, rt.world, rt.rank, shuffle=True, seed=cfg.seed)
    if cfg.imbalance != "sampler":
        return None
    per_class = class_counts(train_set.targets, len(LABELS))
    draw = [1.0 / per_class[t] for t in train_set.targets]
    generators["sampler"] = torch.Generator().manual_seed(cfg.seed + 1)
    return WeightedRandomSampler(draw, len(draw), replacement=True, generator=generators["sampler"])


def make_loaders(
    table: pd.DataFrame,
    bucket: str,
    cfg: TrainConfig,
    rt: Runtime,
    preprocessing: Preprocessing,
) -> Loaders:
    """Train (shuffled or sampled, full batches only), valid and test loaders over the split."""
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "image-sentiment" / "images")
    parts = {name: table[table["split"] == name].reset_index(drop=True) for name in SPLITS}
    train_set = SplitImages(
        parts["train"], bucket, cache, preprocessing.train_transform(), cfg.agreement_weighting
    )
    evaluation = preprocessing.eval_transform()
    valid_set = SplitImages(parts["valid"], bucket, cache, evaluation)
    test_set = SplitImages(parts["test"], bucket, cache, evaluation)
    if rt.local_rank == 0:
        prefetch([train_set, valid_set, test_set])
    if rt.world > 1:
        torch.distributed.barrier()  # the other ranks read the cache the first rank filled
    # Each rank draws its own stream; the sampler's seed is shared so shards never overlap.
    generators = {"shuffle": torch.Generator().manual_seed(cfg.seed + rt.rank)}
    sampler = _train_sampler(train_set, cfg, rt, generators)
    cuda = rt.device.type == "cuda"
    workers = loader_workers(cfg.workers, rt.world)
    common: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": workers,
        "pin_memory": cuda,
        "worker_init_fn": seed_worker,
    }
    if workers > 0:
        common.update(persistent_workers=cuda, prefetch_factor=4 if cuda else 2)
    # Full batches only: fixed shapes for cuDNN and torch.compile, no tiny last step (unless
    # the split is smaller than one batch per process, where that would leave nothing).
    full = len(train_set) >= cfg.batch_size * rt.world
    train = DataLoader(
        train_set,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=full,
        generator=generators["shuffle"],
        **common,
    )
    valid = DataLoader(valid_set, shuffle=False, **common)
    test = DataLoader(test_set, shuffle=False, **common)
    counts = {
        name: {label: int((part["label"] == label).sum()) for label in LABELS}
        for name, part in parts.items()
    }
    weights = (
        balanced_class_weights(train_set.targets, len(LABELS))
        if cfg.imbalance == "class_weights"
        else None
    )
    return Loaders(train, valid, test, sampler, counts, weights, generators)
