"""The JPEG array route against the Pillow route: resize sharpness and CPU, image by image.

For each resize factor, on the download benchmark's 500x375 JPEGs: the CPU of one resize on
one thread, and its median PSNR against a Lanczos resize of the same pixels (the sharpest of
the usual filters; higher is closer), for Pillow's antialiased bilinear resize (the Pillow
route) and ``ml.imaging.resize_pixels`` (the array route). Then the CPU of the whole
``normalize_image`` per image (checks, decode, resize, encode, perceptual hash, SHA-256) by
either route, on one thread.

Usage::

    .venv/bin/python -m benchmarks.resize_quality              # 64 images
    .venv/bin/python -m benchmarks.resize_quality --images 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image

import ml.imaging
from devkit.imageserver import realistic_pool, with_own_pixels
from ml.imaging import ImageConfig, normalize_image, resize_pixels

FACTORS = (1.05, 1.1, 1.2, 1.3, 1.466, 1.75, 1.95, 2.6, 4.0)
Resize = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


def pillow_resize(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The Pillow route's resize (``ml.imaging._render``)."""
    return picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def pillow_bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`pillow_resize` of an array."""
    return np.asarray(pillow_resize(Image.fromarray(pixels), size))


def lanczos(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


def target(pixels: np.ndarray, factor: float) -> tuple[int, int]:
    height, width = pixels.shape[:2]
    return max(1, round(width / factor)), max(1, round(height / factor))


def lanczos_psnr(resize: Resize, images: list[np.ndarray], factor: float) -> float:
    """Median PSNR (dB) of ``resize`` against a Lanczos resize, over ``images``."""
    scores = []
    for pixels in images:
        size = target(pixels, factor)
        scores.append(psnr(resize(pixels, size), lanczos(pixels, size)))
    return statistics.median(scores)


def cpu_ms(work: Callable[[], object], count: int, repeats: int = 5) -> float:
    """The fastest of ``repeats`` runs of ``work``, in CPU ms per item (thread clock)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        work()
        best = min(best, time.thread_time() - started)
    return 1000 * best / count


def sample_jpegs(count: int) -> list[bytes]:
    """The download benchmark's JPEGs: each with pixels of its own."""
    pool = realistic_pool(min(count, 32))
    return [with_own_pixels(pool[i % len(pool)], f"quality-{i}") for i in range(count)]


def route_cpu(jpegs: list[bytes], arrays: bool) -> float:
    """CPU ms per image of ``normalize_image`` by the array route or by the Pillow route."""
    modes = ml.imaging._ARRAY_MODES
    ml.imaging._ARRAY_MODES = modes if arrays else ()
    try:
        config = ImageConfig()
        return cpu_ms(lambda: [normalize_image(d, config) for d in jpegs], len(jpegs))
    finally:
        ml.imaging._ARRAY_MODES = modes


def resize_cpu(
    pictures: list[Image.Image], images: list[np.ndarray], sizes: list[tuple[int, int]]
) -> tuple[float, float]:
    """CPU ms per image of the Pillow route's resize (of ``pictures``) and of the array
    route's (of the same pixels as arrays) to ``sizes``."""
    pillow = cpu_ms(
        lambda: [pillow_resize(p, s) for p, s in zip(pictures, sizes, strict=True)], len(pictures)
    )
    arrays = cpu_ms(
        lambda: [resize_pixels(p, s) for p, s in zip(images, sizes, strict=True)], len(images)
    )
    return pillow, arrays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    jpegs = sample_jpegs(args.images)
    images = [simplejpeg.decode_jpeg(d) for d in jpegs]
    height, width = images[0].shape[:2]
    print(f"{len(images)} JPEGs of {width}x{height}, one thread\n")
    print("| factor | Pillow bilinear: ms, dB | array route: ms, dB | array vs Pillow dB |")
    print("|---|---|---|---|")
    pictures = [Image.fromarray(p) for p in images]  # the Pillow route resizes Pillow images
    for factor in FACTORS:
        sizes = [target(p, factor) for p in images]
        pillow_ms, array_ms = resize_cpu(pictures, images, sizes)
        rows = [
            f"{ms:.2f}, {lanczos_psnr(resize, images, factor):.2f}"
            for ms, resize in ((pillow_ms, pillow_bilinear), (array_ms, resize_pixels))
        ]
        agreement = statistics.median(
            psnr(pillow_bilinear(p, s), resize_pixels(p, s))
            for p, s in zip(images, sizes, strict=True)
        )
        print(f"| {factor:g} | {rows[0]} | {rows[1]} | {agreement:.1f} |")
    pillow, arrays = route_cpu(jpegs, arrays=False), route_cpu(jpegs, arrays=True)
    print(
        f"\nnormalize_image, CPU ms per image: Pillow route {pillow:.2f}, array route {arrays:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
