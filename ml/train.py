"""Fine-tune ResNet-152 (ImageNet weights, new 5-way head) on a split; log it all to MLflow.

Single GPU or CPU (slow; tests use 64 px images and a few steps)::

    python -m ml train --split s3://BUCKET/PREFIX/datasets/ID/splits/seed0-80-15-5/splits.parquet

Several GPUs on one machine (DDP, a DistributedSampler; only rank 0 logs and saves)::

    torchrun --nproc-per-node 8 -m ml train --split s3://.../splits.parquet

The shape follows torchvision's classification reference: ``train_one_epoch`` and ``evaluate``
(in :mod:`ml.loop`, torch only) and ``fine_tune`` here, with the other concerns beside the
loop: data and loaders in :mod:`ml.data`,
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

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from ml.checkpoint import Checkpoints, TrainingState, cpu_copy
from ml.data import Loaders, load_split, make_loaders
from ml.errors import OUT_OF_MEMORY, ParameterError
from ml.loop import (
    Step,
    effective_precision,
    evaluate,
    lr_factor,
    make_step,
    precision_note,
    set_backbone_frozen,
    train_mode,
    train_one_epoch,
)
from ml.model import Classifier, WeightsInfo, build_model
from ml.progress import Progress
from ml.redact import get_logger
from ml.runtime import Runtime, seed_epoch, seed_everything, setup_runtime, teardown_runtime
from ml.storage import ObjectStore, S3Uri
from ml.train_config import TrainConfig
from ml.transforms import Preprocessing

log = get_logger(__name__)

__all__ = ["Classifier", "evaluate", "fine_tune", "lr_factor", "train_one_epoch"]


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


def out_of_memory(cfg: TrainConfig, device: torch.device) -> ParameterError:
    """The one error a training out of GPU memory ends with: retrying the same batch cannot
    help, so the run fails at once and says what to change."""
    return ParameterError(
        f"{OUT_OF_MEMORY} on {device} at batch_size {cfg.batch_size} (image_size "
        f"{cfg.image_size}, precision {cfg.precision}); lower batch_size (for example "
        f"{max(1, cfg.batch_size // 2)}) or image_size, and trigger the run again"
    )


def fine_tune(cfg: TrainConfig, *, store: ObjectStore | None = None) -> dict[str, Any]:
    """Train, evaluate on test with the best epoch, and log to MLflow (rank 0); resumable."""
    cfg.validate()
    rt = setup_runtime(cfg.device, timeout_minutes=cfg.ddp_timeout_minutes)
    try:
        return _fine_tune(cfg, rt, store)
    except torch.OutOfMemoryError:
        raise out_of_memory(cfg, rt.device) from None
    finally:
        teardown_runtime()


def _fine_tune(cfg: TrainConfig, rt: Runtime, store: ObjectStore | None) -> dict[str, Any]:
    used = effective_precision(cfg.precision, rt.device)
    note = precision_note(cfg.precision, used, rt.device)
    if note and rt.device.type == "cuda":
        log.warning("%s", note)
    store = store or ObjectStore()
    if rt.main:
        from ml.mlflow_access import check_tracking_server

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

    trainer = Trainer.build(cfg, rt, store, table, checkpoints)
    saved = checkpoints.load()
    if saved is not None:
        trainer.resume(saved)
    from ml import tracking

    with tracking.start_run(cfg, trainer.state.run_id) if rt.main else nullcontext() as run:
        if run is not None and saved is None:
            trainer.state.run_id = run.info.run_id
            tracking.log_start(cfg, trainer.weights, trainer.loaders, rt, folder, split_sha256)
        if run is not None:
            tracking.log_precision(used, note)
        if not trainer.state.finished:
            trainer.fit()
        if run is not None:
            tracking.set_progress("testing the best epoch and logging the model")
        checkpoints.wait()
        if not rt.main:
            dist.barrier()
            return {}
        result = trainer.test_and_log(run)
        checkpoints.write_result(result)
    if rt.world > 1:
        dist.barrier()
    return result


class Trainer:
    """The one owner of a training's state, read top to bottom as torchvision's reference
    reads: the model, the step (optimizer, schedule, gradient scaler), the loop state (epoch,
    history, best so far) and the best weights. It calls the checkpoints and MLflow (rank 0);
    neither calls back."""

    def __init__(
        self,
        cfg: TrainConfig,
        rt: Runtime,
        checkpoints: Checkpoints,
        model: nn.Module,
        weights: WeightsInfo,
        preprocessing: Preprocessing,
        loaders: Loaders,
        step: Step,
        steps_per_epoch: int,
    ) -> None:
        self.cfg, self.rt, self.checkpoints = cfg, rt, checkpoints
        self.model, self.weights, self.preprocessing = model, weights, preprocessing
        self.loaders, self.step, self.steps_per_epoch = loaders, step, steps_per_epoch
        self.state = TrainingState()
        #: (epoch, CPU weights) of the best epoch seen by this process, when newer than the
        #: store's.
        self.best: tuple[int, dict[str, torch.Tensor]] | None = None
        #: The checkpoint this training resumed from, if any.
        self.resumed: dict[str, Any] | None = None

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        rt: Runtime,
        store: ObjectStore,
        table: Any,
        checkpoints: Checkpoints,
    ) -> Trainer:
        """Model, loaders, optimizer and schedule, fresh (see :meth:`resume`)."""
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
        steps = max(1, steps)
        model = model.to(rt.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        weight = loaders.class_weights.to(rt.device) if loaders.class_weights is not None else None
        normalizer = preprocessing.normalizer(rt.device, channels_last=cfg.channels_last)
        step = make_step(model, cfg, rt, steps, normalizer, weight)
        return cls(cfg, rt, checkpoints, model, weights, preprocessing, loaders, step, steps)

    def resume(self, saved: dict[str, Any]) -> None:
        """Put a saved checkpoint back: weights, optimizer, schedule, scaler, loop state
        (random streams are reseeded from (seed, rank, epoch) at each epoch: nothing to
        restore)."""
        step = self.step
        _unwrap(self.model).load_state_dict(saved["model"])
        step.optimizer.load_state_dict(saved["optimizer"])
        step.scheduler.load_state_dict(saved["lr_scheduler"])
        if "scaler" in saved and step.scaler.is_enabled():
            step.scaler.load_state_dict(saved["scaler"])
        self.state = TrainingState(**saved["state"])
        self.resumed = saved
        log.info(
            "resuming from %s at epoch %d (best macro-F1 %.4f at epoch %d)%s",
            self.checkpoints.last,
            self.state.epoch + 1,
            self.state.best_metric,
            self.state.best_epoch,
            "; training had finished, testing the best epoch" if self.state.finished else "",
        )

    def fit(self) -> None:
        """The epochs left: the head alone first (``head_epochs``), then the whole network;
        rank 0 validates after each and decides an early stop for every rank."""
        cfg, rt = self.cfg, self.rt
        frozen = self.state.epoch + 1 < cfg.head_epochs
        raw = _unwrap(self.model)
        set_backbone_frozen(raw, self.step.optimizer, frozen)
        self.model = _wrap(raw, cfg, rt)
        for epoch in range(self.state.epoch + 1, cfg.epochs):
            if frozen and epoch >= cfg.head_epochs:
                frozen = False
                set_backbone_frozen(raw, self.step.optimizer, False, thaw=True)
                self.model = _wrap(raw, cfg, rt)
                log.info("epoch %d: the backbone thaws (its own warmup starts now)", epoch + 1)
            stats = self.train_epoch(epoch, frozen)
            stop = self.end_epoch(epoch, stats) if rt.main else False
            if rt.world > 1:
                flag = [stop]
                dist.broadcast_object_list(flag, src=0)
                stop = bool(flag[0])
            if stop:
                log.info("early stop: no better validation macro-F1 for %d epochs", cfg.patience)
                break

    def train_epoch(self, epoch: int, frozen: bool) -> dict[str, float]:
        """One pass over the training loader (a bar and the MLflow progress tag on rank 0)."""
        cfg, rt = self.cfg, self.rt
        seed_epoch(cfg.seed, rt.rank, epoch, self.loaders.generators)
        sampler = self.loaders.train_sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        train_mode(self.model, frozen)
        label = f"epoch {epoch + 1}/{cfg.epochs}"
        bar = Progress(self.steps_per_epoch, label) if rt.main else None
        with bar or nullcontext():
            on_step = _on_step(bar, label, self.steps_per_epoch)
            return train_one_epoch(self.model, self.loaders.train, self.step, cfg, rt, on_step)

    def end_epoch(self, epoch: int, stats: dict[str, float]) -> bool:
        """Rank 0: validate, log, keep the best weights, checkpoint; whether to stop early."""
        cfg, state = self.cfg, self.state
        model = _unwrap(self.model)
        valid, _ = evaluate(model, self.loaders.valid, cfg, self.rt, self.step.normalizer)
        row = {
            "epoch": epoch,
            **stats,
            "valid_loss": valid["loss"],
            "valid_accuracy": valid["accuracy"],
            "valid_macro_f1": valid["macro_f1"],
            "lr": max(g["lr"] for g in self.step.optimizer.param_groups),
        }
        state.history.append(row)
        improved = valid["macro_f1"] > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.stale_epochs = valid["macro_f1"], epoch, 0
            self.best = (epoch, cpu_copy(model.state_dict()))
        else:
            state.stale_epochs += 1
        stop = bool(cfg.patience) and state.stale_epochs >= cfg.patience
        state.epoch = epoch
        state.finished = stop or epoch + 1 >= cfg.epochs
        from ml.tracking import log_epoch

        log_epoch(row)
        if state.finished or (epoch + 1) % cfg.checkpoint_every == 0:
            self.checkpoint()
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

    def checkpoint(self) -> None:
        """Queue the resumable checkpoint (rank 0); the upload runs in the background."""
        step = self.step
        payload = {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "lr_scheduler": step.scheduler.state_dict(),
            "state": self.state.to_dict(),
            "device": str(self.rt.device),
        }
        if step.scaler.is_enabled():
            payload["scaler"] = step.scaler.state_dict()
        self.checkpoints.save(payload, self.best)

    def test_and_log(self, run: Any) -> dict[str, Any]:
        """Rank 0: test the best epoch, log everything and the served model; the result."""
        from ml import tracking

        cfg, state = self.cfg, self.state
        model = _unwrap(self.model)
        if self.best is not None:
            model.load_state_dict(self.best[1])
        elif self.resumed is not None:  # resumed with no better epoch since: the saved best
            model.load_state_dict(self.checkpoints.best_weights(self.resumed))
        test, probs = evaluate(model, self.loaders.test, cfg, self.rt, self.step.normalizer)
        _, valid = evaluate(model, self.loaders.valid, cfg, self.rt, self.step.normalizer)
        classifier = Classifier(
            model.to("cpu").float().to(memory_format=torch.contiguous_format),
            self.preprocessing.mean,
            self.preprocessing.std,
        ).eval()
        model_uri = tracking.log_end(
            cfg,
            classifier,
            tracking.TestOutcome(
                test, probs, self.loaders.test.dataset, (valid, self.loaders.valid.dataset)
            ),
            state.history,
            state.best_epoch,
            self.loaders,
            self.preprocessing,
            self.weights,
        )
        best, epochs = state.best_epoch + 1, len(state.history)
        tracking.set_progress(f"finished: best epoch {best} of {epochs}")
        return {
            "run_id": run.info.run_id,
            "model_uri": model_uri,
            "best_epoch": state.best_epoch,
            "epochs_run": epochs,
            "test": {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"]},
            "checkpoint": str(self.checkpoints.folder),
            "split_counts": self.loaders.counts,
        }


def _on_step(bar: Progress | None, label: str, steps: int) -> Callable[[str], None] | None:
    """Each step advances the bar and the MLflow run's progress tag (on rank 0)."""
    if bar is None:
        return None
    from ml import tracking

    report = tracking.progress_reporter(label, steps)

    def advance(status: str) -> None:
        bar.advance(status)
        report(1)

    return advance
