"""A local HTTP server of generated images with injectable faults: the tests' and demo's Flickr.

Every path answers a deterministic, synthetic JPEG (seeded by the path, or by ``content=KEY`` so
several URLs can share one picture). Query parameters change the answer:

=========================  ===================================================================
``label=Positive``         draw that label's colour patch (learnable synthetic data)
``w=320&h=240``            image size; ``fmt=png|webp|gif|jpeg`` the format
``scale=0.5``              the same picture resized (a near duplicate of the original)
``crop=0.03``              the same picture with that fraction cut from every side
``quality=30``             JPEG/WebP quality (default 85)
``delay=0.5``              wait before answering (plus the server-wide ``latency``)
``fault=404``              answer 404
``fault=500&fail=2``       500 for the first 2 requests of this URL, then the image (no
                           ``fail``: always); ``fault=429&retry_after=1`` likewise, with
                           Retry-After
``fault=slow&interval=1``  trickle the body one byte per ``interval`` seconds
``fault=slow-headers``     trickle the status line and headers likewise (``interval``)
``fault=stall``            accept the request, then send nothing until the client leaves
``fault=truncated``        a JPEG cut short (HTTP-complete, image-incomplete)
``fault=html``             an HTML page sent as ``Content-Type: image/jpeg``
``fault=oversized``        ``size`` bytes (default 11 MiB); ``chunked=1`` omits Content-Length
``fault=huge``             a tiny PNG whose header claims 60000x60000 pixels
``fault=scans``            a progressive JPEG with thousands of repeated scans (CPU bomb)
``fault=redirect&hops=2``  redirect ``hops`` times, then the image
``fault=redirect-loop``    redirect to itself forever
``fault=redirect-blocked`` redirect to ``to`` (default the cloud metadata address)
``fault=reset``            close the connection without answering
=========================  ===================================================================

Usage::

    with ImageServer(latency=0.04) as server:
        url = server.url("/photos/1.jpg", label="Positive")

or ``python -m devkit imageserver --port 8000``. The images are synthetic; never real photos.
"""

from __future__ import annotations

import hashlib
import io
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np
from PIL import Image

from ml.labels import LABEL_INDEX, normalize_label

#: One colour per class, far apart so a small network can tell them apart.
LABEL_COLOURS = ((200, 30, 30), (230, 140, 20), (128, 128, 128), (40, 170, 60), (30, 80, 220))
METADATA_URL = "http://169.254.169.254/latest/meta-data/"


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def render_image(
    key: str, *, width: int = 320, height: int = 240, label: str | None = None, detail: float = 24.0
) -> Image.Image:
    """A deterministic synthetic picture; with ``label`` it carries that class's colour patch."""
    rng = np.random.default_rng(_seed(key))
    base = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))
    noise = rng.normal(0.0, detail, size=(height, width, 3))
    pixels = np.clip(smooth.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    if label is not None:
        colour = np.array(LABEL_COLOURS[LABEL_INDEX[label]], dtype=np.float64)
        # A tint over the whole picture survives any crop; the patch makes it plain to see.
        pixels = (0.5 * pixels + 0.5 * colour).astype(np.uint8)
        ph, pw = max(1, height // 2), max(1, width // 2)
        top = int(rng.integers(0, height - ph + 1))
        left = int(rng.integers(0, width - pw + 1))
        patch = colour + rng.normal(0.0, 10.0, size=(ph, pw, 3))
        pixels[top : top + ph, left : left + pw] = np.clip(patch, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def variant(image: Image.Image, query: dict[str, str]) -> Image.Image:
    """``image`` cropped by ``crop`` (fraction per side), then resized by ``scale``."""
    crop = float(query.get("crop", 0))
    if crop > 0:
        w, h = image.size
        dx, dy = round(w * crop), round(h * crop)
        image = image.crop((dx, dy, w - dx, h - dy))
    scale = float(query.get("scale", 1))
    if scale != 1:
        w, h = image.size
        image = image.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
        )
    return image


def encode(image: Image.Image, fmt: str = "jpeg", quality: int = 85) -> bytes:
    out = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "gif":
        image.convert("P").save(out, format="GIF")
    else:
        image.save(out, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), quality=quality)
    return out.getvalue()


def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares ``width x height``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + chunk(b"IEND", b"")
    )


