"""The model: torchvision ResNet (152 by default) with a new 5-way head, and where its weights
come from.

Weights are named (``IMAGENET1K_V2``, ``IMAGENET1K_V1``, ``DEFAULT``), a local ``.pth`` file, or an
``s3://`` URI; files are checked against a known SHA-256 (torchvision's file names carry its first
8 hex digits, or pass ``weights_sha256``). Nothing is downloaded from the internet unless asked
for: a missing file fails with one message that says how to stage it. ``none`` (random init) is
for tests and the offline demo only, and is logged as such.

Usage: ``model, info = build_model("IMAGENET1K_V2", num_classes=5)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ml.errors import PipelineError
from ml.labels import LABELS
from ml.params import PARAMETERS
from ml.redact import get_logger, named_line
from ml.uri import S3Uri

if TYPE_CHECKING:
    from ml.storage import ObjectStore

log = get_logger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")
_ALIASES = {"imagenet": "IMAGENET1K_V2", "default": "DEFAULT"}


@dataclass(frozen=True)
class WeightsInfo:
    """What the model was initialized from; logged as run tags."""

    source: str
    pretrained: bool
    sha256: str = ""
    transforms: dict[str, Any] = field(default_factory=dict)


def eval_preset(arch: str = PARAMETERS["arch"].default, weights: Any = None) -> dict[str, Any]:
    """Evaluation preprocessing from the weights' own transforms (resize, crop, stats):
    ``IMAGENET1K_V1`` resizes to 256 for a 224 crop, ``IMAGENET1K_V2`` to 232. ``weights`` is a
    torchvision weights enum member; None means the architecture's default."""
    from torchvision.models import get_model_weights

    preset = (weights or get_model_weights(arch).DEFAULT).transforms()
    return {
        "crop_size": int(preset.crop_size[0]),
        "resize_size": int(preset.resize_size[0]),
        "mean": [float(x) for x in preset.mean],
        "std": [float(x) for x in preset.std],
    }


def known_weights(arch: str, path: Path) -> Any:
    """The torchvision weights a file holds, told by the hash in its name (``-f82ba261.pth``),
    or None for a file torchvision does not publish."""
    from torchvision.models import get_model_weights

    match = _HASH_IN_NAME.search(path.name)
    if not match:
        return None
    for member in get_model_weights(arch):
        published = _HASH_IN_NAME.search(Path(member.url).name)
        if published and published.group(1).startswith(match.group(1)[:8]):
            return member
    return None


def weights_cache_dir() -> Path:
    """Where torchvision looks for downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(path: Path, expected: str | None) -> str:
    actual = sha256_of(path)
    if not expected:
        match = _HASH_IN_NAME.search(path.name)
        expected = match.group(1) if match else None
    if expected and not actual.startswith(expected.lower()):
        raise PipelineError(
            f"weights file {path} has SHA-256 {actual[:16]}..., expected {expected}...; "
            "it is corrupt or not the file named: stage it again"
        )
    return actual


def _named_weights(arch: str, name: str) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    key = _ALIASES.get(name.lower(), name.upper())
    try:
        return enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise PipelineError(
            f"unknown weights {name!r} for {arch}; use one of {names}, a "
            ".pth file, an s3:// URI, or none"
        ) from None


def _missing_message(arch: str, filename: str, where: Path, *, form: bool = False) -> str:
    """Where the weights are missing and how to stage them; the choices are named as the user
    sets them: command-line flags, or (``form``) the trigger form's fields and the
    deployment's settings."""
    if form:
        use = (
            "then set the form's Initial weights field to s3://BUCKET/weights/"
            f"{filename} (or the deployment's ML_WEIGHTS)"
        )
        other = (
            "set ML_DOWNLOAD_WEIGHTS=true in the deployment where the workers reach the "
            "internet, or set Initial weights to none to train from scratch (tests and demos "
            "only)"
        )
    else:
        use = f"train with --weights s3://BUCKET/weights/{filename}"
        other = (
            "use --download-weights where the internet is reachable, or --weights none to "
            "train from scratch (tests and demos only)"
        )
    return (
        f"ImageNet weights for {arch} ({filename}) are not in {where} and this machine cannot "
        "download them. Stage them once: on a machine with internet run "
        f"`python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"`, "
        f"then `python -m ml stage-weights ~/.cache/torch/hub/checkpoints/{filename} "
        f"--to s3://BUCKET/weights`, {use} (or copy the file into {where} on the worker); "
        f"or {other}"
    )


