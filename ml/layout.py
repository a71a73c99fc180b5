"""Where each stage keeps its outputs in the store: the one place that names every key, and
parses the URIs it produces.

A store is ``s3://BUCKET/PREFIX``; under it::

    images/ab/abcdef....jpg                          content-addressed images, shared by datasets
    datasets/<id>/records.parquet                    ingest: the canonical, validated rows
    datasets/<id>/rejected.parquet                   ingest: rejected rows with reasons
    datasets/<id>/dataset.json                       ingest: summary and options
    datasets/<id>/downloads/parts/<start>-<stop>/*.parquet   download: manifest parts per batch
    datasets/<id>/downloads/manifest.parquet         download: one row per record, the best try
    datasets/<id>/downloads/state.json               download: what a finished download saw
    datasets/<id>/splits/<name>/splits.parquet       split: one row per ok image with its split
    datasets/<id>/splits/<name>/splits.json          split: its summary
    datasets/<id>/training/<key>/                    train (by hand): checkpoints, see below
    runs/<run>-<hash>/training/                      train (orchestrated): checkpoints of a run
    runs/<run>-<hash>/predictions.parquet            batch inference of a run
    audit/aliases/<model>/<n>.json                   alias moves, append-only (ml.audit)
    audit/forget/<n>.json                            requests to forget an image (ml.forget)
    audit/lineage/<model>/v<N>-split.parquet         the split a version trained on (ml.lineage)
    drift/<model>/v<N>-reference.npz                 a version's test-image features (ml.drift)

A checkpoint folder holds ``last.pt``, ``best-e<N>.pt`` and ``result.json``.

Usage: ``DatasetLayout.parse(uri).records``; ``SplitLayout.parse(split_uri).dataset``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ml.errors import PipelineError
from ml.uri import S3Uri

_DATASETS = "datasets"
_AUDIT = "audit"
_PREDICTIONS = "predictions.parquet"
_SPLITS = "splits"
_PART_FOLDER = re.compile(r"^(\d{8})-(\d{8})$")
_BEST = re.compile(r"best-e(\d+)\.pt$")


@dataclass(frozen=True)
class StoreLayout:
    """The store's top level: images, datasets and orchestrator runs."""

    root: S3Uri

    @classmethod
    def parse(cls, uri: str | S3Uri) -> StoreLayout:
        """The store's root, from its URI (``ML_STORE``) or an already parsed one."""
        return cls(uri if isinstance(uri, S3Uri) else S3Uri.parse(uri.rstrip("/")))

    def image(self, sha256: str) -> S3Uri:
        """The content-addressed key of a stored image."""
        return self.root.child("images", sha256[:2], f"{sha256}.jpg")

    def alias_ledger(self, model: str) -> S3Uri:
        """The ledger of a registered model's alias moves (see :mod:`ml.audit`)."""
        return self.root.child(_AUDIT, "aliases", model)

    @property
    def forget_ledger(self) -> S3Uri:
        """The ledger of requests to forget an image (see :mod:`ml.forget`)."""
        return self.root.child(_AUDIT, "forget")

    def drift_reference(self, model: str, version: str | int) -> S3Uri:
        """A version's test-image features and labels, for drift checks (see :mod:`ml.drift`)."""
        return self.root.child("drift", model, f"v{version}-reference.npz")

    def kept_split(self, model: str, version: str | int) -> S3Uri:
        """The copy of the split a model version trained on (see :mod:`ml.lineage`)."""
        return self.root.child(_AUDIT, "lineage", model, f"v{version}-split.parquet")

    @property
    def datasets(self) -> S3Uri:
        return self.root.child(_DATASETS)

    @property
    def runs(self) -> S3Uri:
        return self.root.child("runs")

    def run(self, run_id: str) -> S3Uri:
        """The folder of one orchestrator run (a retried task writes to the same place).

        Its name is a readable slug of the run id plus a hash of the exact id, so two
        different run ids never share a folder, whatever characters they differ in.
        """
        run_id = run_id or "manual"
        slug = re.sub(r"[^A-Za-z0-9_=-]+", "_", run_id).strip("_")[:80] or "run"
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
        return self.root.child("runs", f"{slug}-{digest}")

    def run_training(self, run_id: str) -> S3Uri:
        return self.run(run_id).child("training")

    def run_predictions(self, run_id: str) -> S3Uri:
        return self.run(run_id).child(_PREDICTIONS)


