from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

import ml.imaging
from benchmarks.resize_quality import FACTORS, lanczos_psnr, pillow_bilinear, psnr, sample_jpegs
from devkit.imageserver import (
    encode,
    memory_png,
    png_bomb,
    realistic_pool,
    render_image,
    scan_bomb,
    with_own_pixels,
)
from ml.imaging import (
    DecodeBudget,
    ImageConfig,
    ImageRejected,
    Scratch,
    array_cost,
    count_jpeg_scans,
    normalize_image,
    resize_pixels,
    sniff_format,
)
from tests.conftest import REPO


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


@pytest.mark.parametrize("orientation", [1, 6, 8, 3])
def test_exif_orientation_is_applied(orientation: int) -> None:
    """A phone photo stored sideways with an orientation tag is stored upright (6 and 8 turn
    it a quarter, 3 half; 1 leaves it as it is)."""
    picture = Image.new("RGB", (80, 40), (255, 255, 255))
    picture.paste((200, 0, 0), (0, 0, 20, 40))  # red on the left edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    stored = normalize_image(out.getvalue(), ImageConfig())
    upright = Image.open(io.BytesIO(stored.data)).convert("RGB")
    assert upright.size == ((40, 80) if orientation in (6, 8) else (80, 40))
    red = {1: (5, 20), 6: (20, 5), 8: (20, 75), 3: (75, 20)}[orientation]
    assert upright.getpixel(red)[0] > 150 and upright.getpixel(red)[1] < 80


# ------------------------------------------------ JPEGs: the array route and the Pillow route


def _spy_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each array-route decode from now on: "ok", or the libjpeg warning that refused it."""
    calls: list[str] = []
    decode = simplejpeg.decode_jpeg

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        try:
            pixels = decode(*args, **kwargs)  # type: ignore[arg-type]
        except ValueError as exc:
            calls.append(str(exc))
            raise
        calls.append("ok")
        return pixels

    monkeypatch.setattr(ml.imaging.simplejpeg, "decode_jpeg", spy)
    return calls


def _by_pillow(data: bytes, config: ImageConfig) -> ml.imaging.NormalizedImage:
    """``normalize_image`` with the array route turned off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ml.imaging, "_ARRAY_MODES", ())
        return normalize_image(data, config)


def _drafted(data: bytes, max_side: int) -> Image.Image:
    """``data`` opened and drafted as ``normalize_image`` does: a JPEG at its decode scale."""
    opened = Image.open(io.BytesIO(data))
    opened.draft("RGB", ml.imaging._target_size(*opened.size, max_side))
    return opened


def _pixels(result: ml.imaging.NormalizedImage) -> np.ndarray:
    return np.asarray(_open(result.data))


@pytest.mark.parametrize(
    ("mode", "size", "max_side"),
    [
        ("RGB", (500, 375), 256),  # the benchmark's pictures: resized by 1.47
        ("RGB", (1400, 1000), 256),  # decoded at half scale, then resized by 1.95
        ("RGB", (290, 270), 256),  # resized by 1.05
        ("L", (640, 480), 256),  # grey: stored as RGB
        ("RGB", (500, 375), 0),  # the original size kept
        ("RGB", (90, 60), 256),  # smaller than the target
    ],
)
def test_colour_and_grey_jpegs_take_the_array_route_to_the_pillow_routes_picture(
    monkeypatch: pytest.MonkeyPatch, mode: str, size: tuple[int, int], max_side: int
) -> None:
    data = encode(render_image("route", width=size[0], height=size[1]).convert(mode))
    calls = _spy_decodes(monkeypatch)
    config = ImageConfig(max_side=max_side)
    arrays, pillow = normalize_image(data, config), _by_pillow(data, config)
    assert calls == ["ok"]  # one decode, by the array route; none by the Pillow route
    assert (arrays.width, arrays.height) == (pillow.width, pillow.height)
    assert _open(arrays.data).mode == "RGB" and arrays.phash
    # Two resize kernels on a noisy picture: 35-48 dB apart. A wrong turn, wrong colours or
    # a shifted picture would be under 20 dB.
    assert psnr(_pixels(arrays), _pixels(pillow)) > 32


