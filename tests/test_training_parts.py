"""Training's parts on the CPU: device choice, head-only warm-up, schedule, checkpoints, seeds.

What breaks only on a GPU is checked here through injectable decisions; the GPU script
(python -m benchmarks.train_throughput --part gpu) runs the rest where a GPU is at hand.
"""

from __future__ import annotations

import ast
import importlib.metadata
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ml.checkpoint import Checkpoints, TrainingState, cpu_copy
from ml.errors import ParameterError, PipelineError
from ml.loop import (
    Objective,
    Step,
    make_optimizer,
    make_scheduler,
    param_groups,
    set_backbone_frozen,
    train_mode,
    train_one_epoch,
)
from ml.model import architecture, eval_preset, known_weights
from ml.runtime import Runtime, choose_device, seed_epoch, seed_worker
from ml.serving import SentimentModel
from ml.tracking import SERVED_DISTRIBUTIONS, served_requirements
from ml.train_config import TrainConfig
from ml.transforms import Normalizer, Preprocessing
from ml.uri import S3Uri
from tests.conftest import REPO

CPU = Runtime(0, 1, 0, torch.device("cpu"))


# ------------------------------------------------------------------------- device choice


@pytest.mark.parametrize(
    ("preference", "cuda", "expected"),
    [
        ("auto", True, "cuda:0"),
        ("auto", False, "cpu"),
        ("cpu", True, "cpu"),
        ("cuda", True, "cuda:0"),
        ("cuda:3", True, "cuda:3"),
        ("CUDA", True, "cuda:0"),
    ],
)
def test_the_device_is_chosen_at_load_time(preference: str, cuda: bool, expected: str) -> None:
    assert str(choose_device(preference, cuda_available=lambda: cuda)) == expected


def test_asking_for_cuda_without_a_gpu_is_an_error_not_a_fallback() -> None:
    for preference in ("cuda", "cuda:1"):
        with pytest.raises(PipelineError, match="no GPU is visible"):
            choose_device(preference, cuda_available=lambda: False)
    with pytest.raises(PipelineError, match="auto, cpu, cuda"):
        choose_device("tpu", cuda_available=lambda: True)


def test_each_rank_gets_its_own_gpu() -> None:
    assert str(choose_device("auto", local_rank=5, cuda_available=lambda: True)) == "cuda:5"


def _served(tmp_path: Path, decide: Any, device: str = "auto") -> SentimentModel:
    from ml.model import Classifier
    from ml.serving import export

    preprocessing = Preprocessing(crop_size=32, resize_size=36)
    classifier = Classifier(architecture("resnet18"), preprocessing.mean, preprocessing.std)
    artifacts = export(
        classifier,
        tmp_path,
        {
            "arch": "resnet18",
            "labels": ["a", "b", "c", "d", "e"],
            "preprocessing": preprocessing.to_dict(),
        },
    )

    class Context:
        def __init__(self) -> None:
            self.model_config = {"device": device}
            self.artifacts = artifacts

    model = SentimentModel(decide)
    model.load_context(Context())
    return model


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and everything they require (installed here, extras left out), canonical."""
    todo, found = [canonicalize_name(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, requires):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return found


def test_the_served_models_requirements_cover_what_its_code_imports() -> None:
    """A served model's environment is MLflow and the model's pip requirements: every package
    that the ``ml`` modules loaded by the served model import is pinned or comes with those."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, ml._served_model; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    imported: set[str] = set()
    for module in (m for m in loaded if m.startswith("ml.")):
        source = (REPO / Path(*module.split("."))).with_suffix(".py")
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
    owners = importlib.metadata.packages_distributions()
    third_party = imported - set(sys.stdlib_module_names) - {"ml"}
    needed = {canonicalize_name(d) for name in third_party for d in owners[name]}
    assert {"opencv-python-headless", "simplejpeg", "torch"} <= needed  # the check sees them
    assert needed - _with_dependencies({"mlflow", *SERVED_DISTRIBUTIONS}) == set()
    assert all("==" in pin for pin in served_requirements())


