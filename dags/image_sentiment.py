"""
# Image sentiment: retrain and register

Retrains the image-sentiment classifier end to end from a CSV of image URLs with 5-level
sentiment labels:

`preflight` (GPU queue) → `ingest` → `plan_batches` → `download_batch` (mapped) →
`collect_manifest` → `split` → `changes` → `train` (GPU queue) → `register` (GPU queue)

- **preflight** checks, on the training worker, that its device is there and the initial
  weights are (downloading them where `ML_DOWNLOAD_WEIGHTS` allows), before any download work.

- **ingest** validates the CSV and writes its canonical records (outlet: the dataset asset).
- **download_batch** fetches images safely (address policy, byte cap, deadline, image checks)
  into the store; reruns fetch only what is missing.
- **split** makes a stratified, deterministic, leak-free train/valid/test split (identical
  bytes and near-duplicate pictures stay in one split).
- **changes** skips `train` and `register` when the split's content and the training settings
  equal those of the current champion (nothing new to learn); `force_retrain` overrides it.
- **train** fine-tunes ResNet-152 and logs everything to MLflow; a retry resumes from the last
  epoch's checkpoint.
- **register** creates a model version with alias `challenger`, scores the current champion on
  the new version's test images, and moves `champion` only when the macro-F1 gain exceeds the
  promotion margin and a paired bootstrap's lower bound is above zero (outlet: the model asset).

Deployment settings come from the environment: `ML_STORE` (s3://BUCKET/PREFIX),
`ML_ALLOW_NETWORKS`, `MLFLOW_TRACKING_URI`, `AWS_*`, `ML_SCHEDULE` (default `@weekly`; `none`
for manual runs only), `ML_CSV` (the CSV scheduled runs read; default
`$ML_STORE/input/images.csv`). Everything else is a parameter of the trigger form.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Metadata, Param, dag, task
from task_policy import fail_fast, workflow  # plugins/: Airflow puts it on the import path

from ml.deployment import Deployment
from ml.errors import PipelineError
from ml.params import FORM

DAG_ID = "image_sentiment"
DEPLOYMENT = Deployment.from_env()  # ML_STORE, ML_MODEL_NAME, ML_CSV, ML_SCHEDULE, ...
DATASET_ASSET = Asset(*DEPLOYMENT.dataset_asset)
MODEL_ASSET = Asset(*DEPLOYMENT.model_asset)
GPU_QUEUE = DEPLOYMENT.gpu_queue

# The trigger form, derived from the one declaration of every run parameter (ml.params: a
# light, standard-library module); the deployment's ML_* variables set some defaults.
PARAMS = {
    p.name: Param(DEPLOYMENT.csv if p.name == "csv" else p.default_for(), **p.json_schema())
    for p in FORM
}


@dag(
    dag_id=DAG_ID,
    schedule=DEPLOYMENT.schedule,
    params=PARAMS,
    doc_md=__doc__,
    **workflow("retraining"),
)
def image_sentiment() -> None:
    # Every task: a wrong parameter fails at once, without retries (plugins/task_policy.py).
    @task(queue=GPU_QUEUE)
    @fail_fast(PipelineError)  # missing weights or GPU: an hour of downloads won't help
    def preflight(*, params: dict[str, Any]) -> dict[str, Any]:
        """On the training worker, before any download: its device and the weights exist."""
        from ml.pipeline import preflight_step

        return preflight_step(params)

    @task(outlets=[DATASET_ASSET])
    @fail_fast()
    def ingest(*, params: dict[str, Any]) -> Any:
        from ml.pipeline import ingest_step

        result = ingest_step(params)
        yield Metadata(DATASET_ASSET, {"dataset": result["dataset"], "rows": result["rows"]})
        return result

    @task
    @fail_fast()
    def plan_batches(ingested: dict[str, Any], *, params: dict[str, Any]) -> list[dict[str, Any]]:
        from ml.pipeline import plan_step

        return plan_step(params, ingested)

    @task(max_active_tis_per_dag=DEPLOYMENT.download_parallelism)
    @fail_fast()
    def download_batch(
        batch: dict[str, Any], *, params: dict[str, Any], run_id: str, ti: Any
    ) -> dict[str, Any]:
        from ml.pipeline import download_step

        return download_step(params, batch, run_id, ti.try_number)  # fenced by try

    # none_failed: a rerun with every image already downloaded maps zero batches (skipped),
    # and the manifest, split and change check must still run.
    @task(trigger_rule="none_failed")
    @fail_fast()
    def collect_manifest(ingested: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
        from ml.pipeline import collect_step

        return collect_step(ingested, list(results))

    @task
    @fail_fast()
    def split(collected: dict[str, Any], *, params: dict[str, Any]) -> dict[str, Any]:
        from ml.pipeline import split_step

        return split_step(params, collected)

    @task.short_circuit
    @fail_fast()
    def changes(split: dict[str, Any], *, params: dict[str, Any], run_id: str) -> bool:
        """False (train and register are skipped) when there is nothing new to train."""
        from ml.pipeline import change_step
        from ml.redact import get_logger

        plan = change_step(params, split, run_id)
        get_logger("ml.pipeline").info("%s", plan["reason"])
        return bool(plan["train"])

    @task(
        queue=GPU_QUEUE,
        pool="gpu",
        execution_timeout=timedelta(hours=DEPLOYMENT.train_timeout_hours),
    )
    @fail_fast()  # also a batch too big for the GPU: it names batch_size
    def train(
        split: dict[str, Any], *, params: dict[str, Any], run_id: str, ti: Any
    ) -> dict[str, Any]:
        from ml.pipeline import train_step

        return train_step(params, split, run_id, try_number=ti.try_number)  # fenced by try

    @task(queue=GPU_QUEUE, outlets=[MODEL_ASSET])  # scores the champion: a model pass
    @fail_fast()
    def register(trained: dict[str, Any], *, params: dict[str, Any], run_id: str, ti: Any) -> Any:
        from ml.pipeline import register_step

        result = register_step(params, trained, run_id, ti.try_number)
        yield Metadata(
            MODEL_ASSET,
            {
                "model": result["model"],
                "version": result["version"],
                "promoted": result["promoted"],
                "aliases": result["aliases"],
            },
        )
        return result

    ingested = ingest()
    preflight() >> ingested
    results = download_batch.expand(batch=plan_batches(ingested))
    splits = split(collect_manifest(ingested, results))
    trained = train(splits)
    changes(splits) >> trained
    register(trained)


image_sentiment()
