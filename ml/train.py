"""Fine-tune ResNet-152 (ImageNet weights, new 5-way head) on a split; log it all to MLflow.

Single GPU or CPU (slow; tests use 64 px images and a few steps)::

    python -m ml train --split s3://BUCKET/PREFIX/datasets/ID/splits/seed0-80-15-5/splits.parquet

Several GPUs on one machine (DDP, a DistributedSampler; only rank 0 logs and saves)::

    torchrun --nproc-per-node 8 -m ml train --split s3://.../splits.parquet

The shape follows torchvision's classification reference: ``train_one_epoch``, ``evaluate``,
``make_loaders`` and ``fine_tune``; the checkpoint is one plain dict (model, optimizer,
scheduler, scaler, epoch, config, best metric, history, MLflow run id) written to the store
every epoch, so a rerun after a kill resumes at the next epoch in the same MLflow run.

Choices: class-weighted cross-entropy (``n / (k * count)``) with label smoothing is the default
remedy for the imbalance (``--imbalance sampler`` draws a class-balanced sample instead, single
process only); model selection and early stopping use validation macro-F1, never accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, WeightedRandomSampler

from ml.data import SplitImages, balanced_class_weights, class_counts
from ml.errors import PipelineError
from ml.evaluate import compute_metrics, plot_confusion, plot_curves
from ml.labels import LABELS
from ml.model import WeightsInfo, build_model
from ml.progress import Progress
from ml.redact import get_logger, redact_text
from ml.storage import ObjectStore, S3Uri
from ml.train_config import TrainConfig, identity_changes
from ml.transforms import eval_transform, to_model_input, train_transform

log = get_logger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(preference: str) -> Runtime:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK (or run as one process) and pick a device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if preference.startswith("cuda") and not cuda:
        raise PipelineError(
            "--device cuda was asked for but no GPU is visible; use --device cpu "
            "or run on a GPU worker"
        )
    if preference == "cpu" or not cuda:
        device = torch.device("cpu")
    elif preference.startswith("cuda:"):
        device = torch.device(preference)
    else:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world, local_rank, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Loaders:
    train: DataLoader[Any]
    valid: DataLoader[Any]
    test: DataLoader[Any]
    train_sampler: Sampler[int] | None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    class_weights: torch.Tensor | None = None


SPLIT_REQUIRED = ("split", "label_index", "object_key", "sha256", "label")


def load_split(uri: str, store: ObjectStore) -> tuple[pd.DataFrame, str]:
    """The split manifest and the SHA-256 of its bytes; a clear error when it is missing, is
    not a split manifest, or has an empty split."""
    data = store.get_bytes(S3Uri.parse(uri))
    try:
        table = pd.read_parquet(io.BytesIO(data))
    except Exception:  # pyarrow raises several types for a damaged file
        raise PipelineError(
            f"{uri} is not a readable Parquet file; pass the 'split' URI that the split stage "
            "printed (.../splits/<name>/splits.parquet), or rerun the split stage"
        ) from None
    missing = [c for c in SPLIT_REQUIRED if c not in table.columns]
    if missing:
        raise PipelineError(
            f"{uri} is not a split manifest (no {', '.join(missing)} column); pass the 'split' "
            "URI that the split stage printed (.../splits/<name>/splits.parquet)"
        )
    for name in ("train", "valid", "test"):
        if not (table["split"] == name).any():
            raise PipelineError(
                f"the {name} split of {uri} is empty; use more images or other --ratios"
            )
    return table, hashlib.sha256(data).hexdigest()


def make_loaders(
    table: pd.DataFrame, bucket: str, cfg: TrainConfig, rt: Runtime, preset: dict[str, Any]
) -> Loaders:
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "image-sentiment" / "images")
    parts = {
        name: table[table["split"] == name].reset_index(drop=True)
        for name in ("train", "valid", "test")
    }
    train_set = SplitImages(parts["train"], bucket, cache, train_transform(cfg.image_size))
    evaluation = eval_transform(cfg.image_size, preset)
    valid_set = SplitImages(parts["valid"], bucket, cache, evaluation)
    test_set = SplitImages(parts["test"], bucket, cache, evaluation)
    sampler: Sampler[int] | None = None
    if rt.world > 1:
        if cfg.imbalance == "sampler":
            raise PipelineError(
                "--imbalance sampler runs in one process only; use class_weights with torchrun"
            )
        sampler = DistributedSampler(train_set, rt.world, rt.rank, shuffle=True, seed=cfg.seed)
    elif cfg.imbalance == "sampler":
        per_class = class_counts(train_set.targets, len(LABELS))
        draw = [1.0 / per_class[t] for t in train_set.targets]
        sampler = WeightedRandomSampler(
            draw, len(draw), replacement=True, generator=torch.Generator().manual_seed(cfg.seed)
        )
    cuda = rt.device.type == "cuda"
    common: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.workers,
        "pin_memory": cuda,
    }
    if cfg.workers > 0:
        common.update(persistent_workers=cuda, prefetch_factor=4 if cuda else 2)
    generator = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(
        train_set,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=False,
        generator=generator,
        **common,
    )
    valid = DataLoader(valid_set, shuffle=False, **common)
    test = DataLoader(test_set, shuffle=False, **common)
    counts = {
        name: {label: int((part["label"] == label).sum()) for label in LABELS}
        for name, part in parts.items()
    }
    weights = (
        balanced_class_weights(train_set.targets, len(LABELS))
        if cfg.imbalance == "class_weights"
        else None
    )
    return Loaders(train, valid, test, sampler, counts, weights)


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    if device.type != "cuda" or cfg.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    rt: Runtime,
    preset: dict[str, Any],
    on_step: Callable[[str], None] | None = None,
) -> dict[str, float]:
    model.train()
    total_loss, correct, seen, started = 0.0, 0, 0, time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
            break
        x = to_model_input(
            images, rt.device, preset["mean"], preset["std"], channels_last=cfg.channels_last
        )
        y = targets.to(rt.device, non_blocking=True)
        with _autocast(cfg, rt.device):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if on_step is not None:
            on_step("step")
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    elapsed = time.perf_counter() - started
    stats = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=rt.device)
    if rt.world > 1:
        dist.all_reduce(stats)
    n = max(1.0, float(stats[2]))
    return {
        "train_loss": float(stats[0]) / n,
        "train_accuracy": float(stats[1]) / n,
        "train_images_per_s": float(stats[2]) / elapsed,
        "epoch_seconds": elapsed,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    loss_fn: nn.Module,
    cfg: TrainConfig,
    rt: Runtime,
    preset: dict[str, Any],
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics over the whole loader and the class probabilities, row by row."""
    model.eval()
    probs: list[np.ndarray] = []
    targets: list[int] = []
    total_loss = 0.0
    for images, y in loader:
        x = to_model_input(
            images, rt.device, preset["mean"], preset["std"], channels_last=cfg.channels_last
        )
        with _autocast(cfg, rt.device):
            logits = model(x).float()
        total_loss += float(loss_fn(logits, y.to(rt.device))) * len(y)
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        targets.extend(int(t) for t in y)
    p = np.concatenate(probs) if probs else np.zeros((0, len(LABELS)), dtype=np.float32)
    metrics = compute_metrics(targets, p.argmax(1).tolist() if len(p) else [])
    metrics["loss"] = total_loss / max(1, len(targets))
    return metrics, p


