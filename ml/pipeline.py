"""The pipeline's steps as small functions from (settings, upstream JSON) to JSON.

Each Airflow task in ``dags/`` calls exactly one of these, so the DAG only wires; the same
functions run without Airflow (tests, notebooks). Inputs and outputs are small JSON-able dicts:
URIs, counts and ids, never data.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ml.settings import PipelineSettings
from ml.tasklog import in_task


def _download_config(settings: PipelineSettings) -> Any:
    from ml.download import DownloadConfig

    return DownloadConfig.from_values(settings.values, settings.allow_networks)


def run_partition(store: str, run_id: str) -> str:
    """The store folder for one orchestrator run (see :meth:`ml.layout.StoreLayout.run`)."""
    from ml.layout import StoreLayout

    return str(StoreLayout.parse(store).run(run_id))


def held_lease(
    settings: PipelineSettings, run_id: str, task: str, try_number: int
) -> AbstractContextManager[Any]:
    """This attempt's lease on ``task`` of the run (``try_number`` 0, outside an orchestrator:
    none); while held, every write checks it (:mod:`ml.fencing`)."""
    from ml import fencing
    from ml.layout import StoreLayout
    from ml.storage import ObjectStore

    lease = None
    if try_number > 0:
        lease = StoreLayout.parse(settings.store).run(run_id).child("leases", f"{task}.json")
    return fencing.attempt(ObjectStore(), lease, try_number, task)


@in_task
def ingest_step(params: Mapping[str, Any]) -> dict[str, Any]:
    from ml.ingest import ingest

    s = PipelineSettings.from_params(params)
    return ingest(
        s.csv,
        s.store,
        min_confidence=s.min_confidence or None,
        sample=s.sample or None,
        seed=s.seed,
        exclude_golden=s.exclude_golden,
    ).to_json()


@in_task
def plan_step(params: Mapping[str, Any], ingested: Mapping[str, Any]) -> list[dict[str, Any]]:
    from ml.download import plan_batches

    s = PipelineSettings.from_params(params)
    return [
        b.to_json() for b in plan_batches(ingested["dataset"], batch_size=s.download_batch_size)
    ]


@in_task
def download_step(
    params: Mapping[str, Any], batch: Mapping[str, Any], run_id: str = "", try_number: int = 0
) -> dict[str, Any]:
    from ml.download import BatchSpec, download_batch
    from ml.progress import Progress

    s = PipelineSettings.from_params(params)
    spec = BatchSpec.from_json(dict(batch))
    with (
        held_lease(s, run_id, f"download_batch-{spec.batch}", try_number),
        Progress(spec.pending, f"download batch {spec.batch}") as bar,  # counts in the log
    ):
        result = download_batch(spec, _download_config(s), on_result=bar.advance)
    return {"batch": spec.batch, **result.to_json()}


@in_task
def collect_step(ingested: Mapping[str, Any], results: list[Mapping[str, Any]]) -> dict[str, Any]:
    from ml.download import collect_manifest

    summary = collect_manifest(ingested["dataset"])
    summary["downloaded"] = sum(int(r.get("downloaded", 0)) for r in results)
    return {"dataset": ingested["dataset"], **summary}


@in_task
def split_step(params: Mapping[str, Any], collected: Mapping[str, Any]) -> dict[str, Any]:
    """The split of the dataset whose manifest ``collected`` (collect_step's result) wrote."""
    from ml.splits import make_splits

    s = PipelineSettings.from_params(params)
    return make_splits(collected["dataset"], ratios=s.ratios, seed=s.seed)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def train_device(settings: PipelineSettings, env: Mapping[str, str]) -> str:
    """The form's device, unless it says ``auto`` and the worker pins one: GPU workers set
    ``ML_TRAIN_DEVICE=cuda``, so training there never falls back to the CPU silently."""
    pinned = env.get("ML_TRAIN_DEVICE", "").strip()
    return pinned if settings.device == "auto" and pinned else settings.device


def train_config(
    settings: PipelineSettings, split: str, run_id: str, env: Mapping[str, str]
) -> Any:
    """The TrainConfig a run's parameters describe (the form's values for the fields they
    share, by name; the deployment's settings, such as ``ML_ARCH``, for fields off the form),
    its checkpoints in the run's folder."""
    from ml.layout import StoreLayout
    from ml.params import PARAMETERS, fields_of
    from ml.train_config import TrainConfig

    values = {
        name: settings.values[name]
        if name in settings.values
        else PARAMETERS[name].default_for(env)
        for name in fields_of(TrainConfig)
    }
    values.update(
        split=split,
        device=train_device(settings, env),
        orchestrator_run_id=run_id,
        download_weights=_truthy(env.get("ML_DOWNLOAD_WEIGHTS")),
        checkpoint=str(StoreLayout.parse(settings.store).run_training(run_id)) if run_id else "",
    )
    return TrainConfig(**values)


@in_task
def preflight_step(
    params: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """On the training worker, before any download work: the device training will use exists,
    and the initial weights are there (downloaded where ``ML_DOWNLOAD_WEIGHTS`` allows it)."""
    from ml.model import resolve_weights
    from ml.runtime import choose_device

    env = os.environ if env is None else env
    s = PipelineSettings.from_params(params, env)
    config = train_config(s, "s3://preflight/x", "", env)
    device = choose_device(config.device)
    _, weights = resolve_weights(
        config.arch, config.weights, download=config.download_weights, form=True
    )
    return {"device": str(device), "weights": weights.source, "weights_sha256": weights.sha256}


@in_task
def train_step(
    params: Mapping[str, Any],
    split: Mapping[str, Any],
    run_id: str = "",
    *,
    env: Mapping[str, str] | None = None,
    supervise: Callable[..., tuple[int, list[str]]] | None = None,
    try_number: int = 0,
) -> dict[str, Any]:
    """Train on this worker: one process, or ``ML_TRAIN_GPUS`` processes under torchrun (the
    attempt's lease travels to them)."""
    from ml.train import fine_tune

    env = os.environ if env is None else env
    s = PipelineSettings.from_params(params, env)
    config = train_config(s, split["split"], run_id, env)
    processes = int(env.get("ML_TRAIN_GPUS", "1") or "1")
    with held_lease(s, run_id, "train", try_number):
        result = run_torchrun(config, processes, supervise) if processes > 1 else fine_tune(config)
    result.pop("split_counts", None)
    return result


@in_task
def change_step(
    params: Mapping[str, Any],
    split: Mapping[str, Any],
    run_id: str = "",
    *,
    env: Mapping[str, str] | None = None,
    champion: Callable[[str], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Whether this run has anything to train: not when the split's content and the training
    settings equal those the current champion was trained on (unless ``force_retrain``)."""
    from ml.data import load_split
    from ml.registry import champion_training
    from ml.storage import ObjectStore

    env = os.environ if env is None else env
    s = PipelineSettings.from_params(params, env)
    config = train_config(s, split["split"], run_id, env)
    key = config.key(load_split(config.split, ObjectStore())[1])
    plan: dict[str, Any] = {"train": True, "training_key": key, "model": s.model_name}
    if s.force_retrain:
        return {**plan, "reason": "force_retrain is set: training whatever the champion is"}
    current = (champion or champion_training)(s.model_name)
    if current is None:
        return {**plan, "reason": f"{s.model_name} has no champion yet"}
    plan["champion_version"] = current["version"]
    if current["training_key"] != key:
        return {
            **plan,
            "reason": f"the data or settings differ from champion v{current['version']}'s",
        }
    return {
        **plan,
        "train": False,
        "reason": f"the dataset content and training settings equal champion "
        f"v{current['version']}'s (training key {key}): nothing new to train or register; "
        "set force_retrain on the form to train anyway",
    }


def torchrun_command(config: Any, processes: int) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m ml train ...`` for ``config``, through
    :mod:`ml.launch` (torchrun tied to the task that starts it)."""
    from ml.params import PARAMETERS, fields_of

    flags = [
        flag for name in fields_of(config) for flag in PARAMETERS[name].argv(getattr(config, name))
    ]
    return [
        sys.executable,
        "-m",
        "ml.launch",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "ml",
        "-q",
        "train",
        *flags,
    ]


def run_torchrun(
    config: Any,
    processes: int,
    supervise: Callable[..., tuple[int, list[str]]] | None = None,
) -> dict[str, Any]:
    """Run the training under torchrun on this worker and return rank 0's summary.

    Its output reaches the task log line by line as it comes; when the task fails, times out
    or is killed, torchrun and every rank end with it (:func:`ml.supervise.run_supervised`)."""
    import json

    from ml.errors import OUT_OF_MEMORY, ParameterError, PipelineError
    from ml.redact import get_logger
    from ml.supervise import run_supervised

    logger = get_logger("ml.torchrun")
    code, tail = (supervise or run_supervised)(torchrun_command(config, processes), logger.info)
    if code != 0:
        errors = [line for line in tail if line.startswith("error:")]
        reason = errors[-1][len("error:") :].strip() if errors else f"exit code {code}"
        if reason.startswith(OUT_OF_MEMORY) or any("OutOfMemoryError" in line for line in tail):
            raise ParameterError(f"training under torchrun ({processes} processes): {reason}")
        raise PipelineError(f"training under torchrun ({processes} processes) failed: {reason}")
    for line in reversed(tail):
        if line.startswith("{") and '"run_id"' in line:
            result: dict[str, Any] = json.loads(line)
            return result
    raise PipelineError("training under torchrun printed no result; see the task log")


@in_task
def register_step(
    params: Mapping[str, Any], trained: Mapping[str, Any], run_id: str = "", try_number: int = 0
) -> dict[str, Any]:
    from ml.registry import register_model

    s = PipelineSettings.from_params(params)
    with held_lease(s, run_id, "register", try_number):
        return register_model(
            trained["run_id"],
            name=s.model_name,
            margin=s.promotion_margin,
            resamples=s.promotion_resamples,
            confidence=s.promotion_confidence,
            band=s.promotion_band,
            orchestrator_run_id=run_id,
        )


def champion_unchanged(events: Sequence[Mapping[str, Any]]) -> str:
    """Why a batch-inference run triggered by these model events has nothing new to score
    (each registered a version that did not become champion), or "" when it has (or when no
    event triggered it: a run by hand)."""
    if not events or any(event.get("promoted", True) for event in events):
        return ""
    versions = ", ".join(f"v{event.get('version', '?')}" for event in events)
    return (
        f"the champion did not change ({versions} stayed challenger): the predictions of "
        "the champion's last run stand"
    )


@in_task
def predict_step(
    csv: str, output: str, model_uri: str, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Batch inference from the form: every parameter is contained before any work starts."""
    from ml.containment import (
        check_input,
        check_model_uri,
        check_output,
        input_roots,
        output_dir_setting,
    )
    from ml.settings import ParameterError, allowed_networks

    env = os.environ if env is None else env
    store = env.get("ML_STORE", "").rstrip("/")
    if not store.startswith("s3://"):
        raise ParameterError("ML_STORE is not set to an s3://BUCKET/PREFIX URI on this worker")
    roots = input_roots(env, store)
    check_model_uri(model_uri)
    check_input(csv, roots=roots, parameter="csv", trusted=(env.get("ML_INFERENCE_CSV", ""),))
    output = check_output(output, store=store, output_dir=output_dir_setting(env))
    networks = allowed_networks(env)

    from ml.deployment import Deployment
    from ml.download import DownloadConfig
    from ml.predict import predict

    config = DownloadConfig(allow_networks=networks)
    threshold = Deployment.from_env(env).drift_p_value
    return predict(model_uri, csv, output, config=config, s3_roots=roots, drift_p_value=threshold)


@in_task
def forget_step(
    params: Mapping[str, Any], run_id: str = "", env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Forget from the form: the image is matched, never fetched; the store is the
    deployment's; every value is checked again here."""
    from ml.audit import actor, check_reason
    from ml.deployment import Deployment
    from ml.errors import ParameterError, PipelineError
    from ml.forget import forget
    from ml.lineage import check_target

    env = os.environ if env is None else env
    store = env.get("ML_STORE", "").rstrip("/")
    if not store.startswith("s3://"):
        raise ParameterError("ML_STORE is not set to an s3://BUCKET/PREFIX URI on this worker")
    try:
        target = check_target(str(params.get("image", "")))
    except PipelineError as exc:
        raise ParameterError(f"parameter 'image': {exc}") from None
    try:
        reason = check_reason(str(params.get("reason", "")))
    except PipelineError as exc:
        raise ParameterError(f"parameter 'reason': {exc}") from None
    name = Deployment.from_env().model_name
    return forget(target, reason, root=store, name=name, by=actor(run_id))
