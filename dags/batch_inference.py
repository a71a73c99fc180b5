"""
# Image sentiment: batch inference

Predicts the sentiment of the images listed in a CSV with the registered champion model
(`models:/<name>@champion`), writing one row per image with per-class probabilities.

Runs whenever a model version is registered (the `image_sentiment_model` asset) if
`ML_INFERENCE_CSV` names a CSV to score, or by hand with the form's parameters. A version that
did not become champion changes nothing to score: such a run is skipped, saying so. URLs are fetched
with the same safety rules as the training downloads.

Each run compares the batch with the model's own test images (predicted-label mix, and the
network's penultimate features: see `ml/drift.py`). When a test's p-value is below
`ML_DRIFT_P_VALUE` (default 0.01), `drift_alarm` says so in its log and updates the
`image_sentiment_drift` asset with the figures in its metadata (schedule retraining on it);
otherwise it is skipped.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset, Metadata, Param, dag, task
from task_policy import fail_fast, workflow  # plugins/: Airflow puts it on the import path

# The form checks with the same rule the worker enforces (ml.containment: light, stdlib only).
from ml.containment import MODEL_URI_RULE, OUTPUT_RULE
from ml.deployment import Deployment

DEPLOYMENT = Deployment.from_env()  # ML_STORE, ML_MODEL_NAME, ML_INFERENCE_CSV
MODEL_ASSET = Asset(*DEPLOYMENT.model_asset)
DRIFT_ASSET = Asset(*DEPLOYMENT.drift_asset)


@dag(
    dag_id="image_sentiment_batch_inference",
    schedule=[MODEL_ASSET],
    doc_md=__doc__,
    **workflow("inference"),
    params={
        "csv": Param(
            DEPLOYMENT.inference_csv,
            type="string",
            title="CSV",
            description="Images to score: column url (http(s) or s3:// URIs). Empty: "
            "nothing to do.",
        ),
        "output": Param(
            "",
            type="string",
            **OUTPUT_RULE.schema(),
            title="Output",
            description="Where predictions go: a .csv or .parquet inside the store "
            "(or inside ML_OUTPUT_DIR on the workers); empty: under the store, per "
            "run.",
        ),
        "model_uri": Param(
            DEPLOYMENT.champion_uri,
            type="string",
            **MODEL_URI_RULE.schema(),
            title="Model",
            description="A registered model: models:/<name>@<alias> or models:/<name>/<version>.",
        ),
    },
)
def image_sentiment_batch_inference() -> None:
    @task
    @fail_fast()  # a wrong parameter fails at once, without retries (plugins/task_policy.py)
    def predict(
        *, params: dict[str, Any], run_id: str, triggering_asset_events: Any = None
    ) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from ml.layout import StoreLayout
        from ml.pipeline import champion_unchanged, predict_step

        if not params["csv"]:
            raise AirflowSkipException("no CSV to score: set the csv parameter or ML_INFERENCE_CSV")
        events = [
            dict(event.extra or {})
            for events in (triggering_asset_events or {}).values()
            for event in events
        ]
        if unchanged := champion_unchanged(events):  # a register that promoted nothing
            raise AirflowSkipException(unchanged)
        store = StoreLayout.parse(DEPLOYMENT.store)
        output = params["output"] or str(store.run_predictions(run_id))
        return predict_step(params["csv"], output, params["model_uri"])

    @task(outlets=[DRIFT_ASSET])
    @fail_fast()
    def drift_alarm(scored: dict[str, Any]) -> Any:
        import logging

        from airflow.sdk.exceptions import AirflowSkipException

        report = scored.get("drift")
        if not report or not report["alarm"]:
            raise AirflowSkipException(report["verdict"] if report else "drift not checked")
        logging.getLogger(__name__).warning("drift: %s", report["verdict"])
        figures = {
            "model_version": report["model_version"],
            "predictions": scored["predictions"],
            "verdict": report["verdict"],
            "label_mix_p_value": report["label_mix"]["p_value"],
            "feature_p_value": (report["features"] or {}).get("p_value"),
            "feature_mmd2": (report["features"] or {}).get("mmd2"),
            "threshold": report["threshold"],
            "mlflow_run": report.get("mlflow_run"),
        }
        yield Metadata(DRIFT_ASSET, figures)
        return figures

    drift_alarm(predict())


image_sentiment_batch_inference()