def test_the_logged_model_moves_its_weights_to_the_chosen_device(tmp_path: Path) -> None:
    """A GPU machine is simulated by the decision: the weights go where it says (meta here)."""
    asked: list[str] = []

    def decide(preference: str) -> torch.device:
        asked.append(preference)
        return torch.device("meta")

    model = _served(tmp_path, decide, device="cuda")
    assert asked == ["cuda"]
    assert {p.device.type for p in model.network.parameters()} == {"meta"}
    cpu = _served(tmp_path, lambda p: choose_device(p, cuda_available=lambda: False))
    rows = cpu.predict(None, np.random.rand(2, 3, 32, 32).astype(np.float32))
    probs = rows[[c for c in rows.columns if c.startswith("p_")]].to_numpy()
    assert probs.shape == (2, 5) and np.allclose(probs.sum(1), 1, atol=1e-5)
    with pytest.raises(PipelineError, match="no GPU"):
        _served(tmp_path, lambda p: choose_device(p, cuda_available=lambda: False), "cuda")


# ------------------------------------------------------------------ head-only warm-up


def _batches(n: int = 16, size: int = 32) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return DataLoader(TensorDataset(images, torch.arange(n) % 5), batch_size=8)


def _step(model: nn.Module, cfg: TrainConfig, steps: int) -> Step:
    optimizer = make_optimizer(model, cfg)
    return Step(
        optimizer,
        make_scheduler(optimizer, cfg, steps),
        torch.amp.GradScaler("cuda", enabled=False),
        Objective(None, 0.0),
        Normalizer([0.5] * 3, [0.25] * 3, torch.device("cpu"), channels_last=False),
    )


def test_a_frozen_backbone_does_not_move_and_thaws_with_clean_state() -> None:
    torch.manual_seed(0)
    model = architecture("resnet18")
    cfg = TrainConfig(
        split="s3://b/x", epochs=4, head_epochs=1, warmup_epochs=2.0, learning_rate=0.1
    )
    step = _step(model, cfg, steps=2)
    assert {g["role"]: g["lr"] for g in step.optimizer.param_groups}["backbone"] == 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_backbone_frozen(model, step.optimizer, True)
    train_mode(model, frozen_backbone=True)
    train_one_epoch(model, _batches(), step, cfg, CPU)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("fc.") for k in moved)  # BN statistics included
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    assert all(p not in step.optimizer.state for p in backbone)  # no momentum built up
    # Thawing: the backbone's state starts clean and its learning rate warms up from ~0.
    for p in backbone:
        step.optimizer.state[p] = {"momentum_buffer": torch.ones_like(p)}
    set_backbone_frozen(model, step.optimizer, False)  # setting up (a resume): state stays
    assert all(p in step.optimizer.state for p in backbone)
    set_backbone_frozen(model, step.optimizer, False, thaw=True)
    assert all(p not in step.optimizer.state for p in backbone)
    assert all(p.requires_grad for p in model.parameters())
    rates = {g["role"]: g["lr"] for g in step.optimizer.param_groups}
    # The thawed backbone's first step: a quarter of the peak (warmup of 4 steps), where the
    # old schedule jumped to the head's rate (here already at half of its own warmup).
    assert rates["backbone"] == pytest.approx(cfg.learning_rate / 4)
    assert rates["head"] == pytest.approx(cfg.learning_rate * 3 / 4)


def test_schedule_gives_the_backbone_its_own_warmup() -> None:
    model = architecture("resnet18")
    cfg = TrainConfig(
        split="s3://b/x", epochs=10, head_epochs=2, warmup_epochs=1.0, learning_rate=1.0
    )
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=10)
    backbone, head = [], []
    for _ in range(40):
        rates = {g["role"]: g["lr"] for g in optimizer.param_groups}
        backbone.append(rates["backbone"])
        head.append(rates["head"])
        optimizer.step()
        scheduler.step()
    assert backbone[:20] == [0.0] * 20
    assert backbone[20] == pytest.approx(0.1) and backbone[29] == pytest.approx(1.0)
    assert head[0] == pytest.approx(0.1) and head[9] == pytest.approx(1.0)


