"""MLflow "models from code" entry: builds the served model (see ml.serving). Not imported."""

import mlflow

from ml.serving import SentimentModel

mlflow.models.set_model(SentimentModel())
