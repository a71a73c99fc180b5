"""One declaration per run parameter: the form, the CLI, the settings and the configs agree."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from ml.cli import build_parser
from ml.download import DownloadConfig
from ml.errors import ParameterError
from ml.params import DOWNLOAD, FORM, PARAMETERS, fields_of
from ml.settings import PipelineSettings
from ml.train_config import TrainConfig
from tests.conftest import REPO


def _options(stage: str) -> dict[str, Any]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage")
    return {a.dest: a for a in sub.choices[stage]._actions}  # type: ignore[union-attr]


def test_every_training_field_is_a_declared_parameter_with_its_cli_option() -> None:
    options = _options("train")
    for item in dataclasses.fields(TrainConfig):
        parameter = item.metadata["parameter"]
        assert parameter.name == item.name and parameter.default == item.default
        assert options[item.name].option_strings[0] == parameter.flag
        assert options[item.name].default == parameter.default
    assert fields_of(TrainConfig) == [f.name for f in dataclasses.fields(TrainConfig)]


def test_download_options_and_config_come_from_the_same_declarations() -> None:
    options = _options("download")
    assert set(DOWNLOAD) <= set(options)
    config = DownloadConfig.from_values({})
    assert config.download_concurrency == PARAMETERS["download_concurrency"].default
    assert config.fetch.deadline == PARAMETERS["deadline"].default
    assert config.image.max_pixels == PARAMETERS["max_pixels"].default
    with pytest.raises(ParameterError, match="'deadline' must be above 0"):
        DownloadConfig.from_values({"deadline": 0})


def test_one_name_per_parameter_everywhere() -> None:
    """Every form parameter means the same thing on the CLI and in the configs."""
    stage_options = {
        name
        for stage in ("ingest", "download", "split", "train", "register")
        for name in _options(stage)
    }
    for parameter in FORM:
        if parameter.name in ("csv", "download_batch_size", "force_retrain"):
            continue  # a positional; knobs of the DAG alone (batching, the unchanged check)
        assert parameter.name in stage_options, f"{parameter.name} has no CLI option"
    # One flag per parameter, and every stage spells it so (no alias, no second spelling).
    flags = [p.flag for p in PARAMETERS.values()]
    assert len(set(flags)) == len(flags)
    for stage in ("ingest", "download", "split", "train", "register", "predict"):
        for name, action in _options(stage).items():
            if name in PARAMETERS and action.option_strings:  # not a positional
                assert action.option_strings[0] == PARAMETERS[name].flag, (stage, name)


def test_the_form_is_derived_from_the_declarations(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setenv("ML_SAMPLE", "250")
    spec = importlib.util.spec_from_file_location(
        "dag_params", REPO / "dags" / "image_sentiment.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(module.PARAMS) == [p.name for p in FORM]
    for parameter in FORM:
        param = module.PARAMS[parameter.name]
        expected = parameter.json_schema()
        assert (param.description or "") == expected.pop("description", "")
        assert {k: v for k, v in param.schema.items() if k != "default"} == expected
    assert module.PARAMS["sample"].value == 250  # the deployment's default


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("epochs", 0, "at least 1"),
        ("learning_rate", 0, "above 0"),
        ("optimizer", "rmsprop", "one of sgd, adamw"),
        ("device", "tpu", "auto, cpu, cuda or cuda:N"),
        ("ratios", "0.8;0.2", "three fractions .* for example 0.8,0.15,0.05"),
        ("exclude_golden", "maybe", "true or false"),
        ("epochs", 2.5, "a whole number"),
        ("min_confidence", math.nan, "finite"),
        ("model_name", "a b", "letters, digits, .* for example image-sentiment"),
        ("csv", "", "cannot be empty"),
    ],
)
def test_values_are_checked_against_their_declaration(name: str, value: Any, message: str) -> None:
    with pytest.raises(ParameterError, match=f"parameter '{name}' must be.*{message}"):
        PARAMETERS[name].check(value)


def test_every_rule_is_said_in_words() -> None:
    """No message shows a regular expression; every form field says what it is for without
    naming a command-line flag (a form user has none)."""
    for parameter in PARAMETERS.values():
        if parameter.pattern:
            with pytest.raises(ParameterError) as refused:
                parameter.check("\u2603 nothing like it")
            assert parameter.pattern not in str(refused.value) and "^" not in str(refused.value)
            assert "for example" in parameter.expects, parameter.name
    for parameter in FORM:
        assert parameter.description, f"form field {parameter.name} has no help text"
        assert "--" not in parameter.description, parameter.name


def test_help_lists_choices_and_says_each_default_once() -> None:

    stages = next(a for a in build_parser()._actions if a.dest == "stage").choices
    train = stages["train"].format_help()
    for name in ("optimizer", "imbalance", "precision"):
        assert ", ".join(PARAMETERS[name].choices) in " ".join(train.split()), name
    split = " ".join(train.split()).rsplit("--split URI", 1)[1].split(" --")[0]
    assert "(required)" in split and "default" not in split
    assert "usage:" in train and "--split URI" in train.split("\n\n")[0]  # no brackets: required
    for stage in stages.values():
        formatter = stage._get_formatter()
        for action in stage._actions:
            shown = formatter._expand_help(action) if action.help else ""
            assert shown.lower().count("default") <= 1, (action.dest, shown)
            assert "(default: )" not in shown, action.dest


def test_settings_expose_every_form_parameter() -> None:
    settings = PipelineSettings.from_params(
        {"csv": "s3://b/p/in.csv", "epochs": "3"}, {"ML_STORE": "s3://b/p"}
    )
    assert settings.epochs == 3 and settings.learning_rate == 0.01
    assert set(settings.values) == {p.name for p in FORM}
    # Typed fields, one per form parameter, whose defaults are the declarations.
    assert fields_of(PipelineSettings) == [p.name for p in FORM]
    with pytest.raises(AttributeError):
        _ = settings.no_such_parameter  # type: ignore[attr-defined]


def test_the_readme_table_is_the_form() -> None:
    """The README's parameter table is generated from the declarations (one source)."""
    from ml.params import form_table

    readme = (REPO / "README.md").read_text()
    assert form_table() in readme, (
        "the README's parameter table differs from ml.params: replace it with the output of "
        'python -c "from ml.params import form_table; print(form_table())"'
    )


def test_one_deployment_block_for_both_workflows_and_the_cli() -> None:
    from ml.deployment import Deployment

    env = {"ML_STORE": "s3://b/p/", "ML_MODEL_NAME": "faces", "ML_SCHEDULE": "none"}
    deployment = Deployment.from_env(env)
    assert (deployment.store, deployment.csv) == ("s3://b/p", "s3://b/p/input/images.csv")
    assert deployment.schedule is None and deployment.champion_uri == "models:/faces@champion"
    assert deployment.model_asset == ("image_sentiment_model", "mlflow-registry://faces")
    with pytest.raises(ParameterError, match="set by ML_MODEL_NAME in the deployment"):
        Deployment.from_env({"ML_MODEL_NAME": "no spaces allowed"})
    for path in (REPO / "dags").glob("*.py"):  # nothing else reads the deployment's names
        text = path.read_text()
        assert "os.environ" not in text and 'ML_STORE"' not in text, path.name
