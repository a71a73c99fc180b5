"""The deployment's settings that the workflows and the command line read, declared once.

They come from the environment the deployment gives its processes (trusted configuration,
never a form): where the store is, the registered model's name, the CSV scheduled runs read,
the schedule, the queues and the limits of the workflow, and the names of the two assets that
connect the workflows. Standard library only: the workflow files import it when they are parsed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ml.params import PARAMETERS

#: The store when ML_STORE is not set (a deployment sets it; docker-compose.yaml does).
DEFAULT_STORE = "s3://image-sentiment/pipeline"


@dataclass(frozen=True)
class Deployment:
    store: str
    model_name: str
    csv: str
    inference_csv: str
    schedule: str | None
    download_parallelism: int
    train_timeout_hours: float
    gpu_queue: str
    #: Batch inference raises a drift alarm when a test's p-value is below this.
    drift_p_value: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Deployment:
        env = os.environ if env is None else env
        store = (env.get("ML_STORE") or DEFAULT_STORE).rstrip("/")
        schedule = env.get("ML_SCHEDULE", "@weekly")
        return cls(
            store=store,
            model_name=PARAMETERS["model_name"].default_for(env),
            csv=env.get("ML_CSV") or f"{store}/input/images.csv",
            inference_csv=env.get("ML_INFERENCE_CSV", ""),
            schedule=None if schedule.strip().lower() in ("", "none") else schedule,
            download_parallelism=int(env.get("ML_DOWNLOAD_PARALLELISM", "4")),
            train_timeout_hours=float(env.get("ML_TRAIN_TIMEOUT_HOURS", "12")),
            gpu_queue=env.get("ML_GPU_QUEUE", "gpu"),
            drift_p_value=float(env.get("ML_DRIFT_P_VALUE", "0.01")),
        )

    @property
    def dataset_asset(self) -> tuple[str, str]:
        """(name, URI) of the asset each ingest updates."""
        return "image_sentiment_dataset", f"{self.store}/datasets"

    @property
    def model_asset(self) -> tuple[str, str]:
        """(name, URI) of the asset each registration updates; batch inference waits on it."""
        return "image_sentiment_model", f"mlflow-registry://{self.model_name}"

    @property
    def drift_asset(self) -> tuple[str, str]:
        """(name, URI) of the asset a batch inference updates when it finds drift."""
        return "image_sentiment_drift", f"mlflow-registry://{self.model_name}/drift"

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.model_name}@champion"
