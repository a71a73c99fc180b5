"""The training loop's parts, torch only: optimizer and schedule, one epoch, evaluation.

Kept apart from the orchestration (:mod:`ml.train`) so that the GPU benchmark can run the
trainer's own step on a bare GPU machine (torch, torchvision, NumPy; scikit-learn for metrics).

- ``train_one_epoch`` keeps its sums on the device: one host sync per epoch, not per step.
- Head-only warm-up: :func:`set_backbone_frozen` stops the backbone's gradients (so no momentum
  builds up) and :func:`train_mode` keeps its BatchNorm statistics; the schedule gives the
  backbone its own warmup from the step it thaws.
- No weight decay on BatchNorm parameters and biases.
- Training loss is logged as plain cross-entropy, like validation loss; the objective (class
  weights, label smoothing, agreement weights) is logged beside it.
"""

from __future__ import annotations

import functools
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
from torch.utils.data import DataLoader

from ml.evaluate import compute_metrics
from ml.labels import LABELS
from ml.runtime import Runtime
from ml.train_config import TrainConfig
from ml.transforms import Normalizer


def is_head(name: str) -> bool:
    """Whether a parameter or module name belongs to the new classification head."""
    return name.split(".", 1)[0] == "fc" or ".fc." in f".{name}"


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
        return torch.optim.AdamW(groups, lr=cfg.learning_rate)
    return torch.optim.SGD(
        groups, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.momentum > 0
    )


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


def train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """Train mode; a frozen backbone's BatchNorm layers keep their running statistics."""
    model.train()
    if frozen_backbone:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not is_head(name):
                module.eval()


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (compute capability 8.0+: A100, H100, L4...).
    V100 and T4 only emulate it: slowly, and torch.compile fails on it."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def effective_precision(
    requested: str,
    device: torch.device,
    bf16_supported: Callable[[torch.device], bool] | None = None,
) -> str:
    """The precision training really uses: mixed precision on CUDA only (fp32 on the CPU), and
    fp16 with loss scaling where bf16 was asked for on a GPU without native bf16."""
    if device.type != "cuda":
        return "fp32"
    if requested == "bf16" and not (bf16_supported or native_bf16)(device):
        return "fp16"
    return requested


def precision_note(requested: str, used: str, device: torch.device) -> str:
    """One line on why ``used`` differs from ``requested`` (empty when they agree)."""
    if requested == used:
        return ""
    if device.type != "cuda":
        return f"precision {requested} applies on CUDA only; {device.type} trains in fp32"
    return (
        f"this GPU has no native bf16 (compute capability below 8.0): training in fp16 with "
        f"loss scaling instead of {requested}"
    )


def autocast(cfg: TrainConfig, device: torch.device) -> Any:
    used = effective_precision(cfg.precision, device)
    if used == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if used == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class Objective(nn.Module):
    """Cross-entropy with label smoothing and class weights, each image's term optionally
    scaled by its own weight (``--agreement-weighting``). The batch's terms are divided by the
    sum of the weights they carry, so with every image weight 1 this is exactly
    ``nn.CrossEntropyLoss``'s weighted mean, and a batch of ambiguous images keeps the loss's
    scale while each image counts in proportion to its weight within the batch."""

    def __init__(self, class_weights: torch.Tensor | None, label_smoothing: float) -> None:
        super().__init__()
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if weights is None:
            return functional.cross_entropy(
                logits, targets, weight=self.class_weights, label_smoothing=self.label_smoothing
            )
        terms = functional.cross_entropy(
            logits,
            targets,
            weight=self.class_weights,
            label_smoothing=self.label_smoothing,
            reduction="none",
        )
        carried = weights if self.class_weights is None else weights * self.class_weights[targets]
        return (terms * weights).sum() / carried.sum().clamp_min(1e-12)


@dataclass
class Step:
    """What one optimization step needs besides the batch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    objective: Objective
    normalizer: Normalizer


def make_step(
    model: nn.Module,
    cfg: TrainConfig,
    rt: Runtime,
    steps_per_epoch: int,
    normalizer: Normalizer,
    class_weights: torch.Tensor | None = None,
) -> Step:
    """The trainer's optimizer and schedule, loss scaling (fp16 on CUDA only) and objective,
    for ``model`` already on its device and in its memory format."""
    optimizer = make_optimizer(model, cfg)
    return Step(
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, steps_per_epoch),
        scaler=torch.amp.GradScaler(
            "cuda", enabled=effective_precision(cfg.precision, rt.device) == "fp16"
        ),
        objective=Objective(class_weights, cfg.label_smoothing),
        normalizer=normalizer,
    )


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
    for index, batch in enumerate(loader):
        if cfg.max_steps_per_epoch and index >= cfg.max_steps_per_epoch:
            break
        images, targets = batch[0], batch[1]
        x = step.normalizer(images)
        y = targets.to(rt.device, non_blocking=True)
        # A third item is each image's loss weight (SplitImages with ``weighted``).
        w = batch[2].to(rt.device, torch.float32, non_blocking=True) if len(batch) > 2 else None
        with autocast(cfg, rt.device):
            logits = model(x)
        logits = logits.float()
        loss = step.objective(logits, y, w)
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
        with autocast(cfg, rt.device):
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
