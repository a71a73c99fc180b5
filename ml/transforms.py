"""Image transforms for training and evaluation, on uint8 tensors; torch and torchvision only.

Decoding uses libjpeg-turbo (``torchvision.io.decode_image``) straight into a uint8 tensor; the
crop and flip run on uint8 too, and batches cross to the GPU as uint8 (4x fewer bytes than
float32), to be converted and normalized there by :func:`to_model_input`. This module imports
nothing but torch and torchvision, so the GPU benchmark can use it on a bare machine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
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


def train_transform(size: int) -> Transform:
    """Random resized crop and horizontal flip, on uint8 CHW tensors."""
    return cast(
        Transform,
        v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]),
    )


def eval_transform(size: int, preset: dict[str, Any]) -> Transform:
    """The weights' own evaluation preprocessing (resize then centre crop), scaled to ``size``."""
    resize = round(size * preset["resize_size"] / preset["crop_size"])
    return cast(Transform, v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)]))


def to_model_input(
    batch: torch.Tensor,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 NCHW batch -> normalized float32 on ``device`` (channels_last when asked)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def decode(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 RGB CHW tensor."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return cast(torch.Tensor, decode_image(raw, mode=ImageReadMode.RGB))
