"""
# Image sentiment: retrain and register

Retrains the image-sentiment classifier end to end from a CSV of image URLs with 5-level
sentiment labels:

`preflight` (GPU queue) → `ingest` → `plan_batches` → `download_batch` (mapped) →
`collect_manifest` → `split` → `train` (GPU queue) → `register`

- **preflight** checks, on the training worker, that its device is there and the initial
  weights are (downloading them where `ML_DOWNLOAD_WEIGHTS` allows), before any download work.

- **ingest** validates the CSV and writes its canonical records (outlet: the dataset asset).
- **download_batch** fetches images safely (address policy, byte cap, deadline, image checks)
  into the store; reruns fetch only what is missing.
- **split** makes a stratified, deterministic, leak-free train/valid/test split.
- **train** fine-tunes ResNet-152 and logs everything to MLflow; a retry resumes from the last
  epoch's checkpoint.
- **register** creates a model version with alias `challenger`, and moves `champion` only when
  it beats the current champion's test macro-F1 by the promotion margin (outlet: the model asset).

Deployment settings come from the environment: `ML_STORE` (s3://BUCKET/PREFIX),
`ML_ALLOW_NETWORKS`, `MLFLOW_TRACKING_URI`, `AWS_*`, `ML_SCHEDULE` (default `@weekly`; `none`
for manual runs only), `ML_CSV` (the CSV scheduled runs read; default
`$ML_STORE/input/images.csv`). Everything else is a parameter of the trigger form.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Asset, Metadata, Param, dag, task

DAG_ID = "image_sentiment"
STORE = os.environ.get("ML_STORE", "s3://image-sentiment/pipeline").rstrip("/")
MODEL_NAME = os.environ.get("ML_MODEL_NAME", "image-sentiment")
DATASET_ASSET = Asset(name="image_sentiment_dataset", uri=f"{STORE}/datasets")
MODEL_ASSET = Asset(name="image_sentiment_model", uri=f"mlflow-registry://{MODEL_NAME}")
SCHEDULE = os.environ.get("ML_SCHEDULE", "@weekly")
DOWNLOAD_PARALLELISM = int(os.environ.get("ML_DOWNLOAD_PARALLELISM", "4"))
TRAIN_TIMEOUT = timedelta(hours=float(os.environ.get("ML_TRAIN_TIMEOUT_HOURS", "12")))
GPU_QUEUE = os.environ.get("ML_GPU_QUEUE", "gpu")
CSV = os.environ.get("ML_CSV") or f"{STORE}/input/images.csv"

PARAMS = {
    "csv": Param(CSV, type="string", minLength=1, title="CSV",
                 description="CSV of image URLs and labels: a local path, http(s) URL or s3:// "
                 "URI. The CrowdFlower export works as it is. Scheduled runs read the default, "
                 "so keep the latest export there."),
    "sample": Param(int(os.environ.get("ML_SAMPLE", "0")), type="integer", minimum=0,
                    title="Sample size", description="Rows to keep, stratified by label; 0 keeps "
                    "all."),
    "min_confidence": Param(0.0, type="number", minimum=0, maximum=1, title="Minimum confidence",
                            description="Drop rows whose label confidence is below this."),
    "exclude_golden": Param(False, type="boolean", title="Exclude golden rows",
                            description="Drop CrowdFlower's test-question rows."),
    "ratios": Param("0.8,0.15,0.05", type="string", pattern=r"^\s*[0-9.]+\s*,\s*[0-9.]+\s*,\s*"
                    r"[0-9.]+\s*$", title="Split ratios", description="train,valid,test; they "
                    "must sum to 1."),
    "seed": Param(0, type="integer", minimum=0, title="Seed",
                  description="Seed for sampling, splitting and training."),
    "download_concurrency": Param(32, type="integer", minimum=1, maximum=512,
                                  title="Download threads per batch"),
    "download_batch_size": Param(500, type="integer", minimum=1, title="URLs per download batch",
                                 description="Raised automatically to stay within 1024 "
                                 "batches."),
    "max_side": Param(256, type="integer", minimum=0, maximum=4096, title="Stored image size",
                      description="Shorter side of stored images at most (pixels); 0 keeps "
                      "the original size."),
    "weights": Param(os.environ.get("ML_WEIGHTS", "IMAGENET1K_V2"), type="string",
                     title="Initial weights", description="IMAGENET1K_V2, IMAGENET1K_V1, a .pth "
                     "path, an s3:// URI, or none (random; tests and demos only)."),
    "epochs": Param(10, type="integer", minimum=1, maximum=1000, title="Epochs"),
    "batch_size": Param(64, type="integer", minimum=1, maximum=4096, title="Batch size",
                        description="Images per step and GPU."),
    "learning_rate": Param(0.01, type="number", exclusiveMinimum=0, maximum=10,
                           title="Learning rate"),
    "optimizer": Param("sgd", type="string", enum=["sgd", "adamw"], title="Optimizer"),
    "image_size": Param(224, type="integer", minimum=32, maximum=1024, title="Image size",
                        description="Training crop in pixels."),
    "device": Param("auto", type="string", enum=["auto", "cuda", "cpu"], title="Device"),
    "precision": Param("bf16", type="string", enum=["bf16", "fp16", "fp32"],
                       title="Precision", description="Mixed precision on CUDA."),
    "imbalance": Param("class_weights", type="string", enum=["class_weights", "sampler", "none"],
                       title="Imbalance remedy"),
    "head_epochs": Param(0, type="integer", minimum=0, title="Head-only epochs",
                         description="First epochs train the new head only."),
    "patience": Param(3, type="integer", minimum=0, title="Early-stopping patience",
                      description="Epochs without a better validation macro-F1; 0 disables."),
    "max_steps_per_epoch": Param(0, type="integer", minimum=0, title="Steps per epoch cap",
                                 description="0 for all (a cap is for smoke tests)."),
    "workers": Param(4, type="integer", minimum=0, maximum=64, title="Data loader workers"),
    "model_name": Param(MODEL_NAME, type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$",
                        title="Registered model"),
    "promotion_margin": Param(0.0, type="number", minimum=0, maximum=1,
                              title="Promotion margin", description="Test macro-F1 a new version "
                              "must gain over the champion to become champion."),
}


def _fail_fast_on_bad_params(error: Exception) -> None:
    """A wrong parameter fails the run at once (no retries); anything else may be retried."""
    from airflow.sdk.exceptions import AirflowFailException

    from ml.settings import ParameterError

    if isinstance(error, ParameterError):
        raise AirflowFailException(str(error)) from None


@dag(
    dag_id=DAG_ID,
    schedule=None if SCHEDULE.lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    doc_md=__doc__,
    tags=["image-sentiment", "ml", "retraining"],
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=20),
    },
)
def image_sentiment() -> None:
    @task(queue=GPU_QUEUE)
    def preflight(*, params: dict[str, Any]) -> dict[str, Any]:
        """On the training worker, before any download: its device and the weights exist."""
        from ml.errors import PipelineError
        from ml.pipeline import preflight_step

        try:
            return preflight_step(params)
        except PipelineError as error:  # missing weights or GPU: an hour of downloads won't help
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(error)) from None

    @task(outlets=[DATASET_ASSET])
    def ingest(*, params: dict[str, Any]) -> Any:
        from ml.pipeline import ingest_step

        try:
            result = ingest_step(params)
        except Exception as error:
            _fail_fast_on_bad_params(error)
            raise
        yield Metadata(DATASET_ASSET, {"dataset": result["dataset"], "rows": result["rows"]})
        return result

    @task
    def plan_batches(ingested: dict[str, Any], *, params: dict[str, Any]) -> list[dict[str, Any]]:
        from ml.pipeline import plan_step

        return plan_step(params, ingested)

    @task(max_active_tis_per_dag=DOWNLOAD_PARALLELISM)
    def download_batch(batch: dict[str, Any], *, params: dict[str, Any]) -> dict[str, Any]:
        from ml.pipeline import download_step

        return download_step(params, batch)

    @task
    def collect_manifest(ingested: dict[str, Any], results: list[dict[str, Any]]
                         ) -> dict[str, Any]:
        from ml.pipeline import collect_step

        return collect_step(ingested, list(results))

    @task
    def split(ingested: dict[str, Any], *, params: dict[str, Any]) -> dict[str, Any]:
        from ml.pipeline import split_step

        return split_step(params, ingested)

    @task(queue=GPU_QUEUE, pool="gpu", execution_timeout=TRAIN_TIMEOUT)
    def train(split: dict[str, Any], *, params: dict[str, Any], run_id: str) -> dict[str, Any]:
        from ml.pipeline import train_step

        return train_step(params, split, run_id)

    @task(outlets=[MODEL_ASSET])
    def register(trained: dict[str, Any], *, params: dict[str, Any], run_id: str) -> Any:
        from ml.pipeline import register_step

        result = register_step(params, trained, run_id)
        yield Metadata(MODEL_ASSET, {"model": result["model"], "version": result["version"],
                                     "promoted": result["promoted"],
                                     "aliases": result["aliases"]})
        return result

    ingested = ingest()
    preflight() >> ingested
    batches = plan_batches(ingested)
    results = download_batch.expand(batch=batches)
    manifest = collect_manifest(ingested, results)
    splits = split(ingested)
    manifest >> splits
    register(train(splits))


image_sentiment()
