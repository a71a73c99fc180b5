"""The one door to MLflow: every other module reaches the tracking server and the registry
through this one (it sits below tracking, registry and predict, and imports none of them).

The client and its bounded requests, the server probe, the tracking URI for messages, loading a
registered model, how MLflow's errors are told apart, and the code version tagged on runs and
model versions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ml.errors import PipelineError
from ml.redact import first_line, get_logger, named_line, redact_url

log = get_logger(__name__)
T = TypeVar("T")


def code_version() -> str:
    """The code that trained the model: $ML_CODE_VERSION, else the git commit, else the package."""
    from ml import __version__

    git = shutil.which("git")
    if os.environ.get("ML_CODE_VERSION") or git is None:
        return os.environ.get("ML_CODE_VERSION") or __version__
    try:
        done = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
            check=False,
        )
    except OSError:
        return __version__
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else __version__


#: MLflow's HTTP client retries a failed request for minutes by default (7 retries, doubling
#: backoff, 120 s timeouts). Every MLflow call of the pipeline is bounded to these instead: a
#: request gives up after 3 tries (waits 1, 2 s, plus jitter) of at most 60 s each. Set the
#: variables to override.
REQUEST_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def bound_requests() -> None:
    """Apply :data:`REQUEST_LIMITS` where the environment does not set them."""
    for name, value in REQUEST_LIMITS.items():
        os.environ.setdefault(name, value)


def client() -> Any:
    """An MlflowClient whose requests are bounded (:data:`REQUEST_LIMITS`)."""
    bound_requests()
    from mlflow import MlflowClient

    return MlflowClient()


def checked_client(given: Any = None) -> Any:
    """``given`` when a caller passes its own client; else a new :func:`client`, after
    :func:`check_tracking_server` has made sure the server answers."""
    if given is not None:
        return given
    check_tracking_server()
    return client()


# How MLflow's errors are told apart. A request that got no answer (refused, timed out, its
# retries spent on 5xx) is INTERNAL_ERROR with a message quoting the URL: its port, run id or
# query may contain "403" or any other text, so only an answer's error code (and, for the few
# answers MLflow codes loosely, the answer's own text) says what happened.


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _answer(exc: Exception) -> str:
    """What the tracking store answered, lower-cased; "" for a request that got no answer."""
    import requests

    if isinstance(exc.__cause__ or exc.__context__, requests.exceptions.RequestException):
        return ""
    return str(exc).lower()


def missing(exc: Exception) -> bool:
    """The store answered that the thing does not exist. An alias a model lacks is answered
    INVALID_PARAMETER_VALUE "Registered model alias ... not found" rather than
    RESOURCE_DOES_NOT_EXIST. A 404 with no MLflow error in it (ENDPOINT_NOT_FOUND: a server too
    old for the call, or a URL that is not MLflow's) is not "missing": it is an error."""
    code = _code(exc)
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in _answer(exc)
    )


def exists(exc: Exception) -> bool:
    """The store answered that the thing exists already (or its unique constraint did)."""
    if _code(exc) in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
        return True
    answer = _answer(exc)
    return any(sign in answer for sign in ("already exists", "unique constraint", "integrityerror"))


def denied(exc: Exception) -> bool:
    """The store answered 403: under MLflow's auth app, also what a user gets for a model that
    is not yet made. Credentials it refused (401, UNAUTHENTICATED) are not this: they are an
    error to report, see :func:`unauthenticated`."""
    return _code(exc) == "PERMISSION_DENIED"


def unauthenticated(exc: Exception) -> bool:
    return _code(exc) in ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED")


def failed(exc: Exception, what: str, then: str = "") -> PipelineError:
    """One clear error for an MLflow call about ``what`` that got no usable answer: the
    credentials it refused (a wrong password is not a failing server), or the failure itself,
    followed by ``then`` (what to do once it answers)."""
    if unauthenticated(exc):
        user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none set)"
        return PipelineError(
            f"the MLflow tracking server at {tracking_uri()} refused the credentials of MLflow "
            f"user {user} ({what}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "to an account it knows"
        )
    return PipelineError(
        f"the MLflow tracking server at {tracking_uri()} failed to answer for {what}: "
        f"{first_line(exc)}" + (f"; {then}" if then else "")
    )


def tracking_uri() -> str:
    """Where MLflow sends requests, with any credentials in it redacted (for messages)."""
    import mlflow

    return redact_url(str(mlflow.get_tracking_uri()))


