"""Fine-tune ResNet-152 (ImageNet weights, new 5-way head) on a split; log it all to MLflow.

Single GPU or CPU (slow; tests use 64 px images and a few steps)::

    python -m ml train --split s3://BUCKET/PREFIX/datasets/ID/splits/seed0-80-15-5/splits.parquet

Several GPUs on one machine (DDP, a DistributedSampler; only rank 0 logs and saves)::

    torchrun --nproc-per-node 8 -m ml train --split s3://.../splits.parquet

The shape follows torchvision's classification reference: ``train_one_epoch``, ``evaluate`` and
``fine_tune``, with the other concerns beside the loop: data and loaders in :mod:`ml.data`,
checkpoints in :mod:`ml.checkpoint`, MLflow in :mod:`ml.tracking`, the served model in
:mod:`ml.serving`, ranks, devices and seeds in :mod:`ml.runtime`.

Choices: class-weighted cross-entropy (``n / (k * count)``) with label smoothing is the default
remedy for the imbalance (``--imbalance sampler`` draws a class-balanced sample instead, single
process only); model selection and early stopping use validation macro-F1, never accuracy.
Head-only warm-up epochs (``--head-epochs``) freeze the backbone (no gradients, BatchNorm
statistics fixed); when it thaws it gets its own learning-rate warm-up and fresh optimizer state.
No weight decay on BatchNorm parameters and biases. Losses are logged on the same footing
(plain cross-entropy) for training and validation; the objective is logged beside them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, DistributedSampler

from ml.checkpoint import Checkpoints, TrainingState, cpu_copy
from ml.data import Loaders, load_split, make_loaders
from ml.evaluate import compute_metrics
from ml.labels import LABELS
from ml.model import Classifier, WeightsInfo, build_model, is_head
from ml.progress import Progress
from ml.redact import get_logger
from ml.runtime import Runtime, restore_rng, rng_state, seed_everything, setup_runtime
from ml.storage import ObjectStore, S3Uri
from ml.train_config import TrainConfig
from ml.transforms import Normalizer, Preprocessing

log = get_logger(__name__)

__all__ = ["Classifier", "evaluate", "fine_tune", "lr_factor", "train_one_epoch"]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------ optimizer and schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Backbone and head, each split into decayed weights and undecayed BatchNorm parameters
    and biases (decaying those only pulls the normalization towards zero)."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        role = "head" if is_head(name) else "backbone"
        groups.setdefault((role, param.ndim > 1), []).append(param)
    return [
        {
            "params": params,
            "role": role,
            "weight_decay": weight_decay if decayed else 0.0,
        }
        for (role, decayed), params in sorted(groups.items())
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine for the head from the first step; for the backbone, zero during the
    head-only epochs, then its own warmup from the step it thaws, then cosine to the end."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    thaw = cfg.head_epochs * steps_per_epoch

    def head(step: int) -> float:
        return lr_factor(step, total, warmup)

    def backbone(step: int) -> float:
        return 0.0 if step < thaw else lr_factor(step - thaw, total - thaw, warmup)

    factors: list[Callable[[int], float]] = [
        head if group["role"] == "head" else backbone for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def set_backbone_frozen(
    model: nn.Module, optimizer: torch.optim.Optimizer, frozen: bool, *, thaw: bool = False
) -> None:
    """Freeze (no gradients) or unfreeze the backbone; ``thaw`` (the step from frozen to
    trained) also starts the backbone's optimizer state clean."""
    for name, param in model.named_parameters():
        if not is_head(name):
            param.requires_grad_(not frozen)
            if thaw:
                optimizer.state.pop(param, None)


def _train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """Train mode; a frozen backbone's BatchNorm layers keep their running statistics."""
    model.train()
    if frozen_backbone:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not is_head(name):
                module.eval()


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    if device.type != "cuda" or cfg.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# ------------------------------------------------------------------------- one epoch


