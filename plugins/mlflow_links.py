"""Airflow plugin: a "MLflow" button on the train and register tasks that opens the MLflow run
(train) or the registered model version (register) in the MLflow UI.

The link is built in the API server from the task's return value (run id, model name, version),
so it needs nothing from the worker. The UI address comes from ``MLFLOW_UI_URL``, else
``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

TASKS = {"train", "register"}


def _return_value(ti_key: Any) -> dict[str, Any] | None:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key="return_value",
                run_id=ti_key.run_id,
                dag_ids=ti_key.dag_id,
                task_ids=ti_key.task_id,
                map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).first()
    if not row:
        return None
    value = row[0]
    if isinstance(value, str | bytes):
        value = json.loads(value)
    return value if isinstance(value, dict) else None


def mlflow_url(task_id: str, value: dict[str, Any], base: str) -> str:
    """The MLflow UI page for a train (run) or register (model version) result."""
    base = base.rstrip("/")
    if task_id == "register" and value.get("model") and value.get("version"):
        return f"{base}/#/models/{value['model']}/versions/{value['version']}"
    if value.get("run_id"):
        return f"{base}/#/runs/{value['run_id']}"
    return ""


class MLflowLink(BaseOperatorLink):
    name = "MLflow"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if ti_key.task_id not in TASKS:
            return ""
        base = os.environ.get("MLFLOW_UI_URL") or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not base.startswith(("http://", "https://")):
            return ""
        value = _return_value(ti_key)
        return mlflow_url(ti_key.task_id, value, base) if value else ""


class MLflowLinksPlugin(AirflowPlugin):
    name = "image_sentiment_mlflow_links"
    global_operator_extra_links = [MLflowLink()]  # noqa: RUF012 - Airflow's plugin interface