class Classifier(nn.Module):
    """What is registered: float RGB in [0, 1] (N, 3, H, W) -> class probabilities (N, 5)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((x - self.mean) / self.std), dim=1)


def _save(store: ObjectStore, uri: S3Uri, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    store.put_bytes(uri, buffer.getvalue())


def _load(store: ObjectStore, uri: S3Uri) -> dict[str, Any] | None:
    if not store.exists(uri):
        return None
    # weights_only: a checkpoint is tensors and plain values; never unpickle arbitrary objects.
    try:
        state: dict[str, Any] = torch.load(
            io.BytesIO(store.get_bytes(uri)), map_location="cpu", weights_only=True
        )
    except Exception as exc:  # truncated, foreign or unpicklable: all mean "not ours"
        raise PipelineError(
            f"checkpoint {uri} cannot be read ({type(exc).__name__}); delete it (or its "
            "folder) to start this training over"
        ) from None
    if not isinstance(state, dict):
        raise PipelineError(f"checkpoint {uri} is not a checkpoint of this pipeline; delete it")
    return state


def _check_identity(saved: Any, identity: dict[str, Any], where: S3Uri, cfg: TrainConfig) -> None:
    """Refuse to resume (or return) a training whose settings or data differ from ``cfg``."""
    changes = identity_changes(saved, identity)
    if not changes:
        return
    shown = ", ".join(("split content" if c == "split_sha256" else c) for c in changes[:8])
    raise PipelineError(
        f"{where} holds a training with other settings or data (differs in: {shown}); "
        + (
            "give another --checkpoint folder, or delete this one to start over"
            if cfg.checkpoint
            else "delete it to start over"
        )
    )


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    return [{"params": body, "name": "backbone"}, {"params": head, "name": "head"}]


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.momentum > 0,
    )


def _scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    head_steps = cfg.head_epochs * steps_per_epoch

    def body(step: int) -> float:
        # Head-only warm-up: the backbone's learning rate stays 0 for the first epochs.
        return 0.0 if step < head_steps else lr_factor(step, total, warmup)

    def head(step: int) -> float:
        return lr_factor(step, total, warmup)

    factors: list[Callable[[int], float]] = [body, head]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


@contextmanager
def _mlflow_run(cfg: TrainConfig, run_id: str | None, rt: Runtime) -> Iterator[Any]:
    if not rt.main:
        yield None
        return
    import mlflow

    try:
        mlflow.set_experiment(cfg.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=cfg.run_name or None)
    except Exception as exc:
        from ml.registry import tracking_uri

        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"the MLflow tracking server at {tracking_uri()} refused to start the run: "
            f"{redact_text(first)}; check the server and MLFLOW_TRACKING_URI"
        ) from None
    with run:
        yield run


def fine_tune(cfg: TrainConfig, *, store: ObjectStore | None = None) -> dict[str, Any]:
    """Train, evaluate on test with the best epoch, and log to MLflow (rank 0); resumable."""
    cfg.validate()
    rt = setup_runtime(cfg.device)
    store = store or ObjectStore()
    if rt.main:
        from ml.registry import check_tracking_server

        check_tracking_server()  # before any expensive work
    seed_everything(cfg.seed + rt.rank)
    table, split_sha256 = load_split(cfg.split, store)
    identity = cfg.identity(split_sha256)
    folder = cfg.checkpoint_dir(split_sha256)
    done_uri, last_uri, best_uri = (folder.child(n) for n in ("result.json", "last.pt", "best.pt"))
    if store.exists(done_uri):
        result: dict[str, Any] = store.read_json(done_uri)
        _check_identity(result.pop("identity", None), identity, folder, cfg)
        log.info("this training already finished (%s); returning its result", done_uri)
        return result

    model, weights = build_model(
        cfg.weights,
        arch=cfg.arch,
        sha256=cfg.weights_sha256 or None,
        download=cfg.download_weights,
        store=store,
    )
    preset = weights.transforms
    loaders = make_loaders(table, S3Uri.parse(cfg.split).bucket, cfg, rt, preset)
    steps = len(loaders.train)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    model = model.to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg, max(1, steps))
    scaler = torch.amp.GradScaler(
        "cuda", enabled=cfg.precision == "fp16" and rt.device.type == "cuda"
    )
    weight = loaders.class_weights.to(rt.device) if loaders.class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    plain_loss = nn.CrossEntropyLoss()

    state = _load(store, last_uri)
    start, best_f1, best_epoch, history, run_id, stale = 0, -1.0, -1, [], None, 0
    if state is not None:
        _check_identity(state.get("identity"), identity, folder, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best_f1, best_epoch = state["epoch"] + 1, state["best_metric"], state["best_epoch"]
        history, run_id, stale = state["history"], state["run_id"], state["stale_epochs"]
        log.info(
            "resuming from %s at epoch %d (best macro-F1 %.4f at epoch %d)",
            last_uri,
            start,
            best_f1,
            best_epoch,
        )

    trained = model
    if cfg.compile:
        trained = torch.compile(trained)  # type: ignore[assignment]
    if rt.world > 1:
        trained = nn.parallel.DistributedDataParallel(
            trained, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )

    with _mlflow_run(cfg, run_id, rt) as run:
        if run is not None and state is None:
            _log_start(cfg, weights, loaders, rt, folder, split_sha256)
        for epoch in range(start, cfg.epochs):
            if isinstance(loaders.train_sampler, DistributedSampler):
                loaders.train_sampler.set_epoch(epoch)
            bar = Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}") if rt.main else None
            with bar or nullcontext():
                stats = train_one_epoch(
                    trained,
                    loaders.train,
                    optimizer,
                    scheduler,
                    scaler,
                    loss_fn,
                    cfg,
                    rt,
                    preset,
                    bar.advance if bar else None,
                )
            stop = False
            if rt.main:
                valid, _ = evaluate(_unwrap(trained), loaders.valid, plain_loss, cfg, rt, preset)
                row = {
                    "epoch": epoch,
                    **stats,
                    "valid_loss": valid["loss"],
                    "valid_accuracy": valid["accuracy"],
                    "valid_macro_f1": valid["macro_f1"],
                    "lr": optimizer.param_groups[1]["lr"],
                }
                history.append(row)
                improved = valid["macro_f1"] > best_f1
                if improved:
                    best_f1, best_epoch, stale = valid["macro_f1"], epoch, 0
                    _save(
                        store,
                        best_uri,
                        {"model": _unwrap(trained).state_dict(), "epoch": epoch, "valid": valid},
                    )
                else:
                    stale += 1
                stop = bool(cfg.patience) and stale >= cfg.patience
                import mlflow

                mlflow.log_metrics(
                    {k: float(v) for k, v in row.items() if k != "epoch"}, step=epoch
                )
                _save(
                    store,
                    last_uri,
                    {
                        "model": _unwrap(trained).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "lr_scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch,
                        "config": dataclasses.asdict(cfg),
                        "identity": identity,
                        "best_metric": best_f1,
                        "best_epoch": best_epoch,
                        "history": history,
                        "run_id": run.info.run_id if run else None,
                        "stale_epochs": stale,
                    },
                )
                log.info(
                    "epoch %d/%d: loss %.4f, valid accuracy %.4f, macro-F1 %.4f%s",
                    epoch + 1,
                    cfg.epochs,
                    stats["train_loss"],
                    valid["accuracy"],
                    valid["macro_f1"],
                    " (best)" if improved else "",
                )
            if rt.world > 1:
                flag = [stop]
                dist.broadcast_object_list(flag, src=0)
                stop = bool(flag[0])
            if stop:
                log.info("early stop: no better validation macro-F1 for %d epochs", cfg.patience)
                break

        if not rt.main:
            dist.barrier()
            return {}
        best = _load(store, best_uri)
        assert best is not None
        final = _unwrap(trained)
        final.load_state_dict(best["model"])
        test, _ = evaluate(final, loaders.test, plain_loss, cfg, rt, preset)
        result = _log_end(cfg, final, test, history, best_epoch, loaders, preset, run, folder)
        store.write_json(done_uri, {**result, "identity": identity})
    if rt.world > 1:
        dist.barrier()
    return result


def _log_start(
    cfg: TrainConfig,
    weights: WeightsInfo,
    loaders: Loaders,
    rt: Runtime,
    folder: S3Uri,
    split_sha256: str,
) -> None:
    import mlflow

    params = {k: redact_text(str(v)) for k, v in dataclasses.asdict(cfg).items()}
    mlflow.log_params({**params, "split_sha256": split_sha256})
    tags = {
        "weights": weights.source,
        "pretrained": str(weights.pretrained).lower(),
        "weights_sha256": weights.sha256,
        "split": cfg.split,
        "dataset": cfg.split.split("/splits/")[0],
        "device": str(rt.device),
        "world_size": str(rt.world),
        "checkpoint": str(folder),
        **({"orchestrator_run_id": cfg.orchestrator_run_id} if cfg.orchestrator_run_id else {}),
        **(
            {"warning": "trained from random weights (--weights none)"}
            if not weights.pretrained
            else {}
        ),
    }
    mlflow.set_tags({k: redact_text(str(v)) for k, v in tags.items()})
    mlflow.log_dict(loaders.counts, "data/split_counts.json")
    mlflow.log_dict({str(i): name for i, name in enumerate(LABELS)}, "data/label_map.json")


def _log_end(
    cfg: TrainConfig,
    model: nn.Module,
    test: dict[str, Any],
    history: list[dict[str, Any]],
    best_epoch: int,
    loaders: Loaders,
    preset: dict[str, Any],
    run: Any,
    folder: S3Uri,
) -> dict[str, Any]:
    import mlflow
    from mlflow.models import infer_signature

    metrics = {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"],
        "best_epoch": float(best_epoch),
    }
    for name, values in test["per_class"].items():
        key = name.lower().replace(" ", "_")
        metrics.update(
            {
                f"test_f1_{key}": values["f1"],
                f"test_precision_{key}": values["precision"],
                f"test_recall_{key}": values["recall"],
            }
        )
    mlflow.log_metrics(metrics)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        plot_confusion(test, tmp / "confusion_matrix.png")
        plot_curves(history, tmp / "training_curves.png")
        (tmp / "test_report.json").write_text(json.dumps(test, indent=2))
        (tmp / "MODEL_CARD.md").write_text(_model_card(cfg, test, loaders, preset, best_epoch))
        mlflow.log_artifacts(str(tmp), "evaluation")

    classifier = Classifier(
        model.to("cpu").float().to(memory_format=torch.contiguous_format),
        preset["mean"],
        preset["std"],
    ).eval()
    size = cfg.image_size
    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        output = classifier(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        classifier,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={_version('torchvision')}",
            f"numpy=={np.__version__}",
        ],
        metadata={
            "labels": list(LABELS),
            "image_size": size,
            "resize_size": round(size * preset["resize_size"] / preset["crop_size"]),
            "input": "float32 RGB in [0, 1], shape (N, 3, H, W); output: probabilities",
        },
    )
    mlflow.set_tag("model_uri", info.model_uri)
    return {
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "test": {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"]},
        "checkpoint": str(folder),
        "split_counts": loaders.counts,
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]


def _model_card(
    cfg: TrainConfig,
    test: dict[str, Any],
    loaders: Loaders,
    preset: dict[str, Any],
    best_epoch: int,
) -> str:
    rows = "\n".join(
        f"| {name} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
        for name, v in test["per_class"].items()
    )
    resize = round(cfg.image_size * preset["resize_size"] / preset["crop_size"])
    return f"""# Image sentiment classifier

{cfg.arch} fine-tuned from `{cfg.weights}` to 5 sentiment classes: {", ".join(LABELS)}.

- Data: `{cfg.split}`; images per split and label: `{json.dumps(loaders.counts)}`
- Best epoch (validation macro-F1): {best_epoch}; trained {cfg.epochs} epochs at most
- Test accuracy {test["accuracy"]:.4f}, test macro-F1 {test["macro_f1"]:.4f}

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

## Input
RGB images: resize the shorter side to {resize} px, centre-crop {cfg.image_size} px, scale to
float32 in [0, 1], shape (N, 3, {cfg.image_size}, {cfg.image_size}). The model normalizes
internally and returns class probabilities in the order above. `python -m ml predict` does all of
this from image URLs or object keys.

## Caveats
The classes are very imbalanced (Positive about 55%, Highly negative about 2%): read macro-F1 and
the per-class rows, not accuracy alone. Labels are crowd judgments of perceived sentiment.
"""
