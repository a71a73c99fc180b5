"""Image verification and normalization: bytes in, a small RGB JPEG out, or a clear refusal.

The format comes from the bytes (magic numbers), never from the Content-Type. Dimensions are read
from the header and checked against ``max_pixels`` before any pixel is decoded, so a
decompression bomb costs nothing. A truncated or corrupt file fails the full decode.

Usage: ``normalize_image(data, ImageConfig())`` returns a :class:`NormalizedImage` or raises
:class:`ImageRejected` with status ``not_image``, ``too_many_pixels`` or ``undecodable``.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit before decoding, with a clear status

FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


@dataclass(frozen=True)
class ImageConfig:
    #: Shorter side of the stored image is at most this (0 keeps the original size).
    max_side: int = 256
    #: Refuse images with more pixels than this before decoding (decompression bombs).
    max_pixels: int = 40_000_000
    jpeg_quality: int = 90


class ImageRejected(Exception):  # noqa: N818 - a manifest status, like FetchError's
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NormalizedImage:
    data: bytes
    sha256: str
    width: int
    height: int
    source_format: str
    source_width: int
    source_height: int


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    shorter = min(width, height)
    if max_side <= 0 or shorter <= max_side:
        return width, height
    scale = max_side / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


def normalize_image(data: bytes, config: ImageConfig) -> NormalizedImage:
    """Verify ``data`` is a supported, intact, reasonably sized image; re-encode it as RGB JPEG."""
    fmt = sniff_format(data)
    if fmt is None:
        head = data[:16].decode("latin-1").encode("unicode_escape").decode()
        raise ImageRejected("not_image", f"not a JPEG, PNG, WebP or GIF (starts with {head!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = Image.open(io.BytesIO(data), formats=[fmt])
    except Exception as exc:
        raise ImageRejected("undecodable", f"{fmt} header unreadable: {exc}") from None
    width, height = opened.size
    if width < 1 or height < 1 or width * height > config.max_pixels:
        raise ImageRejected(
            "too_many_pixels", f"{width}x{height} exceeds the limit of {config.max_pixels} pixels"
        )
    target = _target_size(width, height, config.max_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "JPEG":
                # Decode at a reduced DCT scale when that still covers the target: far cheaper.
                opened.draft("RGB", target)
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image = _to_rgb(image)
            if image.size != _target_size(*image.size, config.max_side):
                image = image.resize(
                    _target_size(*image.size, config.max_side),
                    Image.Resampling.BILINEAR,
                    reducing_gap=2.0,
                )
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=config.jpeg_quality)
    except Exception as exc:
        raise ImageRejected("undecodable", f"{fmt} could not be decoded: {exc}") from None
    encoded = out.getvalue()
    return NormalizedImage(
        data=encoded,
        sha256=hashlib.sha256(encoded).hexdigest(),
        width=image.width,
        height=image.height,
        source_format=fmt,
        source_width=width,
        source_height=height,
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (not the black that a plain convert gives)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
