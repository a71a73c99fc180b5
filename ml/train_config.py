"""The training configuration: one dataclass, validated, logged as MLflow params; it imports no
torch, so the CLI can build its options without loading it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ml.errors import PipelineError
from ml.uri import S3Uri

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("bf16", "fp16", "fp32")
IMBALANCE = ("class_weights", "sampler", "none")
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


@dataclass
class TrainConfig:
    """Everything a training run depends on; logged once as MLflow params.

    **Learning rate and several GPUs**: ``lr`` is the peak rate for the *global* batch, which
    is ``batch_size`` (images per process) times the number of processes. It is not rescaled
    when the number of GPUs changes; with N times the global batch, the usual starting point
    is N times the rate (the linear scaling rule, with the warmup kept).
    """

    split: str = ""
    arch: str = "resnet152"
    weights: str = "IMAGENET1K_V2"
    weights_sha256: str = ""
    download_weights: bool = False
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    imbalance: str = "class_weights"
    head_epochs: int = 0
    image_size: int = 224
    device: str = "auto"
    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    clip_grad: float = 1.0
    patience: int = 3
    seed: int = 0
    workers: int = 4
    max_steps_per_epoch: int = 0
    #: Write the resumable checkpoint every N epochs (and always after the last one).
    checkpoint_every: int = 1
    #: Collective timeout under torchrun: rank 0 alone evaluates, uploads and exports meanwhile.
    ddp_timeout_minutes: float = 60.0
    experiment: str = "image-sentiment"
    run_name: str = ""
    checkpoint: str = ""
    cache_dir: str = ""
    orchestrator_run_id: str = ""

    def validate(self) -> None:
        checks = [
            (bool(self.split), "give --split (the 'split' URI that the split stage printed)"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.image_size >= 32, "--image-size must be at least 32"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.head_epochs < self.epochs, "--head-epochs must be below --epochs"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.ddp_timeout_minutes > 0, "--ddp-timeout-minutes must be positive"),
            (self.warmup_epochs >= 0, "--warmup-epochs must not be negative"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
            (self.imbalance in IMBALANCE, f"--imbalance must be one of {IMBALANCE}"),
            (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                "--device must be auto, cpu or cuda",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PipelineError(message)

    def identity(self, split_sha256: str = "") -> dict[str, Any]:
        """What is trained: every setting that changes the result, and the split's content
        (not only its URI: a split rewritten under the same name is other data)."""
        payload = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}
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
        split = S3Uri.parse(self.split)
        dataset_root = split.key.split("/splits/")[0]
        return S3Uri(split.bucket, f"{dataset_root}/training/{self.key(split_sha256)}")


def identity_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """The settings in which a saved training differs from the current one (sorted)."""
    if not isinstance(saved, dict):
        return ["(no record of its settings)"]
    names = set(saved) | set(current)
    return sorted(n for n in names if saved.get(n) != current.get(n))
