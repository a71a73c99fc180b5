"""Image verification and normalization: bytes in, a small RGB JPEG out, or a clear refusal.

The format comes from the bytes (magic numbers), never from the Content-Type. Before any pixel
is decoded:

- the header's dimensions are checked against ``max_pixels`` (a decompression bomb costs nothing);
- a JPEG's scans are counted (``max_scans``): a progressive JPEG whose scan is repeated thousands
  of times decodes the whole image once per scan, a CPU bomb in a few kilobytes;
- the memory the decode will take (pixels after JPEG draft scaling, times the decoder's bytes per
  pixel, times the working copies of conversion) is reserved from one :class:`DecodeBudget` shared
  by every thread of the process, so many large images decoding at once wait for each other
  instead of exhausting the worker. An image that alone needs more than the budget is refused.

A truncated file fails the full decode. Large images are scaled down right after
decoding, before colour conversion, so no full-size working copies pile up.

Colour and grey JPEGs take a faster route to an equally sharp picture: libjpeg-turbo decodes
them through simplejpeg into one array (the same pixels Pillow's decoder gives, at about two
thirds of its CPU) and OpenCV's vectorised kernels resize them. Any JPEG that libjpeg decodes
with a warning (truncated, corrupt data) goes the Pillow route instead, whose verdict it gets.
``benchmarks/resize_quality.py`` compares the two resizes.

Usage: ``normalize_image(data, ImageConfig())`` returns a :class:`NormalizedImage` or raises
:class:`ImageRejected` with status ``not_image``, ``too_many_pixels``, ``too_complex`` or
``undecodable``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import queue
import re
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from ml.cpus import cpu_gate
from ml.dedup import perceptual_hash
from ml.heap import return_large_buffers_to_the_os
from ml.params import PARAMETERS
from ml.statuses import Rejected, Status

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit before decoding, with a clear status
# One image is one thread's work: the download runs many at once (ml.cpus gates them), so
# OpenCV's own thread pool would only oversubscribe the cores.
cv2.setNumThreads(1)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MiB = 1024 * 1024
#: Bytes per pixel the decoder holds, by Pillow mode (anything else counts 8).
_MODE_BYTES = {
    "1": 1,
    "L": 1,
    "P": 1,
    "LA": 2,
    "La": 2,
    "PA": 2,
    "I;16": 2,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "RGBA": 4,
    "RGBa": 4,
    "RGBX": 4,
    "CMYK": 4,
    "I": 4,
    "F": 4,
}
#: Working copies next to the decoded pixels: colour conversion (RGBA, then RGB) before scaling.
_WORKING_BYTES_PER_PIXEL = 4 + 3
#: JPEG modes (after the draft) that the array route decodes; CMYK goes through Pillow.
_ARRAY_MODES = ("RGB", "L")


@dataclass(frozen=True)
class ImageConfig:
    #: Shorter side of the stored image is at most this (0 keeps the original size).
    max_side: int = PARAMETERS["max_side"].field()
    #: Refuse images with more pixels than this before decoding (decompression bombs).
    max_pixels: int = PARAMETERS["max_pixels"].field()
    #: Refuse JPEGs with more scans than this before decoding (CPU bombs); 10 is typical.
    max_scans: int = 100
    #: Decode memory shared by all threads of the process (bytes); one image may use it all.
    decode_budget: int = 512 * MiB
    jpeg_quality: int = 90


class ImageRejected(Rejected):
    """Bytes that are not a usable image; ``status`` is its manifest status."""


class DecodeBudget:
    """Bytes of decode memory shared by threads; ``reserve(n)`` waits until ``n`` are free.

    Usage: ``with budget.reserve(estimate): image.load()``. Requests larger than the whole
    budget are the caller's to refuse (see :func:`normalize_image`).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._free = threading.Condition()

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        size = min(max(size, 0), self.limit)
        with self._free:
            self._free.wait_for(lambda: self.in_use + size <= self.limit)
            self.in_use += size
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._free:
                self.in_use -= size
                self._free.notify_all()


