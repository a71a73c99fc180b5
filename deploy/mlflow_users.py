"""Give the pipeline its own MLflow user, scoped to its experiment and registered model.

docker-compose's ``mlflow-users`` step runs this after MLflow is healthy, on every ``up``. It
signs in as MLflow's admin (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``: the
environment, never argv) and:

- creates ``MLFLOW_PIPELINE_USER`` with ``MLFLOW_PIPELINE_PASSWORD``, or sets that password
  when the user exists (a rotated .env takes effect on the next ``up``);
- grants it MANAGE on the pipeline's experiment and registered model when they already exist
  (made by an admin, or by a deployment from before this step). What the user creates itself,
  MLflow's auth app makes it the manager of.

The workers sign in as that user: not an admin, so they cannot read or change other teams'
experiments and models, or manage users (``default_permission = NO_PERMISSIONS``).

    python -m deploy.mlflow_users
"""

from __future__ import annotations

import os
import sys

#: MLflow requests here fail within about a minute, not MLflow's default retries of minutes.
BOUNDED = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _status(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def ensure_user(tracking_uri: str, username: str, password: str) -> str:
    """Create ``username`` or set its password; return what was done."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    auth = AuthServiceClient(tracking_uri)
    try:
        user = auth.get_user(username)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in _status(exc):
            raise
        auth.create_user(username, password)
        return "created"
    if user.is_admin:
        raise SystemExit(
            f"error: MLFLOW_PIPELINE_USER={username} is an MLflow admin; choose another name "
            "(the pipeline must not sign in as an admin)"
        )
    auth.update_user_password(username, password)
    return "password set"


def _grant_manage(auth: object, username: str, kind: str, key: str) -> None:
    """MANAGE on one resource, whatever the user held on it before (idempotent)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(username, kind, key, "MANAGE")  # type: ignore[attr-defined]
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in _status(exc):
            raise
        auth.revoke_user_permission(username, kind, key)  # type: ignore[attr-defined]
        auth.grant_user_permission(username, kind, key, "MANAGE")  # type: ignore[attr-defined]


def grant_existing(tracking_uri: str, username: str, experiment: str, model: str) -> list[str]:
    """MANAGE for ``username`` on ``experiment`` and ``model`` where they exist; their names."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    auth = AuthServiceClient(tracking_uri)
    client = MlflowClient(tracking_uri)
    granted = []
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        _grant_manage(auth, username, "experiment", found.experiment_id)
        granted.append(f"experiment {experiment}")
    try:
        client.get_registered_model(model)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in _status(exc):
            raise
    else:
        _grant_manage(auth, username, "registered_model", model)
        granted.append(f"model {model}")
    return granted


def main() -> int:
    for name, value in BOUNDED.items():
        os.environ.setdefault(name, value)
    from ml.params import PARAMETERS

    settings = {
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", ""),
        "MLFLOW_TRACKING_USERNAME": os.environ.get("MLFLOW_TRACKING_USERNAME", ""),
        "MLFLOW_TRACKING_PASSWORD": os.environ.get("MLFLOW_TRACKING_PASSWORD", ""),
        "MLFLOW_PIPELINE_USER": os.environ.get("MLFLOW_PIPELINE_USER", ""),
        "MLFLOW_PIPELINE_PASSWORD": os.environ.get("MLFLOW_PIPELINE_PASSWORD", ""),
    }
    missing = [name for name, value in settings.items() if not value]
    if missing:
        print(
            f"error: {', '.join(missing)} not set (run python3 -m deploy.init_env)",
            file=sys.stderr,
        )
        return 1
    uri, user = settings["MLFLOW_TRACKING_URI"], settings["MLFLOW_PIPELINE_USER"]
    if user == settings["MLFLOW_TRACKING_USERNAME"]:
        print(
            f"error: MLFLOW_PIPELINE_USER={user} is the MLflow admin; choose another name",
            file=sys.stderr,
        )
        return 1
    model = os.environ.get("ML_MODEL_NAME") or str(PARAMETERS["model_name"].default)
    experiment = str(PARAMETERS["experiment"].default)
    try:
        done = ensure_user(uri, user, settings["MLFLOW_PIPELINE_PASSWORD"])
        granted = grant_existing(uri, user, experiment, model)
    except Exception as exc:  # one line for the container log, then exit 1
        print(f"error: cannot set up the MLflow user {user}: {exc}", file=sys.stderr)
        return 1
    print(f"MLflow user {user}: {done}; MANAGE on {', '.join(granted) or 'what it creates'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