@pytest.mark.parametrize(
    ("size", "max_side", "scale"),
    [((500, 375), 256, 1), ((1100, 801), 256, 2), ((4097, 3001), 100, 8)],
)
def test_the_array_route_decodes_the_same_pixels_as_pillow_at_the_draft_scale(
    size: tuple[int, int], max_side: int, scale: int
) -> None:
    """Full, half and eighth scale: libjpeg-turbo through simplejpeg and through Pillow."""
    data = encode(render_image("scale", width=size[0], height=size[1]))
    opened = _drafted(data, max_side)
    width, height = opened.size
    assert width == -(-size[0] // scale)  # the draft's scale, rounded up as libjpeg does
    pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=width, min_height=height)
    opened.load()
    assert np.array_equal(pixels, np.asarray(opened))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_turns_the_picture_as_the_pillow_route_does(
    monkeypatch: pytest.MonkeyPatch, orientation: int
) -> None:
    picture = render_image("turned", width=300, height=150)
    picture.paste((255, 0, 0), (0, 0, 60, 40))  # a corner that any wrong turn moves
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    calls = _spy_decodes(monkeypatch)
    config = ImageConfig(max_side=100)
    arrays, pillow = normalize_image(out.getvalue(), config), _by_pillow(out.getvalue(), config)
    assert calls == ["ok"]
    assert (arrays.width, arrays.height) == (pillow.width, pillow.height)
    assert (arrays.width > arrays.height) == (orientation < 5)
    assert psnr(_pixels(arrays), _pixels(pillow)) > 30