def resolve_weights(
    arch: str,
    weights: str,
    *,
    sha256: str | None = None,
    download: bool = False,
    store: ObjectStore | None = None,
    form: bool = False,
) -> tuple[Path | None, WeightsInfo]:
    """The local file holding ``weights`` (None for random init) and what it is; ``form``: a
    missing file's message names the trigger form's fields, not the command line's flags."""
    if weights.lower() in ("none", ""):
        log.warning("training %s from random weights (--weights none): tests and demos only", arch)
        return None, WeightsInfo("none", pretrained=False, transforms=eval_preset(arch))
    cache = weights_cache_dir()
    if weights.startswith("s3://"):
        from ml.storage import ObjectStore

        uri = S3Uri.parse(weights)
        target = cache / Path(uri.key).name
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            partial.write_bytes((store or ObjectStore()).get_bytes(uri))
            partial.replace(target)
        digest = _check_hash(target, sha256)
        return target, WeightsInfo(weights, True, digest, _preset(arch, target))
    if weights.endswith((".pth", ".pt")) or os.sep in weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PipelineError(f"weights file not found: {path}")
        digest = _check_hash(path, sha256)
        return path, WeightsInfo(str(path), True, digest, _preset(arch, path))
    named = _named_weights(arch, weights)
    filename = Path(named.url).name
    target = cache / filename
    if not target.is_file():
        if not download:
            raise PipelineError(_missing_message(arch, filename, cache, form=form))
        torch.hub.load_state_dict_from_url(named.url, progress=False, check_hash=True)
    digest = _check_hash(target, sha256)
    return target, WeightsInfo(f"{arch}:{named.name}", True, digest, eval_preset(arch, named))


def _preset(arch: str, path: Path) -> dict[str, Any]:
    member = known_weights(arch, path)
    if member is None:
        log.info(
            "%s is not a published torchvision file: evaluating with %s's default preset",
            path.name,
            arch,
        )
    return eval_preset(arch, member)


def build_model(
    weights: str = PARAMETERS["weights"].default,
    *,
    arch: str = PARAMETERS["arch"].default,
    num_classes: int = len(LABELS),
    sha256: str | None = None,
    download: bool = False,
    store: ObjectStore | None = None,
) -> tuple[nn.Module, WeightsInfo]:
    """A ResNet with ImageNet (or no) weights and a freshly initialized ``num_classes`` head."""
    from torchvision.models import get_model

    if arch not in ARCHS:
        raise PipelineError(f"unknown --arch {arch!r}; use one of {', '.join(ARCHS)}")
    path, info = resolve_weights(arch, weights, sha256=sha256, download=download, store=store)
    # From scratch, zero-initialized last BN in each block trains far faster (Goyal et al.);
    # pretrained weights overwrite it anyway.
    model: Any = get_model(arch, weights=None, zero_init_residual=path is None)
    if path is not None:
        try:
            # weights_only: tensors and plain values; a weights file never runs code. Torch's
            # warnings about the file (an unknown pickle protocol in a garbage file) stay out of
            # the output: a file that fails gets the one error below, which names it.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # unpicklable, truncated, or another model's tensors
            raise PipelineError(
                f"{path} does not hold {arch} ImageNet weights ({named_line(exc, limit=160)}); "
                "stage the right file (python -m ml stage-weights) or use --weights none"
            ) from None
    _new_head(model, num_classes)
    return model, info


def architecture(arch: str, num_classes: int = len(LABELS)) -> nn.Module:
    """The network alone, with a ``num_classes`` head and no weights (serving loads its own)."""
    from torchvision.models import get_model

    if arch not in ARCHS:
        raise PipelineError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    model: nn.Module = get_model(arch, weights=None)
    _new_head(model, num_classes)
    return model


def _new_head(model: Any, num_classes: int) -> None:
    head = nn.Linear(model.fc.in_features, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    model.fc = head


class Classifier(nn.Module):
    """A network with its normalization inside: float RGB in [0, 1] -> class probabilities."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((x - self.mean) / self.std), dim=1)


def stage_weights(
    path: str, destination: str, *, store: ObjectStore | None = None
) -> dict[str, Any]:
    """Upload a weights file (hash-checked) into the store for workers without internet."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise PipelineError(f"weights file not found: {source}")
    digest = _check_hash(source, None)
    from ml.storage import ObjectStore

    target = S3Uri.parse(destination)
    if not target.key.endswith((".pth", ".pt")):
        target = target.child(source.name)
    (store or ObjectStore()).put_bytes(target, source.read_bytes())
    return {"weights": str(target), "sha256": digest, "bytes": source.stat().st_size}