def test_no_weight_decay_on_batchnorm_and_biases() -> None:
    groups = param_groups(architecture("resnet18"), weight_decay=1e-4)
    for group in groups:
        shapes = {p.ndim for p in group["params"]}
        # Matrices and kernels decay; BatchNorm weights and all biases (1-D) do not.
        assert group["weight_decay"] == (0.0 if shapes == {1} else 1e-4)
        assert shapes == {1} or 1 not in shapes
    assert {g["role"] for g in groups} == {"backbone", "head"}


# ----------------------------------------------------------- evaluation preprocessing


def test_evaluation_resize_follows_the_chosen_weights(tmp_path: Path) -> None:
    from torchvision.models import ResNet152_Weights

    v1 = eval_preset("resnet152", ResNet152_Weights.IMAGENET1K_V1)
    v2 = eval_preset("resnet152", ResNet152_Weights.IMAGENET1K_V2)
    assert (v1["resize_size"], v2["resize_size"]) == (256, 232)
    assert Preprocessing.from_preset(v1, 224).resize_size == 256
    assert Preprocessing.from_preset(v2, 64).resize_size == 66
    assert known_weights("resnet152", tmp_path / "resnet152-394f9c45.pth") == (
        ResNet152_Weights.IMAGENET1K_V1
    )
    assert known_weights("resnet152", tmp_path / "resnet152-f82ba261.pth") == (
        ResNet152_Weights.IMAGENET1K_V2
    )
    assert known_weights("resnet152", tmp_path / "mine.pth") is None


