"""DAG integrity, the trigger form, the MLflow link plugin, and one end-to-end run through
Airflow's own runner (``dag.test()``) against the real S3 endpoint, MLflow server and image server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.imageserver import ImageServer
from ml.errors import PipelineError
from ml.labels import LABELS
from ml.params import FORM
from ml.settings import ParameterError, PipelineSettings
from ml.storage import ObjectStore, S3Uri
from tests.conftest import REPO
from tests.helpers import labelled_urls, plain_csv

DAG_FILES = sorted((REPO / "dags").glob("*.py"))
HEAVY = ("torch", "mlflow", "pandas", "boto3", "numpy", "PIL", "sklearn", "pyarrow")
#: The pipeline's modules a DAG file may load at parse time: declarations, standard library only.
LIGHT_ML = {
    "ml",
    "ml.errors",
    "ml.labels",
    "ml.params",
    "ml.containment",
    "ml.deployment",
    "ml.redact",
    "ml.uri",
}

PARSE = """
import importlib.util, json, sys
import pendulum
from airflow.sdk import Asset, dag, task
# What Airflow itself loads for any DAG with assets (its providers' URI handlers) is not the
# DAG file's doing: load it first, then measure only what our file adds.
@dag(schedule=[Asset(name="a", uri="mlflow-registry://m")], start_date=pendulum.now())
def baseline():
    task(lambda: None, task_id="t", outlets=[Asset(name="b", uri="s3://b/k")])()