def test_a_jpeg_that_libjpeg_warns_about_gets_the_pillow_routes_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Corrupt scan data (libjpeg warns, and decodes) is stored, exactly as Pillow renders it;
    a truncated file is refused with Pillow's reason. The array route tried both first."""
    data = encode(render_image("warned", width=400, height=300))
    scan = data.index(b"\xff\xda")
    corrupt = data[: scan + 600] + bytes(50) + data[scan + 650 :]
    calls = _spy_decodes(monkeypatch)
    stored = normalize_image(corrupt, ImageConfig())
    assert calls and calls[0].startswith("Corrupt JPEG data")
    assert stored.sha256 == _by_pillow(corrupt, ImageConfig()).sha256
    calls.clear()
    with pytest.raises(ImageRejected) as info:
        normalize_image(data[: len(data) // 2], ImageConfig())
    assert calls == ["Premature end of JPEG file"]
    assert info.value.status == "undecodable" and "truncated" in str(info.value)


def test_a_cmyk_jpeg_takes_the_pillow_route(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.BytesIO()
    render_image("cmyk", width=300, height=200).convert("CMYK").save(out, format="JPEG")
    calls = _spy_decodes(monkeypatch)
    stored = normalize_image(out.getvalue(), ImageConfig(max_side=100))
    assert calls == [] and _open(stored.data).mode == "RGB" and stored.height == 100


def test_the_array_resize_is_as_sharp_as_pillows_at_every_factor() -> None:
    """Against a Lanczos resize of the same pixels, the array route's resize is no further
    than Pillow's bilinear one (median PSNR, 0.5 dB allowed), from a factor of 1.05 to 4."""
    images = [simplejpeg.decode_jpeg(data) for data in sample_jpegs(8)]
    for factor in FACTORS:
        ours, pillows = (lanczos_psnr(r, images, factor) for r in (resize_pixels, pillow_bilinear))
        assert ours > pillows - 0.5, (factor, ours, pillows)


@pytest.mark.parametrize(
    ("size", "max_side"),
    [
        ((500, 375), 256),
        ((290, 270), 256),
        ((1400, 1000), 256),
        ((4000, 3000), 100),
        ((500, 375), 0),
    ],
)
def test_the_array_route_holds_no_more_than_it_reserves(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], max_side: int
) -> None:
    """Its arrays (numpy's allocations, which tracemalloc sees; the scratch arrays made anew)
    at their peak fit in ``array_cost`` less the Pillow image it ends with (16 KiB allowed for
    Python's objects), at each resize step it can take."""
    import queue
    import tracemalloc

    monkeypatch.setattr(Scratch, "_free", queue.Queue(Scratch.SETS))
    data = encode(render_image("held", width=size[0], height=size[1]))
    opened = _drafted(data, max_side)
    target = ml.imaging._target_size(*opened.size, max_side)
    tracemalloc.start()
    try:
        image = ml.imaging._render_array(opened, max_side, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image is not None and image.size == target
    arrays = array_cost(opened.size, target) - 4 * target[0] * target[1]
    assert arrays // 2 < peak <= arrays + 16 * 1024


@pytest.mark.parametrize("max_side", [256, 0])  # resized; kept at its size (the decode's array)
def test_scratch_arrays_are_reused_and_never_shared(max_side: int) -> None:
    """A picture of the array route stays as it was made while the next image reuses the
    arrays; two threads at work hold two sets; an array over ``KEEP`` bytes is not kept."""
    first, second = (encode(render_image(key, width=500, height=375)) for key in "ab")
    pictures, snapshot = [], None
    for data in (first, second):
        opened = _drafted(data, max_side)
        picture = ml.imaging._render_array(opened, max_side, data)
        assert picture is not None
        pictures.append(picture)
        snapshot = np.asarray(picture) if snapshot is None else snapshot  # a copy
    assert np.array_equal(np.asarray(pictures[0]), snapshot)
    assert not np.array_equal(np.asarray(pictures[1]), snapshot)
    with contextlib.ExitStack() as stack:  # more threads at work than sets are kept
        taken = [stack.enter_context(Scratch.taken()) for _ in range(Scratch.SETS + 2)]
    assert len(set(map(id, taken))) == Scratch.SETS + 2 and Scratch._free.qsize() == Scratch.SETS
    with Scratch.taken() as one, Scratch.taken() as two:
        assert one is not two
        kept = one.array("x", (100, 100, 3))
        assert np.shares_memory(kept, one.array("x", (50, 50, 3)))
        assert not np.shares_memory(kept, two.array("x", (100, 100, 3)))
        big = (Scratch.KEEP // 3 + 1, 1, 3)
        assert not np.shares_memory(one.array("y", big), one.array("y", big))


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


def test_the_benchmark_image_server_gives_each_url_an_image_of_its_own() -> None:
    """The download benchmark's pool: one picture, many URLs; each URL must store a new object
    (as img2dataset writes one file per URL), not a conditional PUT refused as a duplicate."""
    (picture,) = realistic_pool(1)
    keys = [f"/round1/{i}.jpg" for i in range(40)]
    served = [with_own_pixels(picture, key) for key in keys]
    assert with_own_pixels(picture, keys[0]) == served[0]  # the same URL, the same answer
    stored = {normalize_image(data, ImageConfig()).sha256 for data in served}
    assert len(stored) == len(keys)
    assert {len(data) for data in served} == {len(picture)}  # same size, same decoding work


def test_not_image_message_quotes_none_of_the_bytes() -> None:
    with pytest.raises(ImageRejected) as info:
        normalize_image(b"SECRET-CONTENT-FROM-AN-INTERNAL-PAGE", ImageConfig())
    assert "SECRET" not in str(info.value)


def test_scans_are_counted_without_decoding() -> None:
    baseline = encode(render_image("scan", width=64, height=64))
    out = io.BytesIO()
    render_image("scan", width=64, height=64).save(out, "JPEG", progressive=True)
    assert count_jpeg_scans(baseline) == 1
    assert 2 <= count_jpeg_scans(out.getvalue()) <= 12
    bomb = scan_bomb(repeats=3000, side=512)
    started = time.process_time()
    assert count_jpeg_scans(bomb) > 3000
    assert count_jpeg_scans(bomb, stop_after=100) == 101
    assert time.process_time() - started < 0.5


def test_repeated_scan_cpu_bomb_is_refused_before_decoding() -> None:
    bomb = scan_bomb(repeats=20000, side=4000)
    assert len(bomb) < 1024 * 1024  # small enough to pass the byte cap
    started = time.process_time()
    with pytest.raises(ImageRejected) as info:
        normalize_image(bomb, ImageConfig())
    assert info.value.status == "too_complex" and "scans" in str(info.value)
    assert time.process_time() - started < 0.5  # decoding it would take minutes


def test_an_image_that_alone_exceeds_the_decode_budget_is_refused() -> None:
    data = memory_png(3000)  # 9 Mpx RGBA: about 100 MB with working copies
    with pytest.raises(ImageRejected) as info:
        normalize_image(data, ImageConfig(), DecodeBudget(50 * 1024 * 1024))
    assert info.value.status == "too_many_pixels" and "decode budget" in str(info.value)
    assert normalize_image(data, ImageConfig(), DecodeBudget(200 * 1024 * 1024)).width == 256


def test_concurrent_decodes_share_one_budget() -> None:
    """Eight threads, images of ~100 MB each, a 250 MB budget: at most two decode at once."""
    from concurrent.futures import ThreadPoolExecutor

    data = memory_png(3000)
    budget = DecodeBudget(250 * 1024 * 1024)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: normalize_image(data, ImageConfig(), budget), range(8)))
    assert all(r.width == 256 for r in results)
    assert 0 < budget.peak <= budget.limit and budget.in_use == 0


def test_no_more_threads_decode_at_once_than_there_are_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A download's dozens of threads fetch at once, but decode a CPU's worth at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import ml.imaging
    from ml.cpus import available_cpus

    render, lock = ml.imaging._render, threading.Lock()
    active, peak = [0], [0]

    def slow_render(opened: Image.Image, max_side: int, jpeg: bytes | None = None) -> Image.Image:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)  # long enough for every thread to arrive while the first ones work
        try:
            return render(opened, max_side, jpeg)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ml.imaging, "_render", slow_render)
    data = encode(render_image("gate", width=320, height=240), "jpeg")
    threads = available_cpus() + 4
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda _: normalize_image(data, ImageConfig()), range(threads)))
    assert {r.sha256 for r in results} == {results[0].sha256}
    assert peak[0] == available_cpus() and active[0] == 0


