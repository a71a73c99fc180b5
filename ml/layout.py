"""Where each stage keeps its outputs in the store: one place that names every key.

A store is ``s3://BUCKET/PREFIX``; under it::

    images/ab/abcdef....jpg                    content-addressed images, shared by all datasets
    datasets/<id>/records.parquet              ingest: the canonical, validated rows
    datasets/<id>/rejected.parquet             ingest: rejected rows with reasons
    datasets/<id>/dataset.json                 ingest: summary and options
    datasets/<id>/downloads/parts/*.parquet    download: per-batch manifest parts (append-only)
    datasets/<id>/downloads/manifest.parquet   download: one row per URL, the best attempt
    datasets/<id>/splits/<name>/splits.parquet split: one row per ok image with its split
"""

from __future__ import annotations

from dataclasses import dataclass

from ml.errors import PipelineError
from ml.storage import S3Uri

_DATASETS = "datasets"


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

    @property
    def download_manifest(self) -> S3Uri:
        return self.root.child("downloads", "manifest.parquet")

    def split_dir(self, name: str) -> S3Uri:
        return self.root.child("splits", name)

    def image(self, sha256: str) -> S3Uri:
        """The content-addressed key of a stored image."""
        return self.store.child("images", sha256[:2], f"{sha256}.jpg")
