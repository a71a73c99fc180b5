"""The model lifecycle against the real MLflow server and S3 endpoint: fair promotion, the
served model answering an image, and runs with nothing new that train nothing."""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devkit.imageserver import ImageServer
from devkit.servers import free_port, serve_model
from ml.evaluate import calibration, confidently_wrong
from ml.labels import LABELS
from ml.pipeline import change_step, register_step, train_step
from ml.promotion import compare, decide
from ml.registry import register_model
from ml.train import fine_tune
from tests.conftest import labelled_split
from tests.helpers import image_server_bytes, small_config

# ------------------------------------------------------------------ the rule (no servers)


def _probs(predicted: list[int], classes: int = 5) -> np.ndarray:
    out = np.full((len(predicted), classes), 0.01)
    out[np.arange(len(predicted)), predicted] = 0.96
    return out


def test_a_gain_from_one_image_is_within_noise() -> None:
    truth = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] * 2
    champion = list(truth)
    champion[0] = 1  # one mistake the new model does not make
    result = compare(truth, _probs(truth), _probs(champion), resamples=2000, confidence=0.95)
    assert result.gain > 0 and result.low <= 0 < result.high
    promoted, reason = decide(result, margin=0.0)
    assert not promoted and "within noise" in reason


def test_a_consistent_gain_promotes_and_the_margin_still_applies() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 400).tolist()
    champion = [t if rng.random() < 0.5 else int(rng.integers(0, 5)) for t in truth]
    result = compare(truth, _probs(truth), _probs(champion), resamples=1000)
    assert result.low > 0.2
    assert decide(result, margin=0.0)[0]
    promoted, reason = decide(result, margin=0.99)
    assert not promoted and "does not exceed the margin 0.99" in reason


def test_the_bootstrap_is_paired_and_reproducible() -> None:
    truth = [0, 1, 2, 3, 4] * 10
    same = compare(truth, _probs(truth), _probs(truth), resamples=500)
    assert (same.gain, same.low, same.high) == (0.0, 0.0, 0.0)  # same model: no spread at all
    one = compare(truth, _probs(truth), _probs([0] * 50), resamples=500, bootstrap_seed=4)
    two = compare(truth, _probs(truth), _probs([0] * 50), resamples=500, bootstrap_seed=4)
    assert one == two


def test_calibration_error_and_the_confidently_wrong() -> None:
    truth = [0, 1, 2, 3]
    sure_and_right = _probs(truth)
    report = calibration(sure_and_right, truth)
    assert report["ece"] == pytest.approx(1 - 0.96, abs=1e-9)  # 96 % sure, always right
    assert sum(b["count"] for b in report["bins"]) == 4
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    assert confidently_wrong(probs, [1, 1, 1, 0]) == [0, 1, 3]  # surest wrong first
    # All four right: the error is how far below certainty each bin's confidence is.
    assert calibration(probs, [0, 0, 1, 1])["ece"] == pytest.approx((0.1 + 0.4 + 0.2 + 0.45) / 4)


# ------------------------------------------------------- promotion on the real registry