baseline()
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
added = set(sys.modules) - before
print(json.dumps({"modules": sorted(added)}))
"""


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    home = Path(os.environ["AIRFLOW_HOME"])
    done = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return home


@pytest.fixture(scope="session")
def dagbag(airflow_db: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_light(path: Path) -> None:
    """A DAG file loads no heavy library and only the pipeline's declarations at parse time
    (what makes parsing slow; the parse time itself is not asserted: it depends on the load)."""
    done = subprocess.run(
        [sys.executable, "-c", PARSE, str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = set(report["modules"])
    heavy = {m for m in loaded if m.split(".")[0] in HEAVY}
    assert not heavy, f"{path.name} imports {sorted(heavy)[:10]} at parse"
    ours = {m for m in loaded if m.split(".")[0] == "ml"}
    assert ours <= LIGHT_ML, f"{path.name} imports {sorted(ours - LIGHT_ML)} at parse"


@pytest.mark.integration
def test_dags_import_without_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert {
        "image_sentiment",
        "image_sentiment_batch_inference",
        "image_sentiment_forget",
    } <= set(dagbag.dags)


@pytest.mark.integration
def test_every_task_retries(dagbag: Any) -> None:
    for dag in dagbag.dags.values():
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag.dag_id}.{task.task_id} has no retries"


@pytest.mark.integration
def test_pipeline_shape(dagbag: Any) -> None:
    dag = dagbag.dags["image_sentiment"]
    assert dag.max_active_runs == 1 and dag.catchup is False and dag.doc_md
    assert [t.task_id for t in dag.topological_sort()] == [
        "preflight",
        "ingest",
        "plan_batches",
        "download_batch",
        "collect_manifest",
        "split",
        "changes",
        "train",
        "register",
    ]
    train = dag.get_task("train")
    assert (train.queue, train.pool) == ("gpu", "gpu") and train.execution_timeout
    assert train.upstream_task_ids == {"split", "changes"}
    # register scores the champion on the new test images (a model pass): the GPU worker.
    assert dag.get_task("register").queue == "gpu"
    assert dag.get_task("changes").queue != "gpu"
    # The preflight runs where training will, but takes no GPU slot from a training job.
    preflight = dag.get_task("preflight")
    assert preflight.queue == "gpu" and preflight.pool != "gpu"
    assert dag.get_task("ingest").upstream_task_ids == {"preflight"}
    assert dag.get_task("download_batch").max_active_tis_per_dag >= 1
    outlets = {t.task_id: [a.name for a in t.outlets] for t in dag.tasks if t.outlets}
    assert outlets == {"ingest": ["image_sentiment_dataset"], "register": ["image_sentiment_model"]}
    inference = dagbag.dags["image_sentiment_batch_inference"]
    condition = inference.timetable.asset_condition
    assert [asset.name for asset in condition.objects] == ["image_sentiment_model"]


@pytest.mark.integration
def test_inference_skips_when_the_champion_did_not_move(
    dagbag: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model event from a register that promoted nothing skips batch inference (the same
    champion would score the same images again); one that moved the champion, or a run by
    hand, scores."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowSkipException

    predict = dagbag.dags["image_sentiment_batch_inference"].get_task("predict").python_callable
    params = {"csv": "s3://b/in.csv", "output": "", "model_uri": "models:/m@champion"}
    stayed = {"model": SimpleNamespace(extra={"version": 4, "promoted": False})}
    events = {key: [value] for key, value in stayed.items()}
    with pytest.raises(AirflowSkipException, match=r"did not change \(v4 stayed challenger\)"):
        predict(params=params, run_id="r", triggering_asset_events=events)
    moved = [
        SimpleNamespace(extra={"version": 4, "promoted": False}),
        SimpleNamespace(extra={"version": 5, "promoted": True}),
    ]
    calls: list[Any] = []
    monkeypatch.setattr("ml.pipeline.predict_step", lambda *a: calls.append(a) or {"predicted": 1})
    for triggered in ({"model": moved}, None):
        assert predict(params=params, run_id="r", triggering_asset_events=triggered)
    assert len(calls) == 2


@pytest.mark.integration
def test_every_text_rule_of_the_forms_is_checked_in_words(dagbag: Any) -> None:
    """Each text field's rule is a JSON-schema format the form-rules plugin registers (a
    format nobody registers would go unchecked), and a refusal says the rule in words."""
    from airflow.sdk.definitions.param import ParamsDict
    from jsonschema import FormatChecker

    from tests.test_containment import _load_plugin

    plugin = _load_plugin("form_rules")
    formats = {
        param.schema["format"]
        for dag in dagbag.dags.values()
        for _, param in dag.params.items()
        if "format" in param.schema
    }
    assert formats and formats <= {rule.expects for rule in plugin.RULES}
    assert formats <= set(FormatChecker().checkers)
    assert all("pattern" not in p.schema for d in dagbag.dags.values() for _, p in d.params.items())
    for name, bad, words in (
        ("ratios", "eighty,twenty", "for example 0.8,0.15,0.05"),
        ("model_name", "a b", "for example image-sentiment"),
        ("device", "tpu", "cuda:N"),
    ):
        params = ParamsDict(dict(dagbag.dags["image_sentiment"].params.items()))
        with pytest.raises(Exception, match=words) as refused:
            params[name] = bad
        assert "^" not in str(refused.value).splitlines()[0], str(refused.value)


@pytest.mark.integration
def test_trigger_form_refuses_bad_values(dagbag: Any) -> None:
    from airflow.sdk.definitions.param import ParamsDict

    from tests.test_containment import _load_plugin

    _load_plugin("form_rules")
    params = dagbag.dags["image_sentiment"].params
    form = {k: params[k] for k in params}
    ParamsDict(dict(params.items())).validate()  # the defaults are valid
    for name, bad in (
        ("epochs", 0),
        ("optimizer", "rmsprop"),
        ("ratios", "eighty,twenty"),
        ("min_confidence", 1.5),
        ("device", "tpu"),
        ("csv", ""),
    ):
        candidate = ParamsDict(dict(params.items()))
        with pytest.raises(Exception, match=name):
            candidate[name] = bad
    assert set(form) == {p.name for p in FORM}


def test_bad_parameters_fail_the_first_task_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_STORE", "s3://bucket/prefix")
    with pytest.raises(ParameterError, match="'ratios'.*sum to 1"):
        PipelineSettings.from_params({"csv": "x.csv", "ratios": "0.5,0.5,0.5"})
    with pytest.raises(ParameterError, match="'epochs' must be a whole number"):
        PipelineSettings.from_params({"csv": "x.csv", "epochs": "many"})
    with pytest.raises(ParameterError, match="unknown parameter"):
        PipelineSettings.from_params({"csv": "x.csv", "epoch": 3})
    monkeypatch.delenv("ML_STORE")
    with pytest.raises(ParameterError, match="ML_STORE"):
        PipelineSettings.from_params({"csv": "x.csv"})


@pytest.mark.integration
def test_every_task_fails_at_once_on_a_bad_parameter(
    dagbag: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One policy, on every task of both workflows: a wrong parameter fails the task without
    its retries (a plain task and one that yields asset metadata alike)."""
    from airflow.sdk.exceptions import AirflowFailException

    for dag in dagbag.dags.values():
        for task in dag.tasks:
            if not hasattr(task, "python_callable"):  # forget's retrain: takes no parameter
                assert (type(task).__name__, task.trigger_dag_id) == (
                    "TriggerDagRunOperator",
                    "image_sentiment",
                ) and not task.conf, task.task_id
                continue
            refused = getattr(task.python_callable, "fails_fast_on", ())
            assert ParameterError in refused or PipelineError in refused, task.task_id
    monkeypatch.setenv("ML_STORE", "s3://bucket/prefix")
    tasks = dagbag.dags["image_sentiment"].task_dict
    bad = {"csv": "s3://bucket/prefix/in.csv", "ratios": "0.5,0.5,0.5"}
    with pytest.raises(AirflowFailException, match="'ratios'.*sum to 1"):
        tasks["plan_batches"].python_callable({"dataset": "x"}, params=bad)
    with pytest.raises(AirflowFailException, match="'ratios'.*sum to 1"):
        list(tasks["ingest"].python_callable(params=bad))  # the generator fails as it runs


