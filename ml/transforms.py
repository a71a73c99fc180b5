"""Image preprocessing for training, evaluation and serving, on uint8 tensors; torch only.

:class:`Preprocessing` is the one description of how an image becomes model input (resize,
centre crop, mean and std), taken from the chosen weights' own transforms; training's
evaluation, the logged model and ``predict`` all use it. Decoding uses libjpeg-turbo
(``torchvision.io.decode_image``) straight into a uint8 tensor; the crop and flip run on uint8
too, and batches cross to the GPU as uint8 (4x fewer bytes than float32), to be converted and
normalized there by a :class:`Normalizer` whose constants live on the device. This module
imports nothing but torch and torchvision, so the GPU benchmark can use it on a bare machine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

Transform = Callable[[torch.Tensor], torch.Tensor]

# torchvision 0.29 marks its (libjpeg-turbo) decoders deprecated in favour of TorchCodec, which
# is not packaged for every platform we run on; they still work and are the fastest option here.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning
)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input: resize the shorter side to ``resize_size``, centre-crop
    ``crop_size``, scale to [0, 1], normalize with ``mean``/``std``.

    Usage: ``Preprocessing.from_preset(weights_preset, image_size=224).eval_transform()``.
    """

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_preset(cls, preset: dict[str, Any], image_size: int) -> Preprocessing:
        """The weights' preset (crop, resize, mean, std) scaled to train at ``image_size``:
        IMAGENET1K_V1 resizes to 256 for a 224 crop, V2 to 232."""
        ratio = float(preset["resize_size"]) / float(preset["crop_size"])
        return cls(
            crop_size=image_size,
            resize_size=round(image_size * ratio),
            mean=tuple(float(x) for x in preset["mean"]),
            std=tuple(float(x) for x in preset["std"]),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            crop_size=int(values["crop_size"]),
            resize_size=int(values["resize_size"]),
            mean=tuple(float(x) for x in values["mean"]),
            std=tuple(float(x) for x in values["std"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def eval_transform(self) -> Transform:
        """Resize then centre crop, on uint8 CHW tensors."""
        return cast(
            Transform,
            v2.Compose(
                [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.crop_size)]
            ),
        )

    def train_transform(self) -> Transform:
        return train_transform(self.crop_size)

    def normalizer(self, device: torch.device, *, channels_last: bool) -> Normalizer:
        return Normalizer(self.mean, self.std, device, channels_last=channels_last)


class Normalizer:
    """uint8 NCHW batch -> normalized float32 on the device; constants built once."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        *,
        channels_last: bool,
    ) -> None:
        self.device = device
        self.channels_last = channels_last
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(
            1, -1, 1, 1
        )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).float().mul_(self.scale).sub_(self.shift)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def train_transform(size: int) -> Transform:
    """Random resized crop and horizontal flip, on uint8 CHW tensors."""
    return cast(
        Transform,
        v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]),
    )


def to_model_input(
    batch: torch.Tensor,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels_last: bool,
) -> torch.Tensor:
    """uint8 NCHW batch -> normalized float32 on ``device`` (one-off use; a training loop keeps
    a :class:`Normalizer` so the constants are not rebuilt every step)."""
    return Normalizer(mean, std, device, channels_last=channels_last)(batch)


def decode(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 RGB CHW tensor."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return cast(torch.Tensor, decode_image(raw, mode=ImageReadMode.RGB))
