"""Batch inference with a registered model over a CSV of image URLs or object keys.

URLs are fetched with the downloader's safety rules (address policy, byte cap, deadline, image
checks); ``s3://`` URIs and object keys are read from the store. Each input row gets a status,
so one bad image never stops the batch.

Usage: ``predict("models:/image-sentiment@champion", "images.csv", "predictions.parquet")``.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ml import csvsource
from ml.containment import OUTPUT_SUFFIXES, check_model_uri, inside_s3
from ml.download import DownloadConfig
from ml.errors import PipelineError
from ml.fetch import Fetcher
from ml.imaging import normalize_image
from ml.labels import LABELS
from ml.mlflow_access import load_registered, require_tracking_uri
from ml.netpolicy import AddressPolicy
from ml.params import PARAMETERS
from ml.redact import get_logger, named_line, redact_url
from ml.serving import IMAGE_COLUMN, ImageClassifier, penultimate_features
from ml.statuses import Rejected, Status
from ml.storage import ObjectStore, S3Uri
from ml.transforms import Preprocessing

log = get_logger(__name__)

INPUT_COLUMNS = ("url", "image_url", "imageurl", "uri", "object_key", "key", "image", "path")


#: A cell starting with one of these is run as a formula by spreadsheet programs.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralize_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as formulas, prefixed with ``'`` (OWASP's advice
    against CSV injection); numbers are left as they are."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(
                lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v
            )
    return out


def check_destination(out: str, store: ObjectStore) -> None:
    """Fail before any work when ``out`` cannot take the predictions."""
    if not out.lower().endswith(OUTPUT_SUFFIXES):
        raise PipelineError(f"--out must end in .csv or .parquet, got {out!r}")
    if out.startswith("s3://"):
        store.check_bucket(S3Uri.parse(out))
        return
    path = Path(out)
    if path.is_dir():
        raise PipelineError(f"--out {out} is a directory; name a .csv or .parquet file in it")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".predict-", delete=True):
            pass
    except OSError as exc:
        raise PipelineError(
            f"cannot write --out {out}: {exc.strerror or exc}; choose a writable folder"
        ) from None


def _input_column(frame: pd.DataFrame) -> str:
    lowered = {c.strip().lower(): c for c in frame.columns}
    for name in INPUT_COLUMNS:
        if name in lowered:
            return str(lowered[name])
    raise PipelineError(
        f"no image column among the CSV's {len(frame.columns)} columns; name it url "
        "(http(s) or s3:// URIs) or object_key"
    )


class _Loader:
    """The bytes of one input (URL, s3 URI or object key), as fetched (the model checks them)."""

    def __init__(
        self,
        config: DownloadConfig,
        store: ObjectStore,
        bucket: str | None,
        s3_roots: Sequence[str] | None,
    ) -> None:
        self.fetcher = Fetcher(config.fetch, AddressPolicy.from_cidrs(config.allow_networks))
        self.config, self.store, self.bucket = config, store, bucket
        self.s3_roots = s3_roots

    def sha256(self, body: bytes | None) -> str:
        """The SHA-256 of the image as the pipeline stores it (its key in ``images/``)."""
        if body is None:
            return ""
        try:
            return normalize_image(body, self.config.image).sha256
        except Rejected:
            return ""

    def __call__(self, value: str) -> tuple[bytes | None, str, str]:
        try:
            if value.lower().startswith(("http://", "https://")):
                body = self.fetcher.fetch(value).body
            elif value.startswith("s3://") or self.bucket:
                uri = (
                    S3Uri.parse(value)
                    if value.startswith("s3://")
                    else S3Uri(str(self.bucket), value.lstrip("/"))
                )
                if self.s3_roots is not None and not any(
                    inside_s3(uri, S3Uri.parse(root)) for root in self.s3_roots
                ):
                    raise Rejected(Status.BLOCKED, "outside the folders this run may read")
                body = self.store.get_bytes(uri, max_bytes=self.config.fetch.max_bytes)
            else:
                raise Rejected(Status.INVALID_URL, "an object key needs --bucket")
            return body, Status.OK, ""
        except Rejected as exc:
            return None, exc.status, str(exc)
        except PipelineError as exc:  # the store refused or failed
            return None, Status.STORE_ERROR, str(exc)


def predict(
    model_uri: str,
    csv: str,
    out: str,
    *,
    bucket: str | None = None,
    config: DownloadConfig | None = None,
    batch_size: int = PARAMETERS["inference_batch_size"].default,
    store: ObjectStore | None = None,
    s3_roots: Sequence[str] | None = None,
    drift_p_value: float | None = None,
) -> dict[str, Any]:
    """Write one row per input with its predicted label and per-class probabilities.

    ``model_uri`` must name a registered model (``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``): a model from anywhere else could carry code. The output is
    checked before any work starts. ``s3_roots`` limits which store folders the listed
    ``s3://`` inputs may come from (a run started from a form passes the input roots). With
    ``drift_p_value``, the batch is compared with the version's own test images (ml.drift):
    the report goes next to the output (``<out>.drift.json``), to MLflow, and into the summary.
    """
    check_model_uri(model_uri, "--model")
    require_tracking_uri(model_uri)
    config = config or DownloadConfig()
    store = store or ObjectStore()
    check_destination(out, store)
    name = csvsource.describe(csv)
    limits = csvsource.SourceLimits(allow_networks=config.allow_networks)
    frame = csvsource.parse_all(
        csvsource.to_utf8(csvsource.read_bytes(csv, limits, store), name), name
    )
    values = [str(v).strip() for v in frame[_input_column(frame)]]
    name, version = resolve_version(model_uri)
    model = load_registered(f"models:/{name}/{version}")  # the version the rows name
    loader = _Loader(config, store, bucket, s3_roots)
    with ThreadPoolExecutor(max_workers=config.download_concurrency) as pool:
        loaded = list(pool.map(loader, values))
        hashes = list(pool.map(loader.sha256, [data for data, _, _ in loaded]))
    ready = [i for i, (data, _, _) in enumerate(loaded) if data is not None]
    with penultimate_features(model) as captured:
        scored = classify(model, [loaded[i][0] or b"" for i in ready], config.image, batch_size)
    result = _result_frame(values, loaded, ready, scored)
    result.insert(1, "sha256", hashes)
    result.insert(2, "model_version", version)
    _write(result, out, store)
    drift = None
    if drift_p_value is not None:

        def score(images: list[bytes]) -> tuple[pd.DataFrame, list[np.ndarray] | None]:
            with penultimate_features(model) as features:
                return classify(model, images, config.image, batch_size), features

        checked = (scored, captured, score)
        drift = _drift((name, version), checked, out, store, drift_p_value)
    has = result["label"].notna()
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
        "model_version": version,
        "drift": drift,
    }


def _drift(
    version: tuple[str, int],
    checked: tuple[pd.DataFrame, list[np.ndarray] | None, Any],
    out: str,
    store: ObjectStore,
    threshold: float,
) -> dict[str, Any] | None:
    """The batch against the version's own test images; recorded next to the output and in
    MLflow, and said in the log (a warning when it is drift)."""
    import json

    from ml import drift

    try:
        scored, captured, score = checked
        report = drift.assess(*version, scored, captured, store, threshold, score)
    except Exception as exc:  # the predictions are written: a failed comparison must not undo them
        log.warning("drift not checked: %s", named_line(exc, 300))
        return None
    if report is None:
        log.info("drift not checked: v%s logged no test predictions to compare with", version[1])
        return None
    try:
        report["mlflow_run"] = drift.record(report, out)
    except Exception as exc:  # MLflow down: the report still goes next to the predictions
        report["mlflow_run"] = None
        log.warning("drift not recorded in MLflow: %s", named_line(exc, 300))
    data = json.dumps(report, indent=2, default=str).encode()
    if out.startswith("s3://"):
        store.put_bytes(S3Uri.parse(f"{out}.drift.json"), data, content_type="application/json")
    else:
        Path(f"{out}.drift.json").write_bytes(data)
    (log.warning if report["alarm"] else log.info)("%s", report["verdict"])
    return report


def resolve_version(model_uri: str) -> tuple[str, int]:
    """(name, version number) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, so every
    row names the exact version that scored it, whatever the alias does meanwhile."""
    from ml import mlflow_access

    check_model_uri(model_uri, "--model")
    name, _, rest = model_uri.removeprefix("models:/").partition("/")
    if not rest:
        name, _, alias = name.partition("@")
        client = mlflow_access.checked_client()
        try:
            found = client.get_model_version_by_alias(name, alias)
        except Exception:
            raise PipelineError(
                f"cannot load model {model_uri}: no version of {name} has alias {alias!r} "
                "(does that version or alias exist?)"
            ) from None
        return name, int(found.version)
    return name, int(rest)


def takes_images(model: Any) -> bool:
    """Whether a registered model takes encoded images (versions logged before that took
    preprocessed float tensors)."""
    schema = model.metadata.get_input_schema()
    return schema is not None and not schema.is_tensor_spec()


def classify(model: Any, images: Sequence[bytes], image: Any, batch_size: int) -> pd.DataFrame:
    """One row per image (label, confidence, p_<class>, status, error) from a registered
    model, whichever input it takes."""
    if takes_images(model):
        frames = [
            model.predict(pd.DataFrame({IMAGE_COLUMN: list(images[i : i + batch_size])}))
            for i in range(0, len(images), batch_size)
        ]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    meta = model.metadata.metadata or {}
    labels = list(meta.get("labels", LABELS))
    if "preprocessing" in meta:
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    else:
        size = int(meta.get("image_size", 224))
        preprocessing = Preprocessing(size, int(meta.get("resize_size", size)))

    def forward(batch: torch.Tensor) -> np.ndarray:  # the tensor-taking pyfunc's own pass
        return np.asarray(model.predict(batch.numpy()), dtype=np.float32)

    return ImageClassifier(forward, preprocessing, labels, image).images(list(images))


def _result_frame(
    values: Sequence[str],
    loaded: Sequence[tuple[bytes | None, str, str]],
    ready: Sequence[int],
    scored: pd.DataFrame,
) -> pd.DataFrame:
    """One row per input: what was read (status, error), then the model's row where it ran."""
    result = pd.DataFrame(
        {
            "input": [redact_url(v) for v in values],
            "status": [str(s) for _, s, _ in loaded],
            "error": [e for _, _, e in loaded],
        }
    )
    rows = list(ready)
    for column in [c for c in scored.columns if c not in ("status", "error")]:
        if column == "label":  # text; None where the model did not run or refused the image
            labels: list[Any] = [None] * len(values)
            for row, label in zip(rows, scored[column].tolist(), strict=True):
                labels[row] = label
            result[column] = labels
        else:  # numbers; NaN there (a served model answers a refused image with None)
            numbers = np.full(len(values), np.nan)
            numbers[rows] = pd.to_numeric(scored[column], errors="coerce").to_numpy("float64")
            result[column] = numbers
    if rows:
        result.loc[rows, "status"] = scored["status"].astype(str).to_numpy()
        result.loc[rows, "error"] = scored["error"].astype(str).to_numpy()
    return result


def _write(frame: pd.DataFrame, out: str, store: ObjectStore) -> None:
    buffer = io.BytesIO()
    if out.lower().endswith(".parquet"):
        frame.to_parquet(buffer, index=False)
    else:
        buffer.write(neutralize_formulas(frame).to_csv(index=False).encode())
    if out.startswith("s3://"):
        store.put_bytes(S3Uri.parse(out), buffer.getvalue())
        return
    path = Path(out)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(buffer.getvalue())
        partial.replace(path)
    except OSError as exc:
        raise PipelineError(f"cannot write --out {out}: {exc.strerror or exc}") from None