@dataclass(frozen=True)
class DatasetLayout:
    """The keys of one dataset. Usage: ``DatasetLayout.parse(uri).records``."""

    store: S3Uri
    dataset_id: str

    @classmethod
    def parse(cls, uri: str) -> DatasetLayout:
        """Parse the dataset URI that ``ingest`` printed."""
        root = S3Uri.parse(uri)
        parts = root.key.split("/")
        if len(parts) < 2 or parts[-2] != _DATASETS or not parts[-1]:
            raise PipelineError(
                f"{uri!r} is not a dataset URI; pass the 'dataset' value that ingest printed "
                "(s3://BUCKET/PREFIX/datasets/ID)"
            )
        return cls(S3Uri(root.bucket, "/".join(parts[:-2])), parts[-1])

    @property
    def root(self) -> S3Uri:
        return self.store.child(_DATASETS, self.dataset_id)

    @property
    def uri(self) -> str:
        return str(self.root)

    @property
    def records(self) -> S3Uri:
        return self.root.child("records.parquet")

    @property
    def rejected(self) -> S3Uri:
        return self.root.child("rejected.parquet")

    @property
    def info(self) -> S3Uri:
        return self.root.child("dataset.json")

    @property
    def download_parts(self) -> S3Uri:
        return self.root.child("downloads", "parts")

    def download_part(self, start: int, stop: int, name: str) -> S3Uri:
        """A manifest part of the records ``[start, stop)``."""
        return self.download_parts.child(f"{start:08d}-{stop:08d}", name)

    @property
    def download_manifest(self) -> S3Uri:
        return self.root.child("downloads", "manifest.parquet")

    @property
    def download_state(self) -> S3Uri:
        """What the last download that left every record done saw (:mod:`ml.download_state`)."""
        return self.root.child("downloads", "state.json")

    def split_dir(self, name: str) -> S3Uri:
        return self.root.child(_SPLITS, name)

    def split(self, name: str) -> SplitLayout:
        return SplitLayout(self, name)

    def training(self, key: str) -> S3Uri:
        """The checkpoint folder of a training started by hand (named by its identity)."""
        return self.root.child("training", key)

    def image(self, sha256: str) -> S3Uri:
        """The content-addressed key of a stored image."""
        return StoreLayout(self.store).image(sha256)


def manifest_dataset(bucket: str, key: str) -> DatasetLayout | None:
    """The dataset whose collected download manifest ``key`` is, or None for any other key."""
    head, sep, tail = key.rpartition("/downloads/")
    if not sep or tail != "manifest.parquet":
        return None
    try:
        return DatasetLayout.parse(str(S3Uri(bucket, head)))
    except PipelineError:
        return None


def is_run_predictions(key: str) -> bool:
    """Whether ``key`` is a batch inference's output under ``runs/``."""
    parts = key.split("/")
    return len(parts) >= 3 and parts[-3] == "runs" and parts[-1] == _PREDICTIONS


def is_split_manifest(key: str) -> bool:
    """Whether ``key`` is a split manifest (``.../splits/<name>/splits.parquet``)."""
    parts = key.split("/")
    return len(parts) >= 3 and parts[-3] == _SPLITS and parts[-1] == "splits.parquet"


def part_range(key: str) -> tuple[int, int] | None:
    """The record range ``(start, stop)`` a manifest part's key names, or None."""
    pieces = key.rsplit("/", 2)
    if len(pieces) < 3:
        return None
    match = _PART_FOLDER.match(pieces[-2])
    return (int(match.group(1)), int(match.group(2))) if match else None


def split_name(seed: int, ratios: Sequence[float]) -> str:
    """``seed0-80-15-5``: a split's folder name from its seed and ratios."""
    return f"seed{seed}-" + "-".join(f"{round(r * 100, 2):g}" for r in ratios)


@dataclass(frozen=True)
class SplitLayout:
    """The keys of one split of a dataset. Usage: ``SplitLayout.parse(uri).dataset``."""

    dataset: DatasetLayout
    name: str

    @classmethod
    def parse(cls, uri: str) -> SplitLayout:
        """Parse the split URI that the split stage printed (``.../splits.parquet``)."""
        root = S3Uri.parse(uri)
        parts = root.key.split("/")
        if len(parts) < 5 or parts[-3] != _SPLITS or not parts[-1].endswith(".parquet"):
            raise PipelineError(
                f"{uri!r} is not a split URI; pass the 'split' value that the split stage "
                "printed (s3://BUCKET/PREFIX/datasets/ID/splits/NAME/splits.parquet)"
            )
        dataset = DatasetLayout.parse(str(S3Uri(root.bucket, "/".join(parts[:-3]))))
        return cls(dataset, parts[-2])

    @property
    def folder(self) -> S3Uri:
        return self.dataset.split_dir(self.name)

    @property
    def manifest(self) -> S3Uri:
        return self.folder.child("splits.parquet")

    @property
    def summary(self) -> S3Uri:
        return self.folder.child("splits.json")


@dataclass(frozen=True)
class CheckpointLayout:
    """The files of one training's checkpoint folder."""

    folder: S3Uri

    @property
    def last(self) -> S3Uri:
        return self.folder.child("last.pt")

    @property
    def result(self) -> S3Uri:
        return self.folder.child("result.json")

    def best(self, epoch: int) -> S3Uri:
        return self.folder.child(f"best-e{epoch}.pt")

    @staticmethod
    def best_epoch(key: str) -> int | None:
        """The epoch a ``best-e<N>.pt`` key names, or None for any other key."""
        match = _BEST.search(key)
        return int(match.group(1)) if match else None