def test_normalizer_matches_the_reference_formula() -> None:
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    reference = (batch.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    out = Normalizer(mean, std, torch.device("cpu"), channels_last=True)(batch)
    assert torch.allclose(out, reference, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------- checkpoints


class _SlowStore:
    """An in-memory store whose writes take a while (to see them leave the loop's path)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.objects: dict[str, bytes] = {}
        self.delay = delay
        self.lock = threading.Lock()

    def put_bytes(self, uri: S3Uri, data: bytes, **_: object) -> bool:
        time.sleep(self.delay)
        with self.lock:
            self.objects[uri.key] = data
        return True

    def get_bytes(self, uri: S3Uri) -> bytes:
        return self.objects[uri.key]

    def exists(self, uri: S3Uri) -> bool:
        return uri.key in self.objects

    def list_keys(self, prefix: S3Uri) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix.key + "/"))

    def delete(self, uri: S3Uri) -> None:
        self.objects.pop(uri.key, None)

    def write_json(self, uri: S3Uri, payload: Any) -> None:
        import json

        self.objects[uri.key] = json.dumps(payload).encode()

    def read_json(self, uri: S3Uri) -> Any:
        import json

        return json.loads(self.objects[uri.key])


def _payload(epoch: int, best_epoch: int) -> dict[str, Any]:
    state = TrainingState(epoch=epoch, best_epoch=best_epoch, best_metric=0.5)
    return {"model": {"w": torch.full((2,), float(epoch))}, "state": state.to_dict()}


def test_uploads_run_off_the_training_loop() -> None:
    store = _SlowStore(delay=0.5)
    checkpoints = Checkpoints(store, S3Uri("b", "ck"), {"a": 1})  # type: ignore[arg-type]
    started = time.monotonic()
    checkpoints.save(_payload(0, 0), (0, {"w": torch.zeros(2)}))
    assert time.monotonic() - started < 0.3  # queued, not written
    checkpoints.wait()
    assert {"ck/last.pt", "ck/best-e0.pt"} <= set(store.objects)


def test_last_and_best_can_never_disagree_after_a_kill() -> None:
    store = _SlowStore()
    folder = S3Uri("b", "ck")
    checkpoints = Checkpoints(store, folder, {"a": 1}, background=False)  # type: ignore[arg-type]
    checkpoints.save(_payload(0, 0), (0, {"w": torch.zeros(2)}))
    checkpoints.save(_payload(1, 1), (1, {"w": torch.ones(2)}))
    assert set(store.objects) == {"ck/last.pt", "ck/best-e1.pt"}  # the older best is gone
    # Killed after the next best was written but before the last.pt that names it:
    from ml.checkpoint import serialize

    store.objects["ck/best-e2.pt"] = serialize({"model": {"w": torch.full((2,), 2.0)}, "epoch": 2})
    resumed = Checkpoints(store, folder, {"a": 1})  # type: ignore[arg-type]
    saved = resumed.load()
    assert saved is not None and saved["state"]["best_epoch"] == 1
    assert torch.equal(resumed.best_weights(saved)["w"], torch.ones(2))


def test_a_checkpoint_of_another_world_size_or_identity_is_refused() -> None:
    store = _SlowStore()
    folder = S3Uri("b", "ck")
    Checkpoints(store, folder, {"lr": 0.1}, world=2, background=False).save(  # type: ignore[arg-type]
        _payload(0, 0), (0, {"w": torch.zeros(2)})
    )
    with pytest.raises(PipelineError, match="2 process"):
        Checkpoints(store, folder, {"lr": 0.1}, world=1).load()  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match="differs in: lr"):
        Checkpoints(store, folder, {"lr": 0.2}, world=2).load()  # type: ignore[arg-type]


def test_cpu_copy_is_detached_from_training() -> None:
    weights = {"w": torch.zeros(3)}
    copy = cpu_copy(weights)
    weights["w"] += 1
    assert torch.equal(copy["w"], torch.zeros(3))


# ------------------------------------------------------------------------ random streams


def test_each_epoch_reseeds_every_stream_from_seed_rank_and_epoch() -> None:
    """An epoch's draws depend on (seed, rank, epoch) only: a resumed training draws what it
    would have, without any saved state; ranks and epochs all differ."""

    def draws(rank: int, epoch: int) -> tuple[float, ...]:
        generators = {"shuffle": torch.Generator().manual_seed(99)}
        random.random(), np.random.rand(), torch.rand(1)  # whatever ran before
        seed_epoch(7, rank, epoch, generators)
        return (
            random.random(),
            float(np.random.rand()),
            torch.rand(1).item(),
            torch.rand(1, generator=generators["shuffle"]).item(),
        )

    assert draws(0, 3) == draws(0, 3)
    seen = {draws(rank, epoch) for rank in range(3) for epoch in range(3)}
    assert len(seen) == 9
    assert len({value for row in seen for value in row}) == 36


class _Draw(torch.utils.data.Dataset[float]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> float:
        return float(np.random.rand())


def test_loader_workers_draw_their_own_numpy_streams() -> None:
    loader = DataLoader(
        _Draw(),
        batch_size=1,
        num_workers=2,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(0),
    )
    values = [float(v) for v in loader]
    assert len(set(values)) == len(values)


def test_the_collective_timeout_is_set_deliberately(monkeypatch: pytest.MonkeyPatch) -> None:
    import ml.runtime

    seen: dict[str, Any] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ml.runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        ml.runtime.dist,
        "init_process_group",
        lambda backend, **kw: seen.update(backend=backend, **kw),
    )
    ml.runtime.setup_runtime("cpu", timeout_minutes=45)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 45 * 60


# ------------------------------------------------------------- the training worker's side


def test_a_gpu_worker_pins_cuda_for_auto() -> None:
    from ml.pipeline import train_device
    from ml.settings import PipelineSettings

    env = {"ML_STORE": "s3://b/p"}
    auto = PipelineSettings.from_params({"csv": "s3://b/p/in.csv"}, env)
    cpu = PipelineSettings.from_params({"csv": "s3://b/p/in.csv", "device": "cpu"}, env)
    assert train_device(auto, {"ML_TRAIN_DEVICE": "cuda"}) == "cuda"
    assert train_device(auto, {}) == "auto"
    assert train_device(cpu, {"ML_TRAIN_DEVICE": "cuda"}) == "cpu"  # asked for explicitly


def test_preflight_fails_at_once_without_weights_or_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml.pipeline import preflight_step

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty weights cache
    env = {"ML_STORE": "s3://b/p"}
    params = {"csv": "s3://b/p/in.csv", "device": "cpu"}
    with pytest.raises(PipelineError, match="stage-weights") as refused:
        preflight_step(params, env)
    # A form user has no flags: the message names the form's field and the deployment's
    # settings instead.
    message = str(refused.value)
    assert "Initial weights" in message and "ML_DOWNLOAD_WEIGHTS" in message
    assert "--weights" not in message and "--download-weights" not in message
    assert preflight_step({**params, "weights": "none"}, env)["device"] == "cpu"
    with pytest.raises(PipelineError, match="no GPU"):
        preflight_step(
            {**params, "device": "auto", "weights": "none"}, {**env, "ML_TRAIN_DEVICE": "cuda"}
        )


def test_several_gpus_train_under_torchrun() -> None:
    from ml.pipeline import run_torchrun, torchrun_command

    config = TrainConfig(
        split="s3://b/d/splits/s/splits.parquet", compile=False, learning_rate=0.02
    )
    command = torchrun_command(config, 4)
    assert command[1:6] == ["-m", "ml.launch", "--standalone", "--nproc-per-node", "4"]
    assert "--no-compile" in command and command[command.index("--learning-rate") + 1] == "0.02"
    assert "--channels-last" in command  # every field travels, booleans included
    from ml.cli import build_parser

    parsed = build_parser().parse_args(command[command.index("train") :])
    assert parsed.learning_rate == 0.02 and parsed.compile is False and parsed.split == config.split

    ok = run_torchrun(config, 4, lambda *a, **k: (0, ["noise", '{"run_id": "r1"}']))
    assert ok == {"run_id": "r1"}
    with pytest.raises(PipelineError, match="the split is empty") as failed:
        run_torchrun(config, 4, lambda *a, **k: (2, ["x", "error: the split is empty"]))
    assert not isinstance(failed.value, ParameterError)  # may be retried
    oom = "error: out of GPU memory on cuda:1 at batch_size 64 (...); lower batch_size"
    with pytest.raises(ParameterError, match="batch_size 64"):
        run_torchrun(config, 4, lambda *a, **k: (1, ["Traceback", oom]))


def test_the_logged_model_takes_encoded_images_of_any_size(tmp_path: Path) -> None:
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from devkit.imageserver import png_bomb, scan_bomb

    model = _served(tmp_path, lambda p: choose_device(p, cuda_available=lambda: False))
    images = []
    for size, fmt in (((640, 480), "JPEG"), ((50, 90), "PNG"), ((300, 300), "WEBP")):
        out = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(out, fmt)
        images.append(out.getvalue())
    text = base64.b64encode(images[0]).decode()  # what a JSON request carries
    rows = model.predict(
        None,
        pd.DataFrame(
            {
                "image": [
                    *images,
                    text,
                    b"<html>not an image</html>",
                    png_bomb(),
                    scan_bomb(500, 512),
                ]
            }
        ),
    )
    labels = ["a", "b", "c", "d", "e"]
    assert list(rows.columns) == [
        "label",
        "confidence",
        *[f"p_{x}" for x in labels],
        "status",
        "error",
    ]
    ok = rows["status"] == "ok"
    assert ok.tolist() == [True] * 4 + [False] * 3
    assert set(rows.loc[ok, "label"]) <= set(labels) and rows.loc[~ok, "label"].isna().all()
    assert np.allclose(rows.loc[ok, [f"p_{x}" for x in labels]].sum(axis=1), 1, atol=1e-5)
    assert rows["status"].tolist()[4:] == ["not_image", "too_many_pixels", "too_complex"]
    assert rows.loc[0, "label"] == rows.loc[3, "label"]  # base64 text is the same picture


def test_runs_are_named_after_what_started_them() -> None:
    from datetime import UTC, datetime

    from ml.tracking import run_name

    split = "s3://b/d/splits/s/splits.parquet"
    assert (
        run_name(TrainConfig(split=split, orchestrator_run_id="manual__x")) == "airflow manual__x"
    )
    when = datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC)
    assert run_name(TrainConfig(split=split), when) == "cli 2026-12-02 01:02:03 UTC"
    assert run_name(TrainConfig(split=split, run_name="mine", orchestrator_run_id="x")) == "mine"


def test_mlflow_messages_keep_their_level_in_a_task(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A task log marks stderr lines as errors: inside a pipeline step MLflow's records reach
    the root logger at their own level, and what it prints to stderr goes to stdout."""
    import logging

    import mlflow  # noqa: F401 - configures its stderr handler
    from mlflow.utils.logging_utils import eprint

    from ml.tasklog import task_logging

    caplog.set_level(logging.INFO)
    assert logging.getLogger("mlflow").handlers and not logging.getLogger("mlflow").propagate
    capsys.readouterr()
    with task_logging():
        logging.getLogger("mlflow.tracking").info("created a run")
        logging.getLogger("mlflow.tracking").warning("a warning stays a warning")
        eprint("View run at http://mlflow/#/runs/1")
    out, err = capsys.readouterr()
    assert err == "" and "View run at" in out
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "mlflow.tracking"}
    assert levels == {"created a run": logging.INFO, "a warning stays a warning": logging.WARNING}
    assert logging.getLogger("mlflow").handlers and not logging.getLogger("mlflow").propagate


def test_predictions_keep_images_the_model_refused() -> None:
    """A served model answers a refused image with None (strict JSON): the prediction table
    still has one row per input, NaN probabilities and no label there."""
    import pandas as pd

    from ml.predict import _result_frame

    scored = pd.DataFrame(
        {
            "label": ["Positive", None],
            "confidence": [0.9, None],
            "p_positive": [0.9, None],
            "status": ["ok", "undecodable"],
            "error": ["", "truncated"],
        }
    )
    loaded = [(b"x", "ok", ""), (None, "http_error", "404"), (b"y", "ok", "")]
    table = _result_frame(["u1", "u2", "u3"], loaded, [0, 2], scored)
    assert table["label"][0] == "Positive" and table["label"].isna().tolist() == [False, True, True]
    assert table["status"].tolist() == ["ok", "http_error", "undecodable"]
    assert table["confidence"].dtype == "float64" and table["confidence"].isna().tolist() == [
        False,
        True,
        True,
    ]


def test_agreement_bands_and_the_promotion_band() -> None:
    """Bands by the share of annotators who chose the label; a promotion band keeps only its
    images, and a band the test split lacks is a parameter error, not a silent fallback."""
    import pandas as pd

    from ml.evaluate import agreement_band, band_metrics
    from ml.registry import _in_band

    values = [1.0, 0.999, 0.6715, 0.5, 0.4999, 0.3333, float("nan")]
    bands = ["all_agree", "all_agree", "majority", "majority", "no_majority", "no_majority", ""]
    assert [agreement_band(v) for v in values] == bands

    truth = [0, 1, 0, 1, 2, 2, 0]
    probs = np.eye(5)[[0, 1, 1, 1, 2, 0, 3]]
    found = band_metrics(values, truth, probs)
    assert found["all_agree"] == {
        "images": 2,
        "accuracy": 1.0,
        "macro_f1": 1.0,
        "recall": {"Highly negative": 1.0, "Negative": 1.0},
    }
    assert (found["majority"]["images"], found["majority"]["accuracy"]) == (2, 0.5)
    assert found["no_majority"]["recall"] == {"Neutral": 0.5}
    assert sum(b["images"] for b in found.values()) == 6  # the NaN is in no band

    frame = pd.DataFrame({"agreement": values, "label_index": truth})
    kept = _in_band(frame, "majority")
    assert kept["agreement"].tolist() == [0.6715, 0.5]
    with pytest.raises(ParameterError, match="promotion_band.*no images of that agreement band"):
        _in_band(frame.iloc[:2], "no_majority")
    with pytest.raises(ParameterError, match="promotion_band"):
        _in_band(pd.DataFrame({"label_index": [0]}), "majority")  # logged before agreement


def test_the_agreement_weighted_objective_scales_each_images_term() -> None:
    """Weights of 1 give nn.CrossEntropyLoss's weighted mean exactly; a weight of 2 counts an
    image as two copies of it; a weight of 0 leaves the image's logits without gradient."""
    from torch.nn import functional

    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    classes = torch.tensor([2.0, 1.0, 0.5, 1.0, 3.0])
    objective = Objective(classes, 0.1)
    plain = functional.cross_entropy(logits, targets, weight=classes, label_smoothing=0.1)
    assert torch.allclose(objective(logits, targets), plain)
    assert torch.allclose(objective(logits, targets, torch.ones(6)), plain)
    doubled = objective(logits, targets, torch.tensor([2.0, 1, 1, 1, 1, 1]))
    copied = objective(torch.cat([logits[:1], logits]), torch.cat([targets[:1], targets]))
    assert torch.allclose(doubled, copied)
    assert not torch.allclose(doubled, plain)
    leaf = logits.clone().requires_grad_()
    Objective(None, 0.1)(leaf, targets, torch.tensor([0.0, 1, 1, 1, 1, 1])).backward()
    assert leaf.grad is not None
    assert torch.count_nonzero(leaf.grad[0]) == 0 and torch.count_nonzero(leaf.grad[1:]) > 0


def test_agreement_weighting_reaches_the_training_step(tmp_path: Path) -> None:
    """With --agreement-weighting the training images carry their agreement (1 where the CSV
    gave none) and the step uses it: an image of weight 0 leaves the update as if it were not
    in the batch. Without it, the dataset gives no weight at all."""
    import io

    import pandas as pd
    from PIL import Image

    from ml.data import SplitImages

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    (tmp_path / f"{'a' * 64}.jpg").write_bytes(buffer.getvalue())
    rows = pd.DataFrame(
        {
            "object_key": ["k"] * 4,
            "sha256": ["a" * 64] * 4,
            "label_index": [0, 1, 2, 3],
            "agreement": [0.3333, float("nan"), 1.0, 1.7],
        }
    )
    weighted = SplitImages(rows, "b", tmp_path, lambda image: image, weighted=True)
    assert [weighted[i][1:] for i in range(4)] == [(0, 0.3333), (1, 1.0), (2, 1.0), (3, 1.0)]
    assert len(SplitImages(rows, "b", tmp_path, lambda image: image)[0]) == 2
    assert weighted[0][0].shape == (3, 8, 8)  # read from the cache and decoded
    assert TrainConfig().agreement_weighting is False  # off by default

    cfg = TrainConfig(split="s3://b/x", epochs=1, warmup_epochs=0.0, learning_rate=0.5)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    targets = torch.tensor([0, 3])

    def after(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
        train_one_epoch(model, [batch], _step(model, cfg, steps=1), cfg, CPU)  # type: ignore[arg-type]
        return model[1].weight.detach().clone()

    alone = after((images[:1], targets[:1]))
    assert torch.allclose(after((images, targets, torch.tensor([1.0, 0.0]))), alone, atol=1e-6)
    assert not torch.allclose(after((images, targets)), alone, atol=1e-3)


def test_label_issues_rank_confident_contradictions_first() -> None:
    """Per-class thresholds (the mean self-confidence of each given class): an image is listed
    when another class reaches its threshold, ranked by that probability over the given one's."""
    import pandas as pd

    from ml.labels import LABELS
    from ml.quality import LABEL_ISSUE_COLUMNS, label_issues
    from ml.serving import probability_column

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(5), 20)
    probs = np.full((100, 5), 0.02) + rng.uniform(0, 0.02, (100, 5))
    probs[np.arange(100), truth] = 0.9  # the model sees each picture's true class
    given = truth.copy()
    wrong = [3, 27, 55, 81]
    given[wrong] = (truth[wrong] + 2) % 5  # annotators' mistakes
    probs[7, [truth[7], (truth[7] + 1) % 5]] = [0.5, 0.45]  # unsure, but right: not listed
    probs /= probs.sum(1, keepdims=True)
    frame = pd.DataFrame(
        {
            "url": [f"https://example.com/{i}.jpg" for i in range(100)],
            "sha256": [f"{i:064x}" for i in range(100)],
            "split": "test",
            "label_index": given,
            "agreement": 1.0,
        }
    )
    for j, label in enumerate(LABELS):
        frame[probability_column(label)] = probs[:, j]
    issues = label_issues(frame)
    assert list(issues.columns) == list(LABEL_ISSUE_COLUMNS)
    assert sorted(issues["sha256"].head(4)) == [f"{i:064x}" for i in wrong]
    assert len(issues) == 4  # the unsure-but-right image is not an issue
    first = issues.iloc[0]
    assert first["suggested_label"] == LABELS[truth[int(first["sha256"], 16)]]
    assert first["confidence"] > 0.8 and first["given_label_probability"] < 0.05
    assert label_issues(frame.iloc[0:0]).empty


def test_drift_tests_tell_a_shift_from_a_sample_of_the_same() -> None:
    from ml.drift import check_drift, label_mix, mmd_test

    rng = np.random.default_rng(1)
    reference = rng.normal(0, 1, (150, 32))
    same = rng.normal(0, 1, (120, 32))
    shifted = rng.normal(0.4, 1, (120, 32))
    assert mmd_test(same, reference, permutations=200)["p_value"] > 0.05
    moved = mmd_test(shifted, reference, permutations=200)
    assert moved["p_value"] < 0.01 and moved["mmd2"] > 0 and moved["images"] == [120, 150]

    labels = ["Positive"] * 60 + ["Negative"] * 40
    assert label_mix(labels, labels)["p_value"] > 0.99
    flipped = label_mix(["Negative"] * 80 + ["Positive"] * 20, labels)
    assert flipped["p_value"] < 0.01 and flipped["batch"]["Negative"] == 80
    assert label_mix([], labels)["p_value"] == 1.0  # nothing scored: nothing to say

    quiet = check_drift(labels, same, labels, reference, 0.01)
    assert not quiet["alarm"] and quiet["verdict"].startswith("no drift")
    loud = check_drift(labels, shifted, labels, reference, 0.01)
    assert loud["alarm"] and loud["verdict"].startswith("drift: p = ")
    assert check_drift(labels, None, labels, reference)["features"] is None


def test_the_agreement_weighting_benchmark_runs_on_noise_that_follows_agreement(
    tmp_path: Path,
) -> None:
    """benchmarks/agreement_weighting.py: its data's wrong labels grow as agreement falls and
    spare the test split, and one weighted epoch runs through the trainer's parts."""
    from benchmarks.agreement_weighting import make_data, train_once

    table = make_data(tmp_path, {"train": 400, "valid": 20, "test": 40}, tint=0.3, seed=0)
    assert len(list(tmp_path.glob("*.jpg"))) == table["sha256"].nunique()
    wrong = table["label_index"] != table["truth"]
    train = table["split"] == "train"
    rates = wrong[train].groupby(table.loc[train, "agreement"].round(2)).mean()
    assert rates[0.33] > rates[0.67] > rates[1.0]
    assert not wrong[table["split"] == "test"].any()
    assert (abs(table.loc[wrong, "label_index"] - table.loc[wrong, "truth"]) == 1).all()
    import pandas as pd

    small = table[train].head(40)
    found = train_once(pd.concat([small, table[~train]]), tmp_path, True, seed=0, epochs=1)
    assert found["epoch"] == 1 and 0.0 <= found["test_macro_f1"] <= 1.0