@dataclass
class Step:
    """What one optimization step needs besides the batch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    objective: nn.Module
    normalizer: Normalizer


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    step: Step,
    cfg: TrainConfig,
    rt: Runtime,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """One pass over the training loader. Sums stay on the device (no per-step host sync)."""
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, objective, right, n
    started = time.perf_counter()
    for index, (images, targets) in enumerate(loader):
        if cfg.max_steps_per_epoch and index >= cfg.max_steps_per_epoch:
            break
        x = step.normalizer(images)
        y = targets.to(rt.device, non_blocking=True)
        with _autocast(cfg, rt.device):
            logits = model(x)
        logits = logits.float()
        loss = step.objective(logits, y)
        step.optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            step.scaler.unscale_(step.optimizer)
            nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.clip_grad
            )
        step.scaler.step(step.optimizer)
        step.scaler.update()
        step.scheduler.step()
        with torch.no_grad():
            n = y.numel()
            sums[:3] += torch.stack(
                [
                    functional.cross_entropy(logits, y, reduction="sum").double(),
                    loss.detach().double() * n,
                    (logits.argmax(1) == y).sum().double(),
                ]
            )
            sums[3] += n
        if on_step is not None:
            on_step("step")
    if rt.world > 1:
        dist.all_reduce(sums)
    loss_sum, objective_sum, right, seen = sums.tolist()  # the one host sync of the epoch
    elapsed = time.perf_counter() - started
    n = max(1.0, seen)
    return {
        "train_loss": loss_sum / n,
        "train_objective": objective_sum / n,
        "train_accuracy": right / n,
        "train_images_per_s": seen / elapsed,
        "epoch_seconds": elapsed,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    cfg: TrainConfig,
    rt: Runtime,
    normalizer: Normalizer,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics over the whole loader (plain cross-entropy) and the class probabilities."""
    model.eval()
    probs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    for images, labels in loader:
        with _autocast(cfg, rt.device):
            logits = model(normalizer(images))
        logits = logits.float()
        y = labels.to(rt.device, non_blocking=True)
        loss_sum += functional.cross_entropy(logits, y, reduction="sum").double()
        probs.append(torch.softmax(logits, 1))
        targets.append(y)
    if not probs:
        return compute_metrics([], []) | {"loss": 0.0}, np.zeros((0, len(LABELS)), np.float32)
    p = torch.cat(probs).cpu().numpy()
    truth = torch.cat(targets).cpu().tolist()
    metrics = compute_metrics(truth, p.argmax(1).tolist())
    metrics["loss"] = float(loss_sum) / max(1, len(truth))
    return metrics, p


