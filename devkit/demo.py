"""Offline demo: the data stages end to end on this machine, with no internet.

It starts an in-memory S3 endpoint and the local image server, points a sample of the CrowdFlower
CSV at that server (its images are synthetic: a coloured patch per label on noise, so a model can
learn something, but they are not the real photos), and runs ingest, download and split.

Usage: ``python -m devkit demo --sample 200``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import pandas as pd

from devkit.imageserver import ImageServer
from devkit.servers import local_s3
from ml.download import DownloadConfig, download
from ml.fetch import FetchConfig
from ml.ingest import CROWDFLOWER_LABEL, find_columns, parse_csv
from ml.labels import LABELS
from ml.params import PARAMETERS
from ml.progress import Progress
from ml.redact import get_logger
from ml.splits import make_splits
from ml.storage import ObjectStore, S3Uri

#: The run's seed by default: the demo samples its rows and splits them with it.
SEED: int = PARAMETERS["seed"].default

log = get_logger(__name__)

REPO = Path(__file__).resolve().parent.parent
DATASET_CSV = REPO.parent / "shared" / "data" / "image-Sentiment-polarity-DFE.csv"
#: Class shares of the real dataset (ANALYSIS.md), used for a generated stand-in.
REAL_SHARES = (0.0181, 0.1357, 0.2707, 0.5477, 0.0277)
#: Demo rows (numbered in the staged CSV) made faulty, so the manifest shows other statuses.
DEMO_FAULTS = ((7, "404"), (13, "truncated"), (19, "html"), (23, "redirect-blocked"))
#: Near-duplicate copies added to the demo CSV: (row whose picture is copied, how it is
#: changed: resized, recompressed), so the split has near-duplicate groups to keep together.
DEMO_COPIES = (
    (2, {"scale": "0.6", "quality": "60"}),
    (3, {"scale": "0.8", "quality": "45"}),
    (5, {"scale": "0.7"}),
    (8, {"quality": "35"}),
)


def generated_csv(rows: int, seed: int = SEED) -> bytes:
    """A CrowdFlower-shaped CSV (bare-CR records, long column names) with made-up URLs."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(LABELS, size=rows, p=np.array(REAL_SHARES) / sum(REAL_SHARES))
    frame = pd.DataFrame(
        {
            "_unit_id": np.arange(694551354, 694551354 + rows),
            "_golden": "FALSE",
            CROWDFLOWER_LABEL: labels,
            f"{CROWDFLOWER_LABEL}:confidence": rng.choice([0.3333, 0.6667, 1.0], size=rows),
            "imageurl": [
                f"http://farm{1 + i % 4}.static.flickr.com/{i % 9000}/{10_000 + i}_demo.jpg"
                for i in range(rows)
            ],
        }
    )
    return str(frame.to_csv(index=False, lineterminator="\r")).encode()


def point_at(data: bytes, base_url: str, *, rows: int = 0, seed: int = SEED) -> bytes:
    """The CSV (a stratified sample of ``rows`` of its rows, when given) with each URL served by
    the image server at ``base_url`` (a colour per label): a few rows faulty (DEMO_FAULTS) and
    a few resized or recompressed copies of other rows' pictures added (DEMO_COPIES)."""
    frame = parse_csv(data)
    columns = find_columns(list(frame.columns))
    url_column, label_column = columns["url"], columns["label"]
    if 0 < rows < len(frame):
        frame = _sample(frame, label_column, rows, seed)
    base = base_url.rstrip("/")
    paths = [f"{urlsplit(url).hostname}{urlsplit(url).path}" for url in frame[url_column].tolist()]
    faults = dict(DEMO_FAULTS)
    urls = []
    for i, (path, label) in enumerate(zip(paths, frame[label_column], strict=True), start=1):
        query = {"label": label, **({"fault": faults[i]} if i in faults else {})}
        urls.append(f"{base}/{path}?{urlencode(query)}")
    frame[url_column] = urls
    copies = [
        {
            **frame.iloc[row - 1].to_dict(),
            url_column: f"{base}/copies/{n}.jpg?"
            + urlencode(
                {"label": frame.iloc[row - 1][label_column], "content": f"/{paths[row - 1]}", **how}
            ),
        }
        for n, (row, how) in enumerate(DEMO_COPIES, start=1)
        if row <= len(frame) and row not in faults
    ]
    frame = pd.concat([frame, pd.DataFrame(copies, columns=frame.columns)], ignore_index=True)
    # Quote every field: the CrowdFlower file has newlines inside quoted fields.
    return str(frame.to_csv(index=False, lineterminator="\r", quoting=csv.QUOTE_ALL)).encode()