def scan_bomb(repeats: int = 5000, side: int = 4000) -> bytes:
    """A small progressive JPEG whose smallest scan is repeated ``repeats`` times: every scan
    makes a decoder pass over the whole image again (a CPU bomb in a few hundred KB)."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 60, 200)).save(out, "JPEG", progressive=True)
    data = out.getvalue()
    scans = []
    pos = data.find(b"\xff\xda")
    while pos != -1:
        end = data.find(b"\xff", pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big"))
        while end != -1 and data[end + 1] in (0x00, *range(0xD0, 0xD8)):
            end = data.find(b"\xff", end + 2)
        scans.append(data[pos:end])
        pos = data.find(b"\xff\xda", end)
    smallest = min(scans, key=len)
    return data[:-2] + smallest * repeats + b"\xff\xd9"


def memory_png(side: int = 6300) -> bytes:
    """A PNG of about 170 KB that decodes to ``side``² RGBA pixels (160 MB at 6300)."""
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 200, 30, 128)).save(out, "PNG", optimize=True)
    return out.getvalue()


def with_own_pixels(jpeg: bytes, key: str) -> bytes:
    """The same JPEG with its first quantization table nudged by ``key``: each key decodes to
    pixels of its own (a level or two apart), so a downloader stores one new object per key,
    at the same decoding cost and without re-encoding. 40 low-frequency entries are each raised
    by one or not, as ``key``'s hash says."""
    bits = _seed(f"quantization:{key}")
    body = bytearray(jpeg)
    pos = 2
    while pos + 4 <= len(body) and body[pos] == 0xFF:
        code = body[pos + 1]
        (length,) = struct.unpack_from(">H", body, pos + 2)
        if code == 0xDA:  # image data begins: no table found
            break
        if code == 0xDB and body[pos + 4] >> 4 == 0:  # 8-bit entries, zigzag order
            table = pos + 5
            for j in range(1, 41):
                if bits >> j & 1:
                    body[table + j] = min(255, body[table + j] + 1)
            return bytes(body)
        pos += 2 + length
    raise ValueError("not a baseline JPEG with 8-bit quantization tables")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.server.enter(self.path)
        try:
            delay = self.server.latency + float(query.get("delay", 0))
            if delay > 0:
                time.sleep(delay)
            self._answer(parts.path, query)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.server.leave()

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "image/jpeg",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, path: str, query: dict[str, str]) -> bytes:
        key = query.get("content", path)
        if self.server.pool:
            pool = self.server.pool
            return with_own_pixels(pool[_seed(key) % len(pool)], key)
        label = normalize_label(query.get("label", ""))
        image = render_image(
            key + (label or ""),
            width=int(query.get("w", 320)),
            height=int(query.get("h", 240)),
            label=label,
        )
        return encode(
            variant(image, query), query.get("fmt", "jpeg"), int(query.get("quality", 85))
        )

    def _answer(self, path: str, query: dict[str, str]) -> None:
        fault = query.get("fault", "")
        failing = ("fail" not in query) or self.server.hits[self.path] <= int(query["fail"])
        transient = {"500", "503", "429"}
        handler = _FAULTS.get(fault)
        if handler is None or (fault in transient and not failing):
            self._image_answer(path, query)
        else:
            handler(self, path, query)

    def _image_answer(self, path: str, query: dict[str, str]) -> None:
        fmt = query.get("fmt", "jpeg").lower()
        content_type = "image/" + {"jpg": "jpeg"}.get(fmt, fmt)
        self._send(200, self._image(path, query), content_type)

    def _status(self, path: str, query: dict[str, str]) -> None:
        code = int(query["fault"])
        headers = {"Retry-After": query.get("retry_after", "1")} if code == 429 else None
        self._send(code, b"not here" if code < 500 else b"server error", "text/plain", headers)

    def _stall(self, path: str, query: dict[str, str]) -> None:
        self.close_connection = True
        while not self.server.stopping.wait(0.1):
            if self._client_gone():
                break

    def _redirect(self, path: str, query: dict[str, str]) -> None:
        hops = int(query.get("hops", 1)) - 1
        if hops < 0:
            self._image_answer(path, query)
            return
        rest = {k: v for k, v in query.items() if k != "hops"}
        if hops == 0:
            rest.pop("fault")
        target = path + "?" + urlencode({**rest, **({"hops": hops} if hops else {})})
        self._send(302, b"", "text/plain", {"Location": target})

    def _reset(self, path: str, query: dict[str, str]) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _trickle(self, body: bytes, interval: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(len(body)):
            if self.server.stopping.is_set():
                break
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()
            time.sleep(interval)
        self.close_connection = True

    def _trickle_head(self, body: bytes, interval: float) -> None:
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
            + b"X-Padding: "
            + b"a" * 200
            + b"\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        self.close_connection = True
        for i in range(len(head)):
            if self.server.stopping.is_set() or self._client_gone():
                return
            self.wfile.write(head[i : i + 1])
            self.wfile.flush()
            time.sleep(interval)
        self.wfile.write(body)

    def _client_gone(self) -> bool:
        """Whether the client closed its side (a readable socket with nothing to read)."""
        import select

        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

    def _oversized(self, size: int, chunked: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"\xff\xd8\xff\xe0" + b"\x00" * (64 * 1024 - 4)
        sent = 0
        while sent < size and not self.server.stopping.is_set():
            piece = block[: min(len(block), size - sent)]
            if chunked:
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            else:
                self.wfile.write(piece)
            sent += len(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True


_Answer = Callable[[_Handler, str, dict[str, str]], None]
#: fault=NAME -> how the server answers (anything else: the image).
_FAULTS: dict[str, _Answer] = {
    "404": _Handler._status,
    "403": _Handler._status,
    "410": _Handler._status,
    "500": _Handler._status,
    "503": _Handler._status,
    "429": _Handler._status,
    "slow": lambda h, p, q: h._trickle(h._image(p, q), float(q.get("interval", 1.0))),
    "slow-headers": lambda h, p, q: h._trickle_head(h._image(p, q), float(q.get("interval", 0.5))),
    "stall": _Handler._stall,
    "truncated": lambda h, p, q: h._send(200, (b := h._image(p, q))[: len(b) * 6 // 10]),
    "html": lambda h, p, q: h._send(
        200, b"<!DOCTYPE html><html><body>Photo not found</body></html>"
    ),
    "oversized": lambda h, p, q: h._oversized(
        int(q.get("size", 11 * 1024 * 1024)), q.get("chunked") == "1"
    ),
    "huge": lambda h, p, q: h._send(200, png_bomb(), "image/png"),
    "scans": lambda h, p, q: h._send(200, scan_bomb(int(q.get("repeats", 2000)))),
    "redirect": _Handler._redirect,
    "redirect-loop": lambda h, p, q: h._send(302, b"", "text/plain", {"Location": h.path}),
    "redirect-blocked": lambda h, p, q: h._send(
        302, b"", "text/plain", {"Location": q.get("to", METADATA_URL)}
    ),
    "reset": _Handler._reset,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], latency: float, pool: list[bytes]) -> None:
        super().__init__(address, _Handler)
        self.latency = latency
        self.pool = pool
        self.hits: Counter[str] = Counter()
        self.active = 0
        self.peak = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients closing idle keep-alive connections is normal; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def enter(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1
            self.active += 1
            self.peak = max(self.peak, self.active)

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


def realistic_pool(size: int, *, width: int = 500, height: int = 375) -> list[bytes]:
    """``size`` JPEGs of about 30-150 KB (like Flickr's 500 px photos), for benchmarks."""
    details = np.linspace(4.0, 40.0, num=max(size, 1))
    return [
        encode(render_image(f"pool-{i}", width=width, height=height, detail=float(d)), quality=88)
        for i, d in enumerate(details[:size])
    ]


class ImageServer:
    """Runs the fault-injecting image server on a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        pool: list[bytes] | None = None,
    ) -> None:
        self._server = _Server((host, port), latency, pool or [])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def hits(self) -> Counter[str]:
        """Requests received per path (with query): lets tests prove what was fetched."""
        return self._server.hits

    @property
    def peak(self) -> int:
        """The most requests this server has handled at the same time."""
        return self._server.peak

    def url(self, path: str, **query: object) -> str:
        suffix = "?" + urlencode(query) if query else ""
        return f"{self.base_url}/{path.lstrip('/')}{suffix}"

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