def test_mlflow_link_urls() -> None:
    from plugins.mlflow_links import mlflow_url

    assert (
        mlflow_url("train", {"run_id": "abc"}, "http://mlflow:5000/")
        == "http://mlflow:5000/#/runs/abc"
    )
    assert (
        mlflow_url("register", {"model": "m", "version": 3, "run_id": "abc"}, "http://m")
        == "http://m/#/models/m/versions/3"
    )
    assert mlflow_url("train", {}, "http://m") == ""


@pytest.mark.integration
def test_plugin_is_loaded(airflow_db: Path) -> None:
    from airflow import plugins_manager

    names = [link.name for link in plugins_manager.get_global_operator_extra_links()]
    assert "MLflow" in names


@pytest.fixture
def pipeline_env(
    store: ObjectStore,
    mlflow_server: str,
    monkeypatch: pytest.MonkeyPatch,
    image_server: ImageServer,
    tmp_path: Path,
) -> Iterator[dict[str, Any]]:
    bucket = f"dag-{uuid.uuid4().hex[:8]}"
    store.ensure_bucket(bucket)
    rows = labelled_urls(image_server, dict.fromkeys(LABELS, 8), prefix="dag", w=96, h=80)
    faults = [
        (image_server.url("dag/missing.jpg", fault="404"), "Positive"),
        (image_server.url("dag/page.jpg", fault="html"), "Neutral"),
        (image_server.url("dag/evil.jpg", fault="redirect-blocked"), "Negative"),
    ]
    csv = S3Uri(bucket, "input/images.csv")
    store.put_bytes(csv, plain_csv(rows + faults))
    monkeypatch.setenv("ML_STORE", f"s3://{bucket}/pipeline")
    monkeypatch.setenv("ML_ALLOW_NETWORKS", "127.0.0.0/8")
    monkeypatch.setenv("ML_INPUT_ROOTS", f"s3://{bucket}/input")  # where the form may read
    monkeypatch.setenv("ML_SCHEDULE", "none")
    monkeypatch.setenv("HOME", str(tmp_path))  # image cache of this run only
    yield {
        "bucket": bucket,
        "csv": str(csv),
        "rows": len(rows),
        "faults": len(faults),
        "good_rows": rows,
    }


def _made_by(client: Any, model: str, run_id: str) -> None:
    """Version 1 is tagged with the DAG run that made it, and its MLflow run is named after
    it (not with random words)."""
    version = client.get_model_version(model, "1")
    assert version.tags["orchestrator_run_id"] == run_id
    assert client.get_run(version.run_id).info.run_name == f"airflow {run_id}"