return_large_buffers_to_the_os()
_BUDGETS: dict[int, DecodeBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def shared_budget(limit: int) -> DecodeBudget:
    """The process-wide budget of ``limit`` bytes (one per distinct limit)."""
    with _BUDGETS_LOCK:
        return _BUDGETS.setdefault(limit, DecodeBudget(limit))


_JPEG_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """The number of scans (SOS segments) in a JPEG, read from its markers without decoding.

    Entropy-coded data is skipped with one C-level search per scan, so counting costs
    microseconds even for a file of many thousands of scans. Stops early past ``stop_after``.
    """
    scans, pos, size = 0, 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:  # stray bytes between segments: find the next marker
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
            continue
        code = data[pos + 1]
        if code == 0xFF:  # fill byte
            pos += 1
            continue
        if code == 0xD9:  # end of image
            break
        if 0xD0 <= code <= 0xD7 or code == 0x01:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
        if code == 0xDA:
            scans += 1
            if stop_after is not None and scans > stop_after:
                break
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return scans


@dataclass(frozen=True)
class NormalizedImage:
    data: bytes
    sha256: str
    width: int
    height: int
    source_format: str
    source_width: int
    source_height: int
    #: 64-bit perceptual hash (hex) of the stored pixels, for near-duplicate grouping.
    phash: str = ""


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


def normalize_image(
    data: bytes, config: ImageConfig, budget: DecodeBudget | None = None
) -> NormalizedImage:
    """Verify ``data`` is a supported, intact, reasonably sized image; re-encode it as RGB JPEG.

    ``budget`` defaults to the process-wide budget of ``config.decode_budget`` bytes.
    """
    fmt, opened = _open_checked(data, config)
    width, height = opened.size
    if fmt == "JPEG":
        # Decode at a reduced DCT scale when that still covers the target: far cheaper.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened.draft("RGB", _target_size(width, height, config.max_side))
    budget = budget or shared_budget(config.decode_budget)
    arrays = fmt == "JPEG" and opened.mode in _ARRAY_MODES
    need = decode_cost(opened)
    if arrays:
        need = max(need, array_cost(opened.size, _target_size(*opened.size, config.max_side)))
    if need > budget.limit:
        raise ImageRejected(
            Status.TOO_MANY_PIXELS,
            f"{width}x{height} {opened.mode} needs about {need // MiB} MiB to decode, more than "
            f"the {budget.limit // MiB} MiB decode budget",
        )
    try:
        # CPU work, a few threads at a time (ml.cpus); the memory reserved only once it starts.
        with cpu_gate(), budget.reserve(need):
            image = _render(opened, config.max_side, data if arrays else None)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=config.jpeg_quality)
            phash = perceptual_hash(image)
    except Exception as exc:
        raise ImageRejected(Status.UNDECODABLE, f"{fmt} could not be decoded: {exc}") from None
    encoded = out.getvalue()
    return NormalizedImage(
        data=encoded,
        sha256=hashlib.sha256(encoded).hexdigest(),
        width=image.width,
        height=image.height,
        source_format=fmt,
        source_width=width,
        source_height=height,
        phash=phash,
    )


