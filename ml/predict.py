"""Batch inference with a registered model over a CSV of image URLs or object keys.

URLs are fetched with the downloader's safety rules (address policy, byte cap, deadline, image
checks); ``s3://`` URIs and object keys are read from the store. Each input row gets a status,
so one bad image never stops the batch.

Usage: ``predict("models:/image-sentiment@champion", "images.csv", "predictions.parquet")``.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import v2

from ml.download import DownloadConfig
from ml.errors import PipelineError
from ml.fetch import Fetcher, FetchError
from ml.imaging import ImageRejected, normalize_image
from ml.ingest import parse_csv, read_source
from ml.labels import LABELS
from ml.netpolicy import AddressPolicy
from ml.storage import ObjectStore, S3Uri
from ml.transforms import decode

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("url", "image_url", "imageurl", "uri", "object_key", "key", "image", "path")


def _input_column(frame: pd.DataFrame) -> str:
    lowered = {c.strip().lower(): c for c in frame.columns}
    for name in INPUT_COLUMNS:
        if name in lowered:
            return str(lowered[name])
    raise PipelineError(
        f"no image column among {list(frame.columns)[:10]}; name it url "
        "(http(s) or s3:// URIs) or object_key"
    )


class _Loader:
    """Bytes of one input (URL, s3 URI or object key), as a normalized JPEG."""

    def __init__(self, config: DownloadConfig, store: ObjectStore, bucket: str | None) -> None:
        self.fetcher = Fetcher(config.fetch, AddressPolicy.from_cidrs(config.allow_networks))
        self.config, self.store, self.bucket = config, store, bucket

    def __call__(self, value: str) -> tuple[bytes | None, str, str]:
        try:
            if value.startswith(("http://", "https://")):
                body = self.fetcher.fetch(value).body
            elif value.startswith("s3://"):
                body = self.store.get_bytes(S3Uri.parse(value))
            elif self.bucket:
                body = self.store.get_bytes(S3Uri(self.bucket, value.lstrip("/")))
            else:
                return None, "invalid_url", "an object key needs --bucket"
            return normalize_image(body, self.config.image).data, "ok", ""
        except FetchError as exc:
            return None, exc.status, str(exc)
        except ImageRejected as exc:
            return None, exc.status, str(exc)
        except PipelineError as exc:
            return None, "store_error", str(exc)


def predict(
    model_uri: str,
    csv: str,
    out: str,
    *,
    bucket: str | None = None,
    config: DownloadConfig | None = None,
    batch_size: int = 32,
    store: ObjectStore | None = None,
) -> dict[str, Any]:
    """Write one row per input with its predicted label and per-class probabilities."""
    import mlflow

    config = config or DownloadConfig()
    store = store or ObjectStore()
    frame = parse_csv(read_source(csv, store), csv)
    column = _input_column(frame)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:
        raise PipelineError(
            f"cannot load model {model_uri}: {str(exc).splitlines()[0][:200]} "
            "(is MLFLOW_TRACKING_URI set, and does the alias exist?)"
        ) from None
    meta = model.metadata.metadata or {}
    labels = list(meta.get("labels", LABELS))
    size = int(meta.get("image_size", 224))
    prepare = v2.Compose(
        [v2.Resize(int(meta.get("resize_size", size)), antialias=True), v2.CenterCrop(size)]
    )

    values = [str(v).strip() for v in frame[column]]
    loader = _Loader(config, store, bucket)
    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        loaded = list(pool.map(loader, values))
    probs = np.full((len(values), len(labels)), np.nan, dtype=np.float32)
    ready = [i for i, (data, _, _) in enumerate(loaded) if data is not None]
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        batch = torch.stack([prepare(decode(loaded[i][0] or b"")) for i in chunk])
        x = batch.float().div_(255.0).numpy()
        probs[chunk] = np.asarray(model.predict(x), dtype=np.float32)

    result = pd.DataFrame(
        {"input": values, "status": [s for _, s, _ in loaded], "error": [e for _, _, e in loaded]}
    )
    has = ~np.isnan(probs[:, 0])
    best = probs.argmax(axis=1)
    result["label"] = [labels[int(b)] if ok else None for b, ok in zip(best, has, strict=True)]
    result["confidence"] = probs.max(axis=1)  # NaN where the image could not be read
    for j, name in enumerate(labels):
        result[f"p_{name.lower().replace(' ', '_')}"] = probs[:, j]
    _write(result, out, store)
    counts = result.loc[has, "label"].value_counts().to_dict()
    failed = result.loc[~has, "status"].value_counts().to_dict()
    log.info("predicted %d of %d images (%s)", int(has.sum()), len(result), failed or "no failures")
    return {
        "predictions": out,
        "rows": len(result),
        "predicted": int(has.sum()),
        "labels": {k: int(v) for k, v in counts.items()},
        "failed": {k: int(v) for k, v in failed.items()},
        "model": model_uri,
    }


def _write(frame: pd.DataFrame, out: str, store: ObjectStore) -> None:
    parquet = out.endswith(".parquet")
    if out.startswith("s3://"):
        buffer = io.BytesIO()
        if parquet:
            frame.to_parquet(buffer, index=False)
        else:
            buffer.write(frame.to_csv(index=False).encode())
        store.put_bytes(S3Uri.parse(out), buffer.getvalue())
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if parquet:
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