@pytest.mark.integration
@pytest.mark.slow
def test_dag_runs_end_to_end(
    pipeline_env: dict[str, Any], airflow_db: Path, store: ObjectStore
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session
    from mlflow import MlflowClient
    from sqlalchemy import select

    Pool.create_or_update_pool("gpu", slots=1, description="one GPU", include_deferred=False)
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["image_sentiment"]
    model = f"dag-model-{uuid.uuid4().hex[:6]}"
    conf = {
        "csv": pipeline_env["csv"],
        "epochs": 1,
        "batch_size": 8,
        "image_size": 64,
        "weights": "none",
        "device": "cpu",
        "workers": 0,
        "learning_rate": 0.03,
        "download_batch_size": 15,
        "model_name": model,
        "patience": 0,
    }
    run = dag.test(run_conf=conf)
    assert str(run.state) in ("success", "DagRunState.SUCCESS"), run.state

    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel

    with create_session() as session:
        states = {
            (ti.task_id, ti.map_index): str(ti.state)
            for ti in session.scalars(select(TaskInstance).where(TaskInstance.run_id == run.run_id))
        }
        assert all("success" in s for s in states.values()), states
        assert sum(1 for t, _ in states if t == "download_batch") == 3

        def value(task_id: str) -> Any:
            row = session.execute(
                XComModel.get_many(
                    key="return_value",
                    run_id=run.run_id,
                    dag_ids=dag.dag_id,
                    task_ids=task_id,
                    map_indexes=-1,
                ).with_only_columns(XComModel.value)
            ).first()
            return json.loads(row[0]) if isinstance(row[0], str) else row[0]

        manifest = value("collect_manifest")
        split = value("split")
        registered = value("register")
        events = {
            name: extra
            for name, extra in session.execute(
                select(AssetModel.name, AssetEvent.extra).join(
                    AssetEvent, AssetEvent.asset_id == AssetModel.id
                )
            )
        }

    assert manifest["statuses"] == {
        "ok": pipeline_env["rows"],
        "http_error": 1,
        "not_image": 1,
        "blocked": 1,
    }
    assert sum(sum(c.values()) for c in split["splits"].values()) == pipeline_env["rows"]
    assert all(
        split["splits"][s][label] >= 1 for s in ("train", "valid", "test") for label in LABELS
    )
    assert (registered["model"], registered["version"]) == (model, 1)
    assert registered["aliases"] == ["challenger", "champion"]
    _made_by(MlflowClient(), model, run.run_id)
    assert events["image_sentiment_dataset"]["dataset"].startswith(
        f"s3://{pipeline_env['bucket']}/pipeline/datasets/ds-"
    )
    assert events["image_sentiment_model"]["version"] == 1 and registered["promoted"]
    checkpoint = store.list_keys(S3Uri(pipeline_env["bucket"], "pipeline/runs"))
    assert any(k.endswith("training/last.pt") for k in checkpoint)  # partitioned by run

    # The same data and settings again (a scheduled run with nothing new): nothing trains,
    # nothing registers, and the run still succeeds.
    again = dag.test(run_conf=conf)
    assert str(again.state) in ("success", "DagRunState.SUCCESS"), again.state
    with create_session() as session:
        states = {
            ti.task_id: str(ti.state)
            for ti in session.scalars(
                select(TaskInstance).where(TaskInstance.run_id == again.run_id)
            )
        }
    assert "success" in states["changes"], states
    assert "skipped" in states["train"] and "skipped" in states["register"], states
    assert [v.version for v in MlflowClient().search_model_versions(f"name='{model}'")] == ["1"]

    # A CSV whose every image downloads: its second run has no batch to map, and the manifest,
    # split and change check still run (an empty mapping must not skip the rest of the run).
    clean = S3Uri(pipeline_env["bucket"], "input/clean.csv")
    store.put_bytes(clean, plain_csv(pipeline_env["good_rows"]))
    for attempt in ("first", "rerun"):
        done = dag.test(run_conf={**conf, "csv": str(clean)})
        assert str(done.state) in ("success", "DagRunState.SUCCESS"), (attempt, done.state)
    with create_session() as session:
        states = {
            (ti.task_id, ti.map_index): str(ti.state)
            for ti in session.scalars(
                select(TaskInstance).where(TaskInstance.run_id == done.run_id)
            )
        }
    assert "skipped" in states[("download_batch", -1)], states  # nothing left to fetch
    for task_id in ("collect_manifest", "split", "changes"):
        assert "success" in states[(task_id, -1)], (task_id, states)


@pytest.mark.integration
def test_the_forget_form_only_names_an_image_and_a_reason(
    dagbag: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forget form's image is matched against manifests, never fetched or opened: the form
    refuses anything but an http(s) URL or a SHA-256, and the worker checks again."""
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import AirflowFailException

    from tests.test_containment import _load_plugin

    _load_plugin("form_rules")
    dag = dagbag.dags["image_sentiment_forget"]
    assert [t.task_id for t in dag.topological_sort()] == ["forget", "wants_retrain", "retrain"]
    for name, bad in (
        ("image", "file:///etc/passwd"),
        ("image", "s3://bucket/prefix/images/ab/x.jpg"),
        ("image", "/etc/passwd"),
        ("image", "http://example.com/a\nb.jpg"),
        ("image", "ab" * 31),
        ("reason", ""),
        ("reason", "   "),
        ("reason", "x" * 2001),
        ("reason", "two\nlines"),
    ):
        params = ParamsDict(dict(dag.params.items()))
        with pytest.raises(Exception, match="is not a"):
            params[name] = bad
    params = ParamsDict(dict(dag.params.items()))
    params["image"] = "https://example.com/photo.jpg?id=1"
    params["image"] = "AB" * 32
    params["reason"] = "owner asked for removal"

    forget = dag.get_task("forget").python_callable
    monkeypatch.setenv("ML_STORE", "s3://bucket/prefix")
    for image, reason, words in (
        ("file:///etc/passwd", "x", "parameter 'image'"),
        ("https://example.com/a.jpg", " ", "--reason must say why"),
    ):
        with pytest.raises(AirflowFailException, match=words):
            forget(params={"image": image, "reason": reason, "retrain": False}, run_id="r")
    monkeypatch.delenv("ML_STORE")
    with pytest.raises(AirflowFailException, match="ML_STORE"):
        forget(params={"image": "a" * 64, "reason": "x", "retrain": False}, run_id="r")


@pytest.mark.integration
def test_drift_over_the_threshold_updates_the_drift_asset(dagbag: Any) -> None:
    """drift_alarm is skipped without drift (a skipped task emits no asset event) and, with
    drift, yields the figures as the drift asset's metadata for a team to schedule on."""
    from airflow.sdk import Metadata
    from airflow.sdk.exceptions import AirflowSkipException

    alarm = dagbag.dags["image_sentiment_batch_inference"].get_task("drift_alarm")
    assert [a.name for a in alarm.outlets] == ["image_sentiment_drift"]
    assert alarm.upstream_task_ids == {"predict"}

    def report(alarmed: bool) -> dict[str, Any]:
        return {
            "predictions": "s3://b/p/runs/r/predictions.parquet",
            "drift": {
                "alarm": alarmed,
                "verdict": "drift: p = 0.001 < 0.01" if alarmed else "no drift: every p-value",
                "model_version": 3,
                "threshold": 0.01,
                "label_mix": {"p_value": 0.2},
                "features": {"p_value": 0.001, "mmd2": 0.4},
                "mlflow_run": "abc",
            },
        }

    with pytest.raises(AirflowSkipException, match="no drift"):
        list(alarm.python_callable(report(False)))
    with pytest.raises(AirflowSkipException, match="drift not checked"):
        list(alarm.python_callable({"predictions": "x", "drift": None}))
    events = list(alarm.python_callable(report(True)))
    assert len(events) == 1 and isinstance(events[0], Metadata)
    assert events[0].asset.name == "image_sentiment_drift"
    assert events[0].extra["feature_p_value"] == 0.001
    assert events[0].extra["model_version"] == 3