@pytest.fixture(scope="module")
def easy_split(image_server: ImageServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Only the two most distinct classes: a test split where macro-F1 comes easily."""
    counts = {"Highly negative": 25, "Highly positive": 25}
    return labelled_split(image_server, counts, "easy", tmp_path_factory)


@pytest.mark.integration
@pytest.mark.slow
def test_a_higher_score_on_an_easier_test_split_does_not_promote(
    trained: dict[str, Any], easy_split: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    name = f"fair-{uuid.uuid4().hex[:6]}"
    champion = trained["result"]
    register_model(champion["run_id"], name=name)
    easy = fine_tune(small_config(easy_split, tmp_path, epochs=10))
    # The rule this replaces (recorded scores, each on its own test split) would rank it at
    # least as high (the champion may already score 1.0 on its own split):
    assert easy["test"]["macro_f1"] >= champion["test"]["macro_f1"]

    result = register_model(easy["run_id"], name=name)
    assert (result["version"], result["promoted"]) == (2, False)
    assert result["aliases"] == ["challenger"] and result["champion_version"] == 1
    comparison = result["promotion"]["comparison"]
    assert comparison["images"] == 10  # the new version's test images, scored by both
    assert comparison["new_score"] == pytest.approx(easy["test"]["macro_f1"], abs=1e-6)
    assert comparison["gain"] <= 0 or comparison["low"] <= 0
    version = MlflowClient().get_model_version(name, "2")
    assert version.tags["promotion_decision"] == "kept champion"
    assert version.tags["same_data_images"] == "10"
    assert "Stays challenger" in version.description
    assert f"{comparison['champion_score']:.4f}" in version.description


@pytest.mark.integration
@pytest.mark.slow
def test_a_retrain_with_another_seed_is_within_noise(
    trained: dict[str, Any], learn_split: str, tmp_path: Path
) -> None:
    name = f"noise-{uuid.uuid4().hex[:6]}"
    register_model(trained["result"]["run_id"], name=name)
    other = fine_tune(small_config(learn_split, tmp_path, seed=11))
    result = register_model(other["run_id"], name=name, resamples=2000, confidence=0.9)
    comparison = result["promotion"]["comparison"]
    assert comparison["images"] == 20 and comparison["confidence"] == 0.9
    # 20 images cannot show the other seed better (it may come out equal or worse).
    assert comparison["low"] <= 0 and comparison["low"] <= comparison["high"]
    assert not result["promoted"] and result["champion_version"] == 1
    expected = "within noise" if comparison["gain"] > 0 else "does not exceed the margin"
    assert expected in result["promotion"]["reason"]


@pytest.mark.slow
@pytest.mark.integration
def test_a_champion_with_other_labels_is_kept_and_the_reason_says_so(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """When the champion cannot be scored on the new images the documented fallback applies."""
    from mlflow import MlflowClient

    from ml import registry

    name = f"labels-{uuid.uuid4().hex[:6]}"
    run_id = trained["result"]["run_id"]
    register_model(run_id, name=name)
    client = MlflowClient()
    champion = client.get_model_version_by_alias(name, "champion")

    class OtherLabels:
        metadata = type("Metadata", (), {"metadata": {"labels": ["sad", "happy"]}})

    decision = registry._score_both(
        client, name, champion, client.get_run(run_id), None, load=lambda uri: OtherLabels()
    )
    assert isinstance(decision, registry.Decision) and not decision.promoted
    assert "other labels" in decision.reason and decision.rule == "fallback"


# ------------------------------------------------------------- the served model, over HTTP


@pytest.mark.integration
@pytest.mark.slow
def test_the_served_model_answers_each_image_and_refuses_bad_requests(
    trained: dict[str, Any], image_server: ImageServer, tmp_path: Path
) -> None:
    """``python -m ml serve``: a JPEG and a PNG get labels, a non-image and an empty value get
    their status; a request without Content-Type or without a body gets a 400 that says what
    to send (MLflow's own app answers those with a 500)."""
    name = f"served-{uuid.uuid4().hex[:6]}"
    register_model(trained["result"]["run_id"], name=name)
    # The registered model's description is its logged signature in words.
    from mlflow import MlflowClient
    from mlflow.models import get_model_info

    description = MlflowClient().get_registered_model(name).description
    signature = get_model_info(f"models:/{name}/1").signature
    for column in signature.inputs.input_names() + signature.outputs.input_names():
        assert f"{column} (" in description, column
    assert "image (binary" in description and "(N, 3, H, W)" not in description
    with serve_model(f"models:/{name}@champion", tmp_path, free_port()) as address:
        jpeg = image_server_bytes(image_server, "serve/a.jpg", label="Highly positive", w=800)
        png = image_server_bytes(image_server, "serve/b.png", fmt="png", w=40, h=30)
        rows = [[base64.b64encode(jpeg).decode()], [base64.b64encode(png).decode()], ["bm90"]]
        rows.append([""])
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        status, raw = _post(f"{address}/invocations", body, "application/json")
        refused = [
            _post(f"{address}/invocations", b"", None),
            _post(f"{address}/invocations", b"", "application/json"),
            _post(f"{address}/invocations", body, None),
        ]
    assert status == 200, raw
    answer = json.loads(raw, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))
    predictions = answer["predictions"]
    assert len(predictions) == 4
    for row in predictions[:2]:
        assert row["status"] == "ok" and row["label"] in LABELS
        probs = [row["p_" + label.lower().replace(" ", "_")] for label in LABELS]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["confidence"] == pytest.approx(max(probs))
    assert predictions[2]["status"] == "not_image" and predictions[2]["label"] is None
    assert predictions[3]["status"] == "empty" and predictions[3]["label"] is None
    for code, text in refused:
        assert code == 400, (code, text)
        message = json.loads(text)["message"]
        assert "Content-Type: application/json" in message and "dataframe_split" in message


def _post(url: str, body: bytes, content_type: str | None) -> tuple[int, bytes]:
    """(HTTP status, body) of a POST; ``content_type`` None sends no Content-Type at all."""
    import http.client

    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.putrequest("POST", parts.path, skip_accept_encoding=True)
        if content_type:
            connection.putheader("Content-Type", content_type)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ----------------------------------------------------------- nothing new: nothing to train


@pytest.mark.integration
@pytest.mark.slow
def test_unchanged_data_and_settings_train_nothing(
    learn_split: str, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose training would equal the champion's (same split content, same settings)
    trains nothing, unless forced; any change to the settings trains."""
    store = "/".join(learn_split.split("/")[:4])  # s3://BUCKET/PREFIX of the learn split
    env = {"ML_STORE": store, "ML_TRAIN_DEVICE": "cpu"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    form = {
        "csv": f"{store}/input/images.csv",
        "weights": "none",
        "epochs": 1,
        "max_steps_per_epoch": 1,
        "batch_size": 8,
        "image_size": 64,
        "workers": 0,
        "model_name": f"unchanged-{uuid.uuid4().hex[:6]}",
    }
    split = {"split": learn_split}
    first = change_step(form, split, "scheduled__1", env=env)
    assert first["train"] is True and "no champion" in first["reason"]
    trained = train_step(form, split, "scheduled__1", env=env)
    register_step(form, trained, "scheduled__1")

    again = change_step(form, split, "scheduled__2", env=env)
    assert again["train"] is False and "champion v1" in again["reason"]
    assert again["training_key"] == first["training_key"]
    forced = change_step({**form, "force_retrain": True}, split, "scheduled__3", env=env)
    assert forced["train"] is True and "force_retrain" in forced["reason"]
    changed = change_step({**form, "learning_rate": 0.02}, split, "scheduled__4", env=env)
    assert changed["train"] is True and changed["training_key"] != first["training_key"]
