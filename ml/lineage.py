"""Lineage, both ways: what a model version learned from, and where an image went.

A version's lineage is read from what the pipeline recorded: the MLflow run (every training
parameter, the split's SHA-256, the Airflow run), the version's tags (code version), the
dataset's ``dataset.json`` (the CSV and its content hash) and the split manifest as it was when
the version was registered (a copy kept under ``audit/lineage/<model>/``, since a later split
of the same dataset may rewrite the split's file).

An image's lineage is found by its URL (as the CSV gave it) or the SHA-256 of its stored bytes:
the datasets whose download manifest holds it, the splits (and which side) that hold it, the
model versions that trained or were tested on it, and the batch-inference outputs under the
store that scored it (their rows carry ``sha256`` and ``model_version``).

Usage: ``version_lineage("image-sentiment", 7, root="s3://bucket/prefix")``;
``image_lineage("https://example.com/a.jpg", root=...)``.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ml.containment import FORGET_IMAGE_RULE, check_name
from ml.errors import PipelineError
from ml.labels import LABELS
from ml.layout import (
    DatasetLayout,
    SplitLayout,
    StoreLayout,
    is_run_predictions,
    is_split_manifest,
    manifest_dataset,
)
from ml.redact import get_logger, redact_url
from ml.storage import ObjectStore
from ml.uri import S3Uri

log = get_logger(__name__)

SHA256 = re.compile(r"[0-9a-f]{64}")


def check_target(target: str) -> str:
    """An image named by its http(s) URL or its SHA-256 (the forget form's rule,
    :data:`~ml.containment.FORGET_IMAGE_RULE`); a hash comes back in lower case."""
    text = (target or "").strip()
    if not FORGET_IMAGE_RULE.matches(text):
        raise PipelineError(
            "name the image by its http(s) URL (as the CSV gave it) or by the SHA-256 of its "
            f"stored bytes (64 hex digits, see the manifest's sha256 column), got {text[:100]!r}"
        )
    return text.lower() if SHA256.fullmatch(text.lower()) else text


@dataclass
class Found:
    """Where one image is: its URLs and content hashes, and the rows that hold it."""

    target: str
    urls: set[str] = field(default_factory=set)
    sha256s: set[str] = field(default_factory=set)
    phashes: set[str] = field(default_factory=set)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    splits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.urls or self.sha256s)


def _read_frame(store: ObjectStore, uri: S3Uri, columns: Iterable[str]) -> pd.DataFrame:
    data = store.get_bytes(uri)
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except Exception:  # a damaged file is reported, not fatal to the search
        log.warning("%s is not readable Parquet; left out of the search", uri)
        return pd.DataFrame(columns=list(columns))
    return frame.reindex(columns=list(columns))


def _matches(frame: pd.DataFrame, urls: set[str], sha256s: set[str]) -> pd.Series:
    hit = frame["url"].isin(urls) if urls else pd.Series(False, index=frame.index)
    if sha256s:
        hit |= frame["sha256"].isin(sha256s)
    return hit


def find_image(store: ObjectStore, root: str, target: str, *, groups: bool = True) -> Found:
    """Every dataset and split under ``root`` holding the image ``target``; with ``groups``,
    its near-duplicates too (the other members of its group in each split)."""
    target = check_target(target)
    layout = StoreLayout.parse(root)
    found = Found(target)
    if SHA256.fullmatch(target):
        found.sha256s.add(target)
    else:
        found.urls.add(redact_url(target))
    keys = store.list_keys(layout.datasets)
    columns = ("url", "sha256", "phash", "status", "label", "row")
    bucket = layout.root.bucket
    for key in keys:
        owner = manifest_dataset(bucket, key)
        if owner is None:
            continue
        frame = _read_frame(store, S3Uri(bucket, key), columns)
        rows = frame[_matches(frame, found.urls, found.sha256s)]
        if rows.empty:
            continue
        dataset = owner.uri
        found.urls.update(rows["url"].dropna())
        found.sha256s.update(s for s in rows["sha256"].dropna() if s)
        found.phashes.update(p for p in rows["phash"].dropna() if p)
        for row in rows.itertuples():
            found.datasets.append(
                {"dataset": dataset, "row": int(row.row), "url": row.url, "status": row.status}
            )
    for key in [k for k in keys if is_split_manifest(k)]:
        uri = S3Uri(layout.root.bucket, key)
        frame = _read_frame(store, uri, ("url", "sha256", "phash", "group", "split", "label"))
        hit = _matches(frame, found.urls, found.sha256s)
        if not hit.any():
            continue
        if groups:
            hit |= frame["group"].isin(set(frame.loc[hit, "group"]))
        for row in frame[hit].itertuples():
            found.splits.append(
                {"split": str(uri), "side": row.split, "url": row.url, "sha256": row.sha256}
            )
            found.urls.add(row.url)
            found.sha256s.add(row.sha256)
            if isinstance(row.phash, str) and row.phash:
                found.phashes.add(row.phash)
    return found


# ------------------------------------------------------------------------------ versions


def snapshot_uri(root: str | S3Uri, name: str, version: str | int) -> S3Uri:
    layout = StoreLayout.parse(root)
    return layout.kept_split(name, version)


def keep_split(store: ObjectStore, root: S3Uri, name: str, version: str, split: str) -> S3Uri:
    """Copy the split a version trained on next to the audit trail (never overwritten)."""
    target = snapshot_uri(root, name, version)
    store.put_bytes(
        target,
        store.get_bytes(S3Uri.parse(split)),
        content_type="application/vnd.apache.parquet",
        if_absent=True,
    )
    return target


def _version_split(store: ObjectStore, root: str, name: str, version: Any) -> S3Uri | None:
    """The split a version trained on: the kept copy, else the split its tag names."""
    kept = snapshot_uri(root, name, version.version)
    if store.exists(kept):
        return kept
    split = (version.tags or {}).get("split", "")
    if split.startswith("s3://") and store.exists(S3Uri.parse(split)):
        return S3Uri.parse(split)
    return None


def versions_containing(
    client: Any, store: ObjectStore, root: str, name: str, sha256s: set[str]
) -> list[dict[str, Any]]:
    """The versions of ``name`` whose split holds any of ``sha256s``, with the sides."""
    out = []
    for version in sorted(
        client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)
    ):
        uri = _version_split(store, root, name, version)
        if uri is None:
            continue
        frame = _read_frame(store, uri, ("sha256", "split"))
        sides = sorted(set(frame.loc[frame["sha256"].isin(sha256s), "split"]))
        if sides:
            out.append(
                {
                    "model": name,
                    "version": int(version.version),
                    "sides": sides,
                    "aliases": sorted(version.aliases or []),
                }
            )
    return out


def predictions_of(store: ObjectStore, root: str, found: Found) -> list[dict[str, Any]]:
    """Batch-inference rows under the store's runs that scored the image."""
    layout = StoreLayout.parse(root)
    out = []
    for key in store.list_keys(layout.runs):
        if not is_run_predictions(key):
            continue
        uri = S3Uri(layout.root.bucket, key)
        frame = _read_frame(store, uri, ("input", "sha256", "model_version", "label", "confidence"))
        hit = frame["input"].isin(found.urls) | frame["sha256"].isin(found.sha256s)
        for row in frame[hit].itertuples():
            out.append(
                {
                    "predictions": str(uri),
                    "model_version": None if pd.isna(row.model_version) else int(row.model_version),
                    "label": row.label,
                    "confidence": None if pd.isna(row.confidence) else float(row.confidence),
                }
            )
    return out