# -------------------------------------------------------------------------- training


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def _wrap(model: nn.Module, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """torch.compile and DDP around the model (rebuilt when the backbone thaws, since DDP
    registers only the parameters that need gradients when it is built)."""
    wrapped: nn.Module = model
    if cfg.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    if rt.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    return wrapped


@dataclass
class Session:
    """One training's parts, built by :func:`fine_tune` and driven by :func:`_run_epochs`."""

    cfg: TrainConfig
    rt: Runtime
    model: nn.Module
    loaders: Loaders
    step: Step
    checkpoints: Checkpoints
    state: TrainingState
    steps_per_epoch: int
    #: (epoch, CPU weights) of the best epoch seen by this process, when newer than the store's.
    best: tuple[int, dict[str, torch.Tensor]] | None = None


def _checkpoint(session: Session) -> None:
    """Queue the resumable checkpoint (rank 0); the upload runs in the background."""
    step = session.step
    payload = {
        "model": _unwrap(session.model).state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "lr_scheduler": step.scheduler.state_dict(),
        "state": session.state.to_dict(),
        "rng": rng_state(session.loaders.generators),
        "device": str(session.rt.device),
    }
    if step.scaler.is_enabled():
        payload["scaler"] = step.scaler.state_dict()
    session.checkpoints.save(payload, session.best)


def _end_epoch(session: Session, epoch: int, stats: dict[str, float]) -> bool:
    """Rank 0: validate, log, keep the best weights, checkpoint; whether to stop early."""
    cfg, state = session.cfg, session.state
    model = _unwrap(session.model)
    valid, _ = evaluate(model, session.loaders.valid, cfg, session.rt, session.step.normalizer)
    row = {
        "epoch": epoch,
        **stats,
        "valid_loss": valid["loss"],
        "valid_accuracy": valid["accuracy"],
        "valid_macro_f1": valid["macro_f1"],
        "lr": max(g["lr"] for g in session.step.optimizer.param_groups),
    }
    state.history.append(row)
    improved = valid["macro_f1"] > state.best_metric
    if improved:
        state.best_metric, state.best_epoch, state.stale_epochs = valid["macro_f1"], epoch, 0
        session.best = (epoch, cpu_copy(model.state_dict()))
    else:
        state.stale_epochs += 1
    stop = bool(cfg.patience) and state.stale_epochs >= cfg.patience
    state.epoch = epoch
    state.finished = stop or epoch + 1 >= cfg.epochs
    from ml.tracking import log_epoch

    log_epoch(row)
    if state.finished or (epoch + 1) % cfg.checkpoint_every == 0:
        _checkpoint(session)
    log.info(
        "epoch %d/%d: loss %.4f, valid accuracy %.4f, macro-F1 %.4f%s",
        epoch + 1,
        cfg.epochs,
        stats["train_loss"],
        valid["accuracy"],
        valid["macro_f1"],
        " (best)" if improved else "",
    )
    return stop


def _run_epochs(session: Session) -> None:
    cfg, rt, state = session.cfg, session.rt, session.state
    frozen = state.epoch + 1 < cfg.head_epochs
    raw = _unwrap(session.model)
    set_backbone_frozen(raw, session.step.optimizer, frozen)
    session.model = _wrap(raw, cfg, rt)
    for epoch in range(state.epoch + 1, cfg.epochs):
        if frozen and epoch >= cfg.head_epochs:
            frozen = False
            set_backbone_frozen(raw, session.step.optimizer, False, thaw=True)
            session.model = _wrap(raw, cfg, rt)
            log.info("epoch %d: the backbone thaws (its own warmup starts now)", epoch + 1)
        sampler = session.loaders.train_sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        _train_mode(session.model, frozen)
        bar = (
            Progress(session.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
            if rt.main
            else None
        )
        with bar or nullcontext():
            stats = train_one_epoch(
                session.model,
                session.loaders.train,
                session.step,
                cfg,
                rt,
                bar.advance if bar else None,
            )
        stop = _end_epoch(session, epoch, stats) if rt.main else False
        if rt.world > 1:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = bool(flag[0])
        if stop:
            log.info("early stop: no better validation macro-F1 for %d epochs", cfg.patience)
            break


def _resume(session: Session, saved: dict[str, Any]) -> None:
    """Put a saved checkpoint back: weights, optimizer, schedule, scaler, RNG, loop state."""
    step = session.step
    _unwrap(session.model).load_state_dict(saved["model"])
    step.optimizer.load_state_dict(saved["optimizer"])
    step.scheduler.load_state_dict(saved["lr_scheduler"])
    if "scaler" in saved and step.scaler.is_enabled():
        step.scaler.load_state_dict(saved["scaler"])
    restore_rng(saved.get("rng", {}), session.loaders.generators)
    session.state = TrainingState(**saved["state"])
    state = session.state
    log.info(
        "resuming from %s at epoch %d (best macro-F1 %.4f at epoch %d)%s",
        session.checkpoints.last,
        state.epoch + 1,
        state.best_metric,
        state.best_epoch,
        "; training had finished, testing the best epoch" if state.finished else "",
    )


def fine_tune(cfg: TrainConfig, *, store: ObjectStore | None = None) -> dict[str, Any]:
    """Train, evaluate on test with the best epoch, and log to MLflow (rank 0); resumable."""
    cfg.validate()
    rt = setup_runtime(cfg.device, timeout_minutes=cfg.ddp_timeout_minutes)
    store = store or ObjectStore()
    if rt.main:
        from ml.registry import check_tracking_server

        check_tracking_server()  # before any expensive work
    seed_everything(cfg.seed + rt.rank)
    table, split_sha256 = load_split(cfg.split, store)
    folder = cfg.checkpoint_dir(split_sha256)
    checkpoints = Checkpoints(
        store, folder, cfg.identity(split_sha256), world=rt.world, forced=bool(cfg.checkpoint)
    )
    finished = checkpoints.result()
    if finished is not None:
        log.info("this training already finished (%s); returning its result", folder)
        return finished

    session, weights, preprocessing, saved = _prepare(cfg, rt, store, table, checkpoints)
    from ml import tracking

    with tracking.start_run(cfg, session.state.run_id) if rt.main else nullcontext() as run:
        if run is not None and saved is None:
            session.state.run_id = run.info.run_id
            tracking.log_start(cfg, weights, session.loaders, rt, folder, split_sha256)
        if not session.state.finished:
            _run_epochs(session)
        checkpoints.wait()
        if not rt.main:
            dist.barrier()
            return {}
        result = _finish(session, weights, preprocessing, saved, run)
        checkpoints.write_result(result)
    if rt.world > 1:
        dist.barrier()
    return result


def _prepare(
    cfg: TrainConfig, rt: Runtime, store: ObjectStore, table: Any, checkpoints: Checkpoints
) -> tuple[Session, WeightsInfo, Preprocessing, dict[str, Any] | None]:
    """Model, loaders, optimizer and schedule, restored from the checkpoint when there is one."""
    model, weights = build_model(
        cfg.weights,
        arch=cfg.arch,
        sha256=cfg.weights_sha256 or None,
        download=cfg.download_weights,
        store=store,
    )
    preprocessing = Preprocessing.from_preset(weights.transforms, cfg.image_size)
    loaders = make_loaders(table, S3Uri.parse(cfg.split).bucket, cfg, rt, preprocessing)
    steps = len(loaders.train)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    model = model.to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    weight = loaders.class_weights.to(rt.device) if loaders.class_weights is not None else None
    step = Step(
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, max(1, steps)),
        scaler=torch.amp.GradScaler(
            "cuda", enabled=cfg.precision == "fp16" and rt.device.type == "cuda"
        ),
        objective=nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing),
        normalizer=preprocessing.normalizer(rt.device, channels_last=cfg.channels_last),
    )
    session = Session(cfg, rt, model, loaders, step, checkpoints, TrainingState(), max(1, steps))
    saved = checkpoints.load()
    if saved is not None:
        _resume(session, saved)
    return session, weights, preprocessing, saved