def check_tracking_server(timeout: float = 20.0) -> None:
    """Fail within about ``timeout`` seconds, with one clear message, when the MLflow tracking
    server does not answer (MLflow's own client retries for minutes, then blames the request).

    Any HTTP answer counts as reachable; local stores (``file:``, ``sqlite:``) are not probed.
    """
    import mlflow
    import urllib3

    bound_requests()
    uri = str(mlflow.get_tracking_uri())
    if not uri.lower().startswith(("http://", "https://")):
        return
    probe = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            urllib3.request(
                "GET",
                probe,
                timeout=urllib3.Timeout(connect=min(5.0, max(left, 0.1)), read=min(10.0, left)),
                retries=False,
                redirect=False,
            )
            return
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            reason = type(exc).__name__
        if time.monotonic() + 1.0 >= deadline:
            break
        time.sleep(1.0)
    raise PipelineError(
        f"cannot reach the MLflow tracking server at {tracking_uri()} ({reason} for "
        f"{timeout:g}s); start it, or set MLFLOW_TRACKING_URI to where it runs"
    )


def require_tracking_uri(model_uri: str) -> None:
    """A registry URI needs MLFLOW_TRACKING_URI: one clear error when it is not set."""
    if model_uri.startswith(("models:/", "runs:/")) and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise PipelineError(
            f"set MLFLOW_TRACKING_URI to the MLflow server that holds {model_uri} (and "
            "MLFLOW_TRACKING_USERNAME/PASSWORD where it signs users in); for the local stack "
            "use scripts/stack serve"
        )


def load_registered(model_uri: str, model_config: dict[str, Any] | None = None) -> Any:
    """The registered model (a pyfunc); one clear error when it cannot be loaded. A registry
    URI needs MLFLOW_TRACKING_URI: without it MLflow would look in a new, empty ``mlflow.db``
    in the current folder and say the model does not exist.

    The model's files are downloaded into a folder of our own and removed once it is loaded
    (``SentimentModel.load_context`` reads the weights and the manifest into memory): left to
    MLflow, each load keeps a copy of the weights (224 MB for ResNet-152) in the temporary
    folder for good, and a worker that registers or predicts on a schedule fills its disk."""
    import mlflow

    require_tracking_uri(model_uri)
    check_tracking_server()
    with tempfile.TemporaryDirectory(prefix="ml-model-") as folder:
        try:
            return mlflow.pyfunc.load_model(model_uri, dst_path=folder, model_config=model_config)
        except Exception as exc:
            raise PipelineError(
                f"cannot load model {model_uri}: {first_line(exc)} "
                "(does that version or alias exist?)"
            ) from None


def model_signature(model_uri: str) -> Any:
    """The signature logged with a model (its MLmodel file, read from a folder removed
    afterwards: ``mlflow.models.get_model_info`` keeps each download for good)."""
    import mlflow
    from mlflow.models import Model
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    source = model_uri
    if model_uri.startswith("models:/"):  # a logged model (models:/m-<id>) or a version
        source = ModelsArtifactRepository.get_underlying_uri(model_uri)  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory(prefix="ml-model-") as folder:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source.rstrip('/')}/MLmodel", dst_path=folder
        )
        return Model.load(path).signature


def optional_artifact(client: Any, run_id: str, path: str, read: Callable[[Path], T]) -> T | None:
    """``read`` of a run's artifact, downloaded into a folder removed afterwards (without a
    destination MLflow makes a new temporary folder per download and keeps it). None for a run
    that has none (logged by older code, or removed): every caller has a fallback. One that is
    there but cannot be read (a corrupt file, a server failing to answer) also gives None, with
    a warning naming it and why, so the fallback is never silent.

    MLflow answers every failed download of a run's artifact with RESOURCE_DOES_NOT_EXIST,
    an artifact store that does not answer included, so "missing" is confirmed by the run's
    listing: only an artifact the listing lacks is missing."""
    with tempfile.TemporaryDirectory(prefix="ml-artifact-") as folder:
        try:
            local = Path(client.download_artifacts(run_id, path, folder))
        except Exception as exc:
            why = named_line(exc)
            if missing(exc):
                try:
                    parent = path.rpartition("/")[0] or None
                    if all(found.path != path for found in client.list_artifacts(run_id, parent)):
                        return None
                    why = "the run lists it, but its download failed; is the artifact store up?"
                except Exception as listing:
                    why = f"its download and the run's listing failed: {first_line(listing)}"
        else:
            try:
                return read(local)
            except Exception as exc:  # judged on its content alone: never "missing"
                why = named_line(exc)
    log.warning("%s of run %s could not be read, so it is left out (%s)", path, run_id, why)
    return None


def test_predictions(client: Any, run_id: str, needs: Sequence[str] = ("object_key",)) -> Any:
    """A training run's per-image test predictions (evaluation/test_predictions.parquet: the
    images, true classes and probabilities promotion and drift compare on), or None; one that
    lacks a column of ``needs`` is unreadable (warned about) rather than a KeyError later."""
    import pandas as pd

    def read(path: Path) -> Any:
        frame = pd.read_parquet(path)
        if lacking := [column for column in needs if column not in frame.columns]:
            raise ValueError(f"it lacks the column(s) {', '.join(lacking)}")
        return frame

    return optional_artifact(client, run_id, "evaluation/test_predictions.parquet", read)
