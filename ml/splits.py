"""Split: stratified, deterministic train/valid/test over the images that downloaded ok.

Images are grouped first, so one picture never lands in two splits (no leakage): identical bytes
(the same file behind two URLs) and near-duplicate pixels (the same photo at another size, JPEG
quality or a slight crop: perceptual hashes within a few bits, see :mod:`ml.dedup`), joined
transitively. Groups are ordered by a hash of (seed, the group's smallest content hash), which
makes the split independent of row order and stable for the same input and seed. Within each
label the group counts follow the ratios by largest remainder, and a class with at least as many
groups as splits gets at least one group in every split.

Usage: ``make_splits(dataset_uri, ratios=(0.8, 0.15, 0.05), seed=0)``.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from PIL import Image

from ml.dedup import groups, perceptual_hash
from ml.download import MANIFEST_COLUMNS, collect_manifest
from ml.errors import PipelineError
from ml.labels import LABEL_INDEX, LABELS
from ml.layout import DatasetLayout, split_name
from ml.params import PARAMETERS
from ml.progress import Progress
from ml.redact import get_logger
from ml.statuses import Status
from ml.storage import ObjectStore, S3Uri

log = get_logger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_COLUMNS = (
    "url",
    "id",
    "label",
    "label_index",
    "agreement",
    "sha256",
    "object_key",
    "width",
    "height",
    "phash",
    "group",
    "split",
)
#: Manifest columns a split can do without (written by newer downloads; filled in here).
OPTIONAL_COLUMNS = ("phash", "agreement")


def parse_ratios(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.8,0.15,0.05"`` -> (0.8, 0.15, 0.05); three non-negative numbers summing to 1."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise PipelineError(
            f"--ratios must be three numbers like 0.8,0.15,0.05, got {text!r}"
        ) from None
    if len(values) != 3 or any(v < 0 for v in values) or values[0] <= 0:
        raise PipelineError(f"--ratios needs train,valid,test with train > 0, got {text!r}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise PipelineError(f"--ratios must sum to 1, got {text!r} (sum {sum(values):g})")
    return values[0], values[1], values[2]


def allocate(n: int, ratios: Sequence[float]) -> list[int]:
    """Counts per split for ``n`` items: largest remainder, and the splits with a positive
    ratio get at least one item each, in split order, as far as ``n`` allows."""
    exact = [n * r for r in ratios]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(
        range(len(ratios)), key=lambda i: (exact[i] - counts[i], -i), reverse=True
    )
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    # Small classes still reach every split, train first, then valid, then test.
    for i in [i for i, r in enumerate(ratios) if r > 0][:n]:
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    return counts


def _order_key(seed: int, sha256: str) -> str:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def with_groups(images: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """``images`` with a ``group`` column (see :func:`ml.dedup.groups`; near duplicates only
    where a ``phash`` column has them) and counts of what was grouped."""
    phashes = images["phash"].tolist() if "phash" in images else [None] * len(images)
    ids, pairs = groups(images["sha256"].tolist(), phashes)
    grouped = images.assign(group=ids)
    distinct = grouped.drop_duplicates("sha256")
    sizes = distinct.groupby("group").size()
    near = sizes[sizes > 1]
    report = {
        "groups": int(sizes.size),
        "near_duplicate_groups": int(near.size),
        "near_duplicate_images": int(near.sum()),
        "near_duplicate_pairs": pairs,
        "largest_group": int(sizes.max()) if sizes.size else 0,
    }
    return grouped, report


def assign_splits(images: pd.DataFrame, ratios: Sequence[float], seed: int) -> pd.DataFrame:
    """Add ``group`` and ``split`` columns to ok manifest rows (url, label, sha256, and
    optionally phash); every group lands in one split."""
    if "group" not in images:
        images = with_groups(images)[0]
    groups = (
        images.groupby("group")
        .agg(
            group_label=(
                "label",
                lambda s: sorted(s.value_counts().items(), key=lambda kv: (-kv[1], kv[0]))[0][0],
            ),
            first=("sha256", "min"),
        )
        .reset_index()
    )
    groups["order"] = [_order_key(seed, sha) for sha in groups["first"]]
    groups["split"] = ""
    for label in LABELS:
        members = groups.index[groups["group_label"] == label]
        ordered = groups.loc[members].sort_values("order").index
        start = 0
        for name, count in zip(SPLITS, allocate(len(ordered), ratios), strict=True):
            groups.loc[ordered[start : start + count], "split"] = name
            start += count
    return images.merge(groups[["group", "split"]], on="group", how="left")


def _read_manifest(dataset: str, layout: DatasetLayout, store: ObjectStore) -> pd.DataFrame:
    """The download manifest; rebuilt from its parts when it is damaged or not ours."""
    if not store.exists(layout.download_manifest):
        raise PipelineError(
            f"{layout.download_manifest} does not exist; run the download stage first"
        )
    try:
        manifest = store.read_parquet(layout.download_manifest)
        if set(MANIFEST_COLUMNS) - set(OPTIONAL_COLUMNS) <= set(manifest.columns):
            return manifest
        problem = "lacks the manifest's columns"
    except PipelineError:
        problem = "is not readable Parquet"
    log.warning("%s %s; rebuilding it from the manifest parts", layout.download_manifest, problem)
    collect_manifest(dataset, store=store)
    return store.read_parquet(
        layout.download_manifest, hint="run the download stage again to rebuild it"
    )


def make_splits(
    dataset: str,
    *,
    ratios: str | Sequence[float] = PARAMETERS["ratios"].default,
    seed: int = PARAMETERS["seed"].default,
    store: ObjectStore | None = None,
) -> dict[str, Any]:
    """Write the split manifest for ``dataset``; returns its URI and counts per split and label."""
    fractions = parse_ratios(ratios)
    layout = DatasetLayout.parse(dataset)
    store = store or ObjectStore()
    manifest = _read_manifest(dataset, layout, store)
    images = manifest.loc[manifest["status"] == Status.OK].copy()
    if images.empty:
        raise PipelineError(
            f"no downloaded images in {dataset}; run the download stage first "
            f"(statuses: {manifest['status'].value_counts().to_dict()})"
        )
    images["label_index"] = images["label"].map(LABEL_INDEX).astype("int64")
    if "agreement" not in images:  # a manifest collected before agreement travelled with it
        images["agreement"] = float("nan")
    images["phash"] = fill_hashes(images, layout.store.bucket, store)
    images, grouping = with_groups(images)
    with Progress(len(images), "split") as bar:
        table = assign_splits(images, fractions, seed)[list(SPLIT_COLUMNS)]
        for name in table["split"]:
            bar.advance(name)
    table = table.sort_values(["split", "label_index", "url"], kind="stable").reset_index(drop=True)
    split = layout.split(split_name(seed, fractions))
    counts = {
        s: {
            label: int(((table["split"] == s) & (table["label"] == label)).sum())
            for label in LABELS
        }
        for s in SPLITS
    }
    summary = {
        "split": str(split.manifest),
        "dataset": dataset,
        "seed": seed,
        "ratios": list(fractions),
        "images": len(table),
        **grouping,
        "splits": counts,
    }
    store.write_parquet(split.manifest, table)
    store.write_json(split.summary, summary)
    log.info(
        "%d near-duplicate groups hold %d distinct images (largest group: %d); each group is in "
        "one split",
        grouping["near_duplicate_groups"],
        grouping["near_duplicate_images"],
        grouping["largest_group"],
    )
    for s in SPLITS:
        log.info("%s: %d images %s", s, sum(counts[s].values()), counts[s])
    return summary


def fill_hashes(images: pd.DataFrame, bucket: str, store: ObjectStore) -> list[str | None]:
    """The manifest's perceptual hashes, computed from the stored image for rows downloaded
    before the manifest had them (None where that image cannot be read)."""
    from concurrent.futures import ThreadPoolExecutor

    known = images["phash"] if "phash" in images else pd.Series([None] * len(images))
    hashes: list[str | None] = [h if isinstance(h, str) and h else None for h in known]
    missing = [i for i, h in enumerate(hashes) if h is None]
    if not missing:
        return hashes
    keys = images["object_key"].tolist()
    log.info(
        "computing perceptual hashes of %d images stored before the manifest had them", len(missing)
    )

    def compute(i: int) -> str | None:
        try:
            with Image.open(io.BytesIO(store.get_bytes(S3Uri(bucket, keys[i])))) as image:
                return perceptual_hash(image)
        except Exception:  # unreadable: this image groups by its bytes only
            return None

    with ThreadPoolExecutor(16) as pool:
        for i, value in zip(missing, pool.map(compute, missing), strict=True):
            hashes[i] = value
    return hashes