def _sample(frame: pd.DataFrame, label_column: str, rows: int, seed: int) -> pd.DataFrame:
    """``rows`` rows of ``frame``, label shares kept (as ingest's ``sample`` does)."""
    from ml.ingest import stratified_sample
    from ml.labels import normalize_label

    labels = frame[label_column].map(normalize_label)
    keyed = pd.DataFrame({"label": labels, "position": range(len(frame))}).dropna()
    chosen = stratified_sample(keyed.reset_index(drop=True), rows, seed)["position"]
    return frame.iloc[sorted(chosen)].reset_index(drop=True)


def source_csv(csv_path: str | None = None, rows: int = 500, seed: int = SEED) -> bytes:
    """The CSV to sample: ``csv_path``, else the CrowdFlower file beside the repository, else
    a generated stand-in of the same shape."""
    if csv_path:
        from ml import csvsource

        csvsource.check_available(csv_path)
        return csvsource.read_bytes(csv_path)
    if DATASET_CSV.is_file():
        return DATASET_CSV.read_bytes()
    log.info("dataset CSV not found at %s; generating a stand-in", DATASET_CSV)
    return generated_csv(rows, seed)


def stage_demo_inputs(
    base_url: str,
    sample_uri: str,
    score_uri: str,
    csv_path: str | None = None,
    score_rows: int = 20,
    *,
    rows: int = 0,
) -> None:
    """Upload the demo's training CSV (``rows`` rows of the source, pointed at the image
    server) and a CSV of a few of its URLs for the batch-inference DAG to score."""
    data = point_at(source_csv(csv_path), base_url, rows=rows)
    upload_inputs(data, sample_uri, score_uri, score_rows)


def upload_inputs(data: bytes, sample_uri: str, score_uri: str, score_rows: int = 20) -> None:
    """Store ``data`` (a CSV) at ``sample_uri`` and its first ``score_rows`` URLs, as a CSV of
    URLs to score, at ``score_uri``."""
    store = ObjectStore()
    store.put_bytes(S3Uri.parse(sample_uri), data, content_type="text/csv")
    frame = parse_csv(data)
    urls = frame[find_columns(list(frame.columns))["url"]].head(score_rows)
    listing = "url\n" + "".join(f"{u}\n" for u in urls)
    store.put_bytes(S3Uri.parse(score_uri), listing.encode(), content_type="text/csv")


def run_demo(*, rows: int = 200, csv: str | None = None, seed: int = SEED) -> dict[str, Any]:
    """Run ingest, download and split offline; returns the three summaries."""
    from ml.ingest import ingest

    source = source_csv(csv, max(rows * 2, 500), seed)
    with local_s3() as endpoint, ImageServer() as server:
        log.info("local S3 at %s, synthetic image server at %s", endpoint, server.base_url)
        store = ObjectStore()
        store.ensure_bucket("demo")
        csv_uri = S3Uri("demo", "input/sample.csv")
        staged = point_at(source, server.base_url, rows=rows, seed=seed)
        store.put_bytes(csv_uri, staged, content_type="text/csv")
        ingested = ingest(str(csv_uri), "s3://demo/pipeline", store=store).to_json()
        config = DownloadConfig(
            allow_networks=("127.0.0.0/8",), fetch=FetchConfig(deadline=10.0, retries=1)
        )
        with Progress(ingested["rows"], "download") as bar:
            downloaded = download(ingested["dataset"], config, store=store, on_result=bar.advance)
        splits = make_splits(ingested["dataset"], seed=seed, store=store)
    return {
        "note": "images are synthetic (served locally), not the real photos",
        "ingest": _brief(ingested),
        "download": downloaded,
        "split": splits,
    }


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("dataset", "rows", "labels", "rejected")}


__all__ = [
    "generated_csv",
    "local_s3",
    "point_at",
    "run_demo",
    "source_csv",
    "stage_demo_inputs",
    "upload_inputs",
]
