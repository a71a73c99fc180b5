"""A form user stays inside the pipeline: what csv, weights, output and model_uri may name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ml.containment import (
    MODEL_URI_PATTERN,
    ContainmentError,
    check_input,
    check_model_uri,
    check_output,
)
from ml.errors import ParameterError
from ml.pipeline import predict_step, run_partition
from ml.predict import neutralize_formulas
from ml.settings import PipelineSettings
from tests.conftest import REPO

STORE = "s3://pipeline/store"
ENV = {"ML_STORE": STORE}


@pytest.mark.parametrize(
    "uri", ["models:/image-sentiment@champion", "models:/m.v2/3", "models:/a_b-c@challenger"]
)
def test_registered_model_uris_pass(uri: str) -> None:
    assert check_model_uri(uri) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "runs:/abc/model",
        "file:///tmp/model",
        "s3://b/model",
        "models:/../x@champion",
        "models:/m",
        "models:/m@",
        "models:/m/0",
        "models:/m@champion/extra",
        "https://host/model.tar",
        "models:/m@champion\n",
        "mlflow-artifacts:/1/2/artifacts",
    ],
)
def test_other_model_uris_are_refused(uri: str) -> None:
    with pytest.raises(ContainmentError, match="model_uri"):
        check_model_uri(uri)


@pytest.mark.parametrize("output", [f"{STORE}/predictions/out.parquet", f"{STORE}/x.csv"])
def test_outputs_inside_the_store_pass(output: str) -> None:
    assert check_output(output, store=STORE) == output


@pytest.mark.parametrize(
    ("output", "rule"),
    [
        (f"{STORE}/x.py", r"\.csv or \.parquet"),
        (f"{STORE}/x.pth", r"\.csv or \.parquet"),
        (f"{STORE}/../other/x.csv", r"'\.\.'"),
        (f"{STORE}/a//x.csv", "empty"),
        ("s3://pipeline/storeX/x.csv", "inside the store"),
        ("s3://other-bucket/store/x.csv", "inside the store"),
        ("/usr/lib/python3/sitecustomize.csv", "ML_OUTPUT_DIR"),
        ("https://host/x.csv", "s3:// URI in the store"),
        ("", r"\.csv or \.parquet"),
    ],
)
def test_outputs_outside_are_refused(output: str, rule: str) -> None:
    with pytest.raises(ContainmentError, match=rule):
        check_output(output, store=STORE)


def test_local_outputs_only_inside_the_configured_folder(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # a link out of the folder
    assert check_output("day/p.csv", store=STORE, output_dir=str(root)) == str(root / "day/p.csv")
    assert check_output(str(root / "p.parquet"), store=STORE, output_dir=str(root))
    for bad in ("../p.csv", str(tmp_path / "p.csv"), "link/p.csv", "/etc/cron.d/x.csv"):
        with pytest.raises(ContainmentError):
            check_output(bad, store=STORE, output_dir=str(root))


@pytest.mark.parametrize(
    "value",
    [
        "/etc/passwd",
        "/proc/self/environ",
        "../../etc/shadow",
        "relative.csv",
        "s3://other-bucket/x.csv",
        "s3://pipeline/storeX/x.csv",
        "file:///etc/passwd",
        f"{STORE}/../x.csv",
        "gopher://h/x",
    ],
)
def test_inputs_outside_the_roots_are_refused(value: str) -> None:
    with pytest.raises(ContainmentError, match="csv"):
        check_input(value, roots=(STORE,), parameter="csv")


def test_inputs_inside_the_roots_pass(tmp_path: Path) -> None:
    roots = (STORE, str(tmp_path))
    (tmp_path / "in.csv").write_text("url,label\n")
    for value in (
        f"{STORE}/input/images.csv",
        str(tmp_path / "in.csv"),
        "https://example.org/images.csv",
    ):
        assert check_input(value, roots=roots, parameter="csv") == value
    (tmp_path / "escape").symlink_to("/etc")
    with pytest.raises(ContainmentError):
        check_input(str(tmp_path / "escape" / "passwd"), roots=roots, parameter="csv")
    # The deployment's own default is trusted as it is.
    assert check_input("/data/x.csv", roots=roots, parameter="csv", trusted=("/data/x.csv",))


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"csv": "/proc/self/environ"}, "csv"),
        ({"csv": "/etc/passwd"}, "csv"),
        ({"csv": "s3://someone-elses-bucket/data.csv"}, "csv"),
        ({"csv": f"{STORE}/in.csv", "weights": "/root/.ssh/id_rsa.pth"}, "weights"),
        ({"csv": f"{STORE}/in.csv", "weights": "https://h/w.pth"}, "weights"),
        ({"csv": f"{STORE}/in.csv", "weights": "s3://other/w.pth"}, "weights"),
        ({"csv": f"{STORE}/in.csv", "model_name": "x' or name='y"}, "model_name"),
    ],
)
def test_form_parameters_are_contained(params: dict[str, str], parameter: str) -> None:
    with pytest.raises(ParameterError, match=f"'{parameter}'"):
        PipelineSettings.from_params(params, ENV)


def test_form_defaults_and_named_weights_pass() -> None:
    env = {**ENV, "ML_CSV": "/data/images.csv", "ML_WEIGHTS": "/models/resnet152.pth"}
    settings = PipelineSettings.from_params(
        {"csv": "/data/images.csv", "weights": "/models/resnet152.pth"}, env
    )
    assert settings.csv == "/data/images.csv"
    for weights in ("IMAGENET1K_V1", "none", f"{STORE}/weights/resnet152-f82ba261.pth"):
        assert (
            PipelineSettings.from_params(
                {"csv": f"{STORE}/in.csv", "weights": weights}, ENV
            ).weights
            == weights
        )


def test_predict_step_refuses_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """No store, no MLflow, no network is touched: the parameters are refused first."""
    import ml.predict

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("predict ran")

    monkeypatch.setattr(ml.predict, "predict", boom)
    cases = [
        ("s3://pipeline/store/in.csv", "/home/airflow/.local/lib/x.py", "models:/m@champion"),
        ("s3://pipeline/store/in.csv", "s3://pipeline/store/out.csv", "runs:/123/model"),
        ("/etc/passwd", "s3://pipeline/store/out.csv", "models:/m@champion"),
        ("s3://pipeline/store/in.csv", "s3://pipeline/store/../../x.parquet", "models:/m/1"),
    ]
    for csv, output, model in cases:
        with pytest.raises(ContainmentError):
            predict_step(csv, output, model, env=ENV)


def test_spreadsheet_formulas_are_neutralized() -> None:
    frame = pd.DataFrame(
        {
            "input": [
                '=HYPERLINK("http://evil")',
                "+1",
                "-2",
                "@SUM(A1)",
                "\tx",
                "\rx",
                "http://ok/1.jpg",
            ],
            "p": [0.1, -0.5, 0.2, 0.3, 0.4, 0.5, 0.6],
        }
    )
    out = neutralize_formulas(frame)
    assert out["input"].tolist() == [
        '\'=HYPERLINK("http://evil")',
        "'+1",
        "'-2",
        "'@SUM(A1)",
        "'\tx",
        "'\rx",
        "http://ok/1.jpg",
    ]
    assert out["p"].tolist() == frame["p"].tolist()  # numbers are left alone


def test_distinct_run_ids_never_share_a_folder() -> None:
    ids = [
        "manual__2026-01-01T00:00:00+00:00",
        "manual__2026-01-01T00_00_00_00_00",
        "manual__2026-01-01T00:00:00 00:00",
        "a/b",
        "a_b",
        "a..b",
        "",
        "manual",
    ]
    folders = [run_partition(STORE, i) for i in ids]
    assert len({run_partition(STORE, i) for i in ids if i}) == len([i for i in ids if i])
    assert run_partition(STORE, "") == run_partition(STORE, "manual")  # the CLI's default
    assert all(f.startswith(f"{STORE}/runs/") and ".." not in f for f in folders)


def test_the_inference_form_refuses_other_model_uris_and_outputs() -> None:
    """The form's JSON-schema patterns match the worker-side rules (one source of truth)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bi", REPO / "dags" / "batch_inference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.MODEL_URI_RULE.pattern == MODEL_URI_PATTERN
    from airflow.sdk.definitions.param import ParamsDict

    _load_plugin("form_rules")
    dag = module.image_sentiment_batch_inference()
    params = ParamsDict(dag.params)
    for key, value, words in (
        ("model_uri", "runs:/1/model", "for example models:/image-sentiment@champion"),
        ("output", "x.py", "ending in .csv or .parquet"),
    ):
        with pytest.raises(Exception, match=words) as refused:
            params[key] = value
            params.validate()
        assert "^" not in str(refused.value).splitlines()[0]
    assert os.environ.get("ML_OUTPUT_DIR") is None


def _load_plugin(name: str) -> Any:
    """A module of the plugins folder, as Airflow loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "plugins" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