def _open_checked(data: bytes, config: ImageConfig) -> tuple[str, Image.Image]:
    """The format (from the bytes) and the opened header, after the checks that cost nothing:
    magic numbers, JPEG scan count, declared pixels."""
    if not data:
        raise ImageRejected(Status.EMPTY, "empty: 0 bytes where an image was expected")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(
            Status.NOT_IMAGE, "not a JPEG, PNG, WebP or GIF (judged by its first bytes)"
        )
    if fmt == "JPEG" and count_jpeg_scans(data, stop_after=config.max_scans) > config.max_scans:
        raise ImageRejected(
            Status.TOO_COMPLEX,
            f"JPEG with more than {config.max_scans} scans (each scan decodes the whole image "
            "again)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = Image.open(io.BytesIO(data), formats=[fmt])
    except Exception as exc:
        raise ImageRejected(Status.UNDECODABLE, f"{fmt} header unreadable: {exc}") from None
    width, height = opened.size
    if width < 1 or height < 1 or width * height > config.max_pixels:
        raise ImageRejected(
            Status.TOO_MANY_PIXELS,
            f"{width}x{height} exceeds the limit of {config.max_pixels} pixels",
        )
    return fmt, opened


def decode_cost(opened: Image.Image) -> int:
    """Bytes a decode of ``opened`` holds at its peak: the decoded pixels (after any JPEG draft
    scaling) and the working copies of colour conversion."""
    width, height = opened.size
    return width * height * (_MODE_BYTES.get(opened.mode, 8) + _WORKING_BYTES_PER_PIXEL)


def array_cost(size: tuple[int, int], target: tuple[int, int]) -> int:
    """Bytes the array route holds at its peak for a JPEG decoded at ``size`` and stored at
    ``target``: the RGB array, the resize's double-size step (when it takes one), the result,
    and the result as a Pillow image (4 bytes a pixel)."""
    decoded, stored = size[0] * size[1], target[0] * target[1]
    factor = _factor(size, target)
    steps = (4 * 3 if _DOUBLE_FROM <= factor < _AREA_FROM else 0) + (3 if factor > 1 else 0)
    return decoded * 3 + stored * (steps + 4)


def _render(opened: Image.Image, max_side: int, jpeg: bytes | None = None) -> Image.Image:
    """Decode, scale down early, apply EXIF orientation, make RGB, resize to the target.

    ``jpeg``: the bytes of ``opened`` (an RGB or grey JPEG) for the array route."""
    if jpeg is not None:
        image = _render_array(opened, max_side, jpeg)
        if image is not None:
            return image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opened.load()
        image = _shrink(opened, max_side)
        ImageOps.exif_transpose(image, in_place=True)  # a copy per image otherwise
        image = _to_rgb(image)
        target = _target_size(*image.size, max_side)
        if image.size != target:
            image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return image


def _render_array(opened: Image.Image, max_side: int, jpeg: bytes) -> Image.Image | None:
    """The JPEG decoded by libjpeg-turbo at ``opened``'s draft scale, resized by OpenCV, turned
    upright; None when libjpeg warns (the caller's Pillow route then gives the verdict)."""
    width, height = opened.size  # after the draft: the DCT scale libjpeg decodes at
    with Scratch.taken() as scratch:
        decoded = scratch.array("decoded", (height, width, 3))
        try:
            pixels = simplejpeg.decode_jpeg(
                jpeg, "RGB", min_width=width, min_height=height, buffer=decoded, strict=True
            )
        except ValueError:  # truncated or corrupt: Pillow decides (it accepts some of these)
            return None
        if pixels.shape[:2] != (height, width):
            return None
        pixels = resize_pixels(pixels, _target_size(width, height, max_side), scratch)
        image = Image.fromarray(pixels)  # a copy (Pillow holds RGB in 4 bytes a pixel)
    ImageOps.exif_transpose(_with_exif(image, opened), in_place=True)
    return image


class Scratch:
    """Arrays reused from image to image for the array route's two large steps (the decoded
    pixels, the resize's double-size step), one set per thread at that work.

    A new array of half a megabyte or more comes from pages the kernel must map and zero
    (glibc gives them back on free): in the download benchmark, 0.6-0.9 ms of CPU an image.
    Only ``cpu_gate``'s threads decode at once (one per CPU), so only that many sets are made;
    at most ``SETS`` of them are kept, and in them an array only up to ``KEEP`` bytes (a larger
    one is made for its image and freed): at most 8 x 2 x 4 MiB held, outside the decode budget.

    Usage: ``with Scratch.taken() as scratch: out = scratch.array("name", shape)``.
    """

    KEEP = 4 * MiB
    SETS = 8
    _free: queue.Queue[Scratch] = queue.Queue(SETS)

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    @contextmanager
    def taken(cls) -> Iterator[Scratch]:
        """A set no other thread is using, given back afterwards."""
        try:
            scratch = cls._free.get_nowait()
        except queue.Empty:
            scratch = cls()
        try:
            yield scratch
        finally:
            with contextlib.suppress(queue.Full):  # more threads at work than sets kept
                cls._free.put_nowait(scratch)

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised uint8 array of ``shape``: the kept one named ``name`` (grown when too
        small), or a new one beyond ``KEEP`` bytes. Valid until the next call with ``name``."""
        size = math.prod(shape)
        if size > self.KEEP:
            return np.empty(shape, np.uint8)
        kept = self._arrays.get(name)
        if kept is None or kept.size < size:
            kept = self._arrays[name] = np.empty(size, np.uint8)
        return kept[:size].reshape(shape)


def resize_pixels(
    pixels: np.ndarray, size: tuple[int, int], scratch: Scratch | None = None
) -> np.ndarray:
    """``pixels`` (height x width x channels, uint8) scaled down to ``size`` (width, height);
    the double-size step in ``scratch`` when given.

    Below a factor of 1.25, a bilinear interpolation. From 1.25 to 2.5, a bilinear
    interpolation to twice the target, then an exact 2:1 area average: together an
    antialiasing filter as sharp as Pillow's bilinear resize. From 2.5 up (JPEGs beyond the
    1/8 draft), an area average. A quarter to four fifths of Pillow's CPU (under half below a
    factor of 2), and as close or closer to a Lanczos resize (``benchmarks/resize_quality.py``).
    """
    width, height = size
    factor = _factor((pixels.shape[1], pixels.shape[0]), size)
    if factor <= 1:
        return pixels
    if factor < _DOUBLE_FROM:
        return cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
    if factor >= _AREA_FROM:
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    shape = (2 * height, 2 * width, *pixels.shape[2:])
    double = scratch.array("double", shape) if scratch else np.empty(shape, np.uint8)
    cv2.resize(pixels, (2 * width, 2 * height), dst=double, interpolation=cv2.INTER_LINEAR)
    return cv2.resize(double, size, interpolation=cv2.INTER_AREA)


#: :func:`resize_pixels` goes through twice the target for factors from ``_DOUBLE_FROM`` up
#: to ``_AREA_FROM``, and averages areas from there up.
_DOUBLE_FROM, _AREA_FROM = 1.25, 2.5


def _factor(size: tuple[int, int], target: tuple[int, int]) -> float:
    """How many times smaller ``target`` is than ``size`` (both width, height)."""
    return min(size[0] / target[0], size[1] / target[1])


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """A cheap integer-factor reduction of a large decoded image, in its own mode, so that the
    colour conversion and the final resize work on a few times the target size, not the
    original. Orientation does not matter here: the factor depends on the shorter side."""
    shorter = min(image.size)
    if max_side <= 0 or shorter < 4 * max_side:
        return image
    factor = shorter // (2 * max_side)
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr"):
        return image  # palette and exotic modes: converted first, at full size (budgeted)
    reduced = image.reduce(factor)
    reduced.info.update(image.info)
    return _with_exif(reduced, image)


def _with_exif(image: Image.Image, source: Image.Image) -> Image.Image:
    """``image`` carrying ``source``'s EXIF, so that ``ImageOps.exif_transpose`` turns it as
    it would turn ``source``."""
    exif = source.getexif()
    if exif:
        image.info["exif"] = exif.tobytes()
    return image


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