def image_lineage(
    target: str,
    *,
    root: str,
    name: str,
    store: ObjectStore | None = None,
    client: Any | None = None,
) -> dict[str, Any]:
    """Every dataset, split (and side), model version and batch-inference output that holds or
    scored the image named by ``target`` (its URL or SHA-256)."""
    from ml import mlflow_access

    check_name(name, "model_name")
    store = store or ObjectStore()
    found = find_image(store, root, target, groups=False)
    if not (found.datasets or found.splits):
        raise PipelineError(
            f"no dataset under {root} holds an image with {_shown(found.target)}; give the URL "
            "exactly as the CSV has it, or the sha256 from a manifest"
        )
    client = mlflow_access.checked_client(client)
    return {
        "image": _shown(found.target),
        "urls": sorted(found.urls),
        "sha256": sorted(found.sha256s),
        "datasets": found.datasets,
        "splits": found.splits,
        "model_versions": versions_containing(client, store, root, name, found.sha256s),
        "predictions": predictions_of(store, root, found),
    }


def _shown(target: str) -> str:
    return target if SHA256.fullmatch(target) else redact_url(target)


def split_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per split and label."""
    counts: dict[str, dict[str, int]] = {}
    for (side, label), n in frame.groupby(["split", "label"]).size().items():
        counts.setdefault(str(side), dict.fromkeys(LABELS, 0))[str(label)] = int(n)
    return counts


def version_lineage(
    name: str,
    version: str | int,
    *,
    root: str,
    store: ObjectStore | None = None,
    client: Any | None = None,
) -> dict[str, Any]:
    """What version ``version`` of ``name`` learned from: enough to rebuild its training set."""
    from ml import mlflow_access
    from ml.audit import model_version

    check_name(name, "model_name")
    client = mlflow_access.checked_client(client)
    store = store or ObjectStore()
    found = model_version(client, name, version)
    run = client.get_run(found.run_id)
    tags, params = dict(found.tags or {}), dict(run.data.params)
    split = run.data.tags.get("split", "") or tags.get("split", "")
    dataset = run.data.tags.get("dataset", "") or tags.get("dataset", "")
    result: dict[str, Any] = {
        "model": name,
        "version": int(found.version),
        "aliases": sorted(found.aliases or []),
        "mlflow_run": found.run_id,
        "mlflow_experiment": run.info.experiment_id,
        "airflow_run": run.data.tags.get("orchestrator_run_id", "")
        or tags.get("orchestrator_run_id", ""),
        "code_version": tags.get("code_version", ""),
        "parameters": params,
        "dataset": {"uri": dataset},
        "split": {"uri": split, "sha256": params.get("split_sha256", "")},
        "forgotten_data": tags.get("audit.contains_forgotten", "") == "true",
    }
    if dataset:
        info = store.read_json(DatasetLayout.parse(dataset).info)
        result["dataset"].update(
            csv=info.get("source", ""),
            csv_sha256=info.get("source_sha256", ""),
            rows=info.get("rows"),
            options=info.get("options", {}),
        )
    kept = _version_split(store, root, name, found)
    if kept is not None:
        data = store.get_bytes(kept)
        frame = pd.read_parquet(io.BytesIO(data))
        digest = hashlib.sha256(data).hexdigest()
        result["split"].update(
            kept_copy=str(kept),
            kept_copy_sha256=digest,
            matches_training=digest == result["split"]["sha256"],
            images=split_counts(frame),
        )
        if split:
            result["rebuild"] = _rebuild(split, result["split"]["sha256"], store)
    return result


def _rebuild(split: str, sha256: str, store: ObjectStore) -> str:
    uri = S3Uri.parse(split)
    same = store.exists(uri) and hashlib.sha256(store.get_bytes(uri)).hexdigest() == sha256
    layout = SplitLayout.parse(split)
    if same:
        return f"the split is unchanged: python -m ml train --split {split}"
    return (
        f"the split at {split} has changed since; the kept copy lists the exact images "
        f"(dataset {layout.dataset.uri})"
    )
