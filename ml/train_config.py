"""The training configuration: one dataclass, validated, logged as MLflow params; it imports no
torch, so the CLI can build its options without loading it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ml.errors import PipelineError
from ml.layout import SplitLayout
from ml.params import PARAMETERS
from ml.uri import S3Uri

P = PARAMETERS
#: Config fields that do not change what is trained (left out of the checkpoint key).
RUNTIME_FIELDS = (
    "device",
    "workers",
    "compile",
    "cache_dir",
    "orchestrator_run_id",
    "run_name",
    "experiment",
    "checkpoint",
    "download_weights",
    "checkpoint_every",
    "ddp_timeout_minutes",
)

#: Settings added after trainings were recorded, left out of the identity while at their
#: default: a training that does not use one keeps the key (and checkpoints) it had before, so
#: adding a setting never makes an unchanged scheduled run retrain.
LATER_SETTINGS = ("agreement_weighting",)


@dataclass
class TrainConfig:
    """Everything a training run depends on; logged once as MLflow params. Each field is a
    parameter declared in :mod:`ml.params` (its type, default, range and description).

    **Learning rate and several GPUs**: ``learning_rate`` is the peak rate for the *global*
    batch, which is ``batch_size`` (images per process) times the number of processes. It is
    not rescaled when the number of GPUs changes; with N times the global batch, the usual
    starting point is N times the rate (the linear scaling rule, with the warmup kept).
    """

    split: str = P["split"].field()
    arch: str = P["arch"].field()
    weights: str = P["weights"].field()
    weights_sha256: str = P["weights_sha256"].field()
    download_weights: bool = P["download_weights"].field()
    epochs: int = P["epochs"].field()
    batch_size: int = P["batch_size"].field()
    optimizer: str = P["optimizer"].field()
    learning_rate: float = P["learning_rate"].field()
    momentum: float = P["momentum"].field()
    weight_decay: float = P["weight_decay"].field()
    warmup_epochs: float = P["warmup_epochs"].field()
    label_smoothing: float = P["label_smoothing"].field()
    imbalance: str = P["imbalance"].field()
    agreement_weighting: bool = P["agreement_weighting"].field()
    head_epochs: int = P["head_epochs"].field()
    image_size: int = P["image_size"].field()
    device: str = P["device"].field()
    precision: str = P["precision"].field()
    channels_last: bool = P["channels_last"].field()
    compile: bool = P["compile"].field()
    clip_grad: float = P["clip_grad"].field()
    patience: int = P["patience"].field()
    seed: int = P["seed"].field()
    workers: int = P["workers"].field()
    max_steps_per_epoch: int = P["max_steps_per_epoch"].field()
    checkpoint_every: int = P["checkpoint_every"].field()
    ddp_timeout_minutes: float = P["ddp_timeout_minutes"].field()
    experiment: str = P["experiment"].field()
    run_name: str = P["run_name"].field()
    checkpoint: str = P["checkpoint"].field()
    cache_dir: str = P["cache_dir"].field()
    orchestrator_run_id: str = P["orchestrator_run_id"].field()

    def validate(self) -> None:
        """Every field against its declaration, then the rules between fields."""
        for item in dataclasses.fields(self):
            setattr(self, item.name, P[item.name].check(getattr(self, item.name)))
        if not self.split:
            raise PipelineError("give --split (the 'split' URI that the split stage printed)")
        if self.head_epochs >= self.epochs:
            raise PipelineError("--head-epochs must be below --epochs")

    def identity(self, split_sha256: str = "") -> dict[str, Any]:
        """What is trained: every setting that changes the result, and the split's content
        (not only its URI: a split rewritten under the same name is other data)."""
        payload = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in RUNTIME_FIELDS and not (k in LATER_SETTINGS and v == P[k].default)
        }
        payload["split_sha256"] = split_sha256
        return payload

    def key(self, split_sha256: str = "") -> str:
        """Identifies what is trained: same key, same checkpoint to resume from."""
        text = json.dumps(self.identity(split_sha256), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def checkpoint_dir(self, split_sha256: str = "") -> S3Uri:
        """``--checkpoint`` when given, else a folder named by :meth:`key` beside the dataset."""
        if self.checkpoint:
            return S3Uri.parse(self.checkpoint)
        return SplitLayout.parse(self.split).dataset.training(self.key(split_sha256))


def identity_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """The settings in which a saved training differs from the current one (sorted)."""
    if not isinstance(saved, dict):
        return ["(no record of its settings)"]
    names = set(saved) | set(current)
    return sorted(n for n in names if saved.get(n) != current.get(n))
