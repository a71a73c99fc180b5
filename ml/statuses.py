"""The status of every URL and image: one vocabulary, and one base for per-item rejections.

Exception tree (one ``except Rejected`` covers every per-item failure)::

    Rejected                      an item could not be used; .status says why
    ├── FetchError  (ml.fetch)    the URL: invalid_url, blocked, connection_error, timeout,
    │                             http_error, too_many_redirects, too_large
    └── ImageRejected (ml.imaging) the bytes: not_image, too_many_pixels, too_complex,
                                  undecodable

A rejection is a value, never a crash: the download manifest and ``predict``'s rows record it.
The README's status table and ``ml.download``'s docstring list exactly :data:`DESCRIPTIONS`.

Usage: ``raise Rejected(Status.BLOCKED, "10.0.0.1 is a private network")``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """The manifest's ``status`` column (and predict's): each value's meaning is in
    :data:`DESCRIPTIONS`."""

    OK = "ok"
    INVALID_URL = "invalid_url"
    BLOCKED = "blocked"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    HTTP_ERROR = "http_error"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    TOO_LARGE = "too_large"
    EMPTY = "empty"
    NOT_IMAGE = "not_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_COMPLEX = "too_complex"
    UNDECODABLE = "undecodable"
    STORE_ERROR = "store_error"
    INTERNAL_ERROR = "internal_error"
    PENDING = "pending"
    FORGOTTEN = "forgotten"


DESCRIPTIONS: dict[Status, str] = {
    Status.OK: "fetched, verified, normalized and stored",
    Status.INVALID_URL: "the URL cannot be parsed",
    Status.BLOCKED: "the address policy refused the host or a redirect target",
    Status.CONNECTION_ERROR: "DNS failure, refused or reset connection, TLS error",
    Status.TIMEOUT: "connect/read timeout, or the per-image deadline ran out",
    Status.HTTP_ERROR: "a non-2xx answer (see `http_status`), after retries where they apply",
    Status.TOO_MANY_REDIRECTS: "more than 5 redirects, or a redirect loop",
    Status.TOO_LARGE: "the body exceeds the byte cap",
    Status.EMPTY: "zero bytes: an empty body, or an empty image value",
    Status.NOT_IMAGE: "the bytes are not JPEG, PNG, WebP or GIF, whatever the Content-Type says",
    Status.TOO_MANY_PIXELS: "the header declares more pixels than allowed, or decoding would "
    "need more memory than the shared budget (decompression bomb)",
    Status.TOO_COMPLEX: "a JPEG with more scans than allowed (each scan decodes the whole image "
    "again: a CPU bomb)",
    Status.UNDECODABLE: "a supported format, but truncated or corrupt",
    Status.STORE_ERROR: "the image could not be written to the store (the stage then fails; rerun)",
    Status.INTERNAL_ERROR: "an unexpected error in our code: please report it",
    Status.PENDING: "not attempted yet (a manifest collected part-way)",
    Status.FORGOTTEN: "the URL or its content was forgotten on request (`python -m ml forget`): "
    "not fetched, or fetched and not stored",
}


class Rejected(Exception):  # noqa: N818 - a status, like the manifest column it fills
    """One item could not be used; ``status`` is its manifest status."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = Status(status)

    @property
    def details(self) -> dict[str, Any]:
        """Manifest columns this rejection fills besides status and error."""
        return {}
