from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from ml.imageserver import encode, png_bomb, render_image
from ml.imaging import ImageConfig, ImageRejected, normalize_image, sniff_format


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "gif"])
def test_supported_formats_become_rgb_jpeg(fmt: str) -> None:
    data = encode(render_image("x", width=640, height=400), fmt)
    assert sniff_format(data) == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}[fmt]
    result = normalize_image(data, ImageConfig(max_side=100))
    stored = _open(result.data)
    assert stored.format == "JPEG" and stored.mode == "RGB"
    assert min(stored.size) == 100 and stored.size == (result.width, result.height)
    assert (result.source_width, result.source_height) == (640, 400)
    assert len(result.sha256) == 64


def test_small_images_keep_their_size() -> None:
    result = normalize_image(encode(render_image("y", width=90, height=60)), ImageConfig(256))
    assert (result.width, result.height) == (90, 60)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    out = io.BytesIO()
    rgba.save(out, format="PNG")
    stored = _open(normalize_image(out.getvalue(), ImageConfig()).data)
    r, g, b = stored.getpixel((10, 10))  # type: ignore[misc]
    assert min(r, g, b) > 240


def test_html_is_not_an_image() -> None:
    with pytest.raises(ImageRejected) as info:
        normalize_image(b"<!DOCTYPE html><html></html>", ImageConfig())
    assert info.value.status == "not_image"


def test_truncated_jpeg_is_undecodable() -> None:
    data = encode(render_image("z", width=300, height=300))
    with pytest.raises(ImageRejected) as info:
        normalize_image(data[: len(data) // 2], ImageConfig())
    assert info.value.status == "undecodable"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    started = time.process_time()
    with pytest.raises(ImageRejected) as info:
        normalize_image(png_bomb(60000, 60000), ImageConfig(max_pixels=40_000_000))
    assert info.value.status == "too_many_pixels"
    assert "60000x60000" in str(info.value)
    # Decoding 3.6 billion pixels would take minutes and 10 GB; refusing takes milliseconds.
    assert time.process_time() - started < 2.0


def test_output_is_deterministic() -> None:
    data = encode(render_image("same"))
    first, second = normalize_image(data, ImageConfig()), normalize_image(data, ImageConfig())
    assert first.sha256 == second.sha256