@pytest.mark.slow
def test_decode_memory_stays_within_the_budget_across_threads(tmp_path: Path) -> None:
    """Eight threads each given a 170 KB PNG of 40 Mpx (about 440 MB to decode alone): with the
    default 512 MiB budget the process peaks far below the 3.5 GB they would take at once."""
    script = tmp_path / "decode.py"
    script.write_text(
        "import resource, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from devkit.imageserver import memory_png\n"
        "from ml.imaging import ImageConfig, normalize_image\n"
        "data = memory_png(6300)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    done = list(pool.map(lambda _: normalize_image(data, ImageConfig()), range(8)))\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(len(done), base // 1024, peak // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    count, base_mb, peak_mb = (int(v) for v in out.stdout.split())
    assert count == 8
    assert peak_mb - base_mb < 512, (base_mb, peak_mb)


def test_available_cpus_honours_the_cgroup_quota(tmp_path: Path) -> None:
    from ml.cpus import available_cpus

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # docker run --cpus 1.5
    assert available_cpus(quota) == min(affinity, 2)
    quota.write_text("50000 100000\n")
    assert available_cpus(quota) == 1
    for unlimited in ("max 100000\n", "junk\n", ""):
        quota.write_text(unlimited)
        assert available_cpus(quota) == affinity
    assert available_cpus(tmp_path / "absent") == affinity