def _finish(
    session: Session,
    weights: WeightsInfo,
    preprocessing: Preprocessing,
    saved: dict[str, Any] | None,
    run: Any,
) -> dict[str, Any]:
    """Rank 0: test the best epoch, log everything and the served model; the result."""
    from ml import tracking

    cfg, state = session.cfg, session.state
    model = _unwrap(session.model)
    if session.best is not None:
        model.load_state_dict(session.best[1])
    elif saved is not None:  # resumed with no better epoch since: the saved best stands
        model.load_state_dict(session.checkpoints.best_weights(saved))
    test, _ = evaluate(model, session.loaders.test, cfg, session.rt, session.step.normalizer)
    classifier = Classifier(
        model.to("cpu").float().to(memory_format=torch.contiguous_format),
        preprocessing.mean,
        preprocessing.std,
    ).eval()
    model_uri = tracking.log_end(
        cfg,
        classifier,
        test,
        state.history,
        state.best_epoch,
        session.loaders,
        preprocessing,
        weights,
        run,
    )
    return {
        "run_id": run.info.run_id,
        "model_uri": model_uri,
        "best_epoch": state.best_epoch,
        "epochs_run": len(state.history),
        "test": {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"]},
        "checkpoint": str(session.checkpoints.folder),
        "split_counts": session.loaders.counts,
    }
