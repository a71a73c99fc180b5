"""
# Image sentiment: forget an image

For a request to remove a photo: deletes every stored copy of the image (and of its
near-duplicates), records the request (never the image) in the store's append-only ledger, tags
the model versions that trained on it as containing forgotten data, and keeps it out of later
ingests and downloads. With **retrain**, it then triggers `image_sentiment`, whose next version
no longer contains it.

The same as `python -m ml forget URL_OR_SHA256 --reason TEXT` (see the README's Audit section).
"""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task
from task_policy import fail_fast, workflow  # plugins/: Airflow puts it on the import path

from ml.containment import FORGET_IMAGE_RULE, FORGET_REASON_RULE
from ml.deployment import Deployment

DEPLOYMENT = Deployment.from_env()  # ML_STORE, ML_MODEL_NAME


@dag(
    dag_id="image_sentiment_forget",
    schedule=None,
    doc_md=__doc__,
    **workflow("audit"),
    params={
        "image": Param(
            "",
            type="string",
            **FORGET_IMAGE_RULE.schema(),
            title="Image",
            description="The image's URL (as in the CSV) or the SHA-256 of its stored bytes.",
        ),
        "reason": Param(
            "",
            type="string",
            **FORGET_REASON_RULE.schema(),
            title="Reason",
            description="Why it is forgotten (kept in the audit trail).",
        ),
        "retrain": Param(
            False,
            type="boolean",
            title="Retrain",
            description="Trigger image_sentiment afterwards, so the champion can be replaced "
            "by a version without the image.",
        ),
    },
)
def image_sentiment_forget() -> None:
    @task
    @fail_fast()  # a wrong parameter fails at once, without retries (plugins/task_policy.py)
    def forget(*, params: dict[str, Any], run_id: str) -> dict[str, Any]:
        from ml.pipeline import forget_step

        return forget_step(params, run_id)

    @task.short_circuit
    @fail_fast()
    def wants_retrain(done: dict[str, Any], *, params: dict[str, Any]) -> bool:
        return bool(params["retrain"])

    retrain = TriggerDagRunOperator(task_id="retrain", trigger_dag_id="image_sentiment")
    wants_retrain(forget()) >> retrain


image_sentiment_forget()
