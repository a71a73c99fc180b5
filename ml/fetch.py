"""HTTP fetching for untrusted URLs: pooled, policy-checked, bounded in time, bytes and hops.

One :class:`Fetcher` is shared by all download threads. It keeps a connection pool per host
(``per_host`` connections at most; threads wait for a free one, but never past the deadline),
checks every address it connects to against the :class:`~ml.netpolicy.AddressPolicy` (redirect
hops included, since each hop opens its connection through the same check), follows at most
``max_redirects`` redirects, retries timeouts, 408/429 and 5xx with exponential backoff and
jitter (honouring Retry-After), and stops any fetch that runs past ``max_bytes``.

**One deadline for everything.** ``deadline`` covers the DNS lookup, waiting for a pooled
connection, connecting, the TLS handshake, the status line, the headers, the body, every
redirect hop, every retry and every backoff. Socket timeouts count per call, so a server that
trickles its headers a byte at a time would never trip them; instead every blocking call on our
sockets is capped at the time left (see :class:`_DeadlineSocket`), so a fetch ends as ``timeout``
at its deadline and gives its per-host slot back. Messages never carry a URL's credentials.

Usage::

    fetcher = Fetcher(FetchConfig(), AddressPolicy())
    response = fetcher.fetch("https://example.org/cat.jpg")   # or raises FetchError
"""

from __future__ import annotations

import email.utils
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    EmptyPoolError,
    HTTPError,
    LocationParseError,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.ssl_ import create_urllib3_context

from ml.netpolicy import AddressPolicy, BlockedAddress
from ml.params import PARAMETERS
from ml.redact import redact_text, redact_url
from ml.statuses import Rejected, Status

MiB = 1024 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
_RETRY_STATUSES = {408, 425, 429}
_CHUNK = 64 * 1024
_DRAIN_LIMIT = 64 * 1024


@dataclass(frozen=True)
class FetchConfig:
    """Limits for one image fetch. All times are seconds."""

    # The limits a run may set are declared (default, range, help) in ml.params only.
    connect_timeout: float = PARAMETERS["connect_timeout"].field()
    read_timeout: float = PARAMETERS["read_timeout"].field()
    #: Total time for one image: every attempt, backoff and byte of the body.
    deadline: float = PARAMETERS["deadline"].field()
    #: Extra attempts after the first for retryable failures.
    retries: int = PARAMETERS["retries"].field()
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    #: Longest Retry-After honoured; a longer one ends the image's attempts.
    max_retry_after: float = 20.0
    max_bytes: int = PARAMETERS["max_bytes"].field()
    max_redirects: int = 5
    per_host: int = PARAMETERS["per_host"].field()
    user_agent: str = "image-sentiment-pipeline/0.1 (dataset downloader)"
    accept: str = "image/*"


class FetchError(Rejected):
    """A URL that could not be fetched; ``status`` is its manifest status."""

    def __init__(
        self,
        status: Status,
        message: str,
        *,
        http_status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, redact_text(message))
        self.http_status = http_status
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts = 0

    @property
    def details(self) -> dict[str, Any]:
        return {"http_status": self.http_status, "attempts": self.attempts}


@dataclass(frozen=True)
class FetchResponse:
    body: bytes
    http_status: int
    final_url: str
    attempts: int


_local = threading.local()


def _remaining() -> float | None:
    """Seconds left before the calling thread's fetch deadline (None outside a fetch)."""
    deadline_at: float | None = getattr(_local, "deadline_at", None)
    return None if deadline_at is None else deadline_at - time.monotonic()


def _bound(sock: socket.socket, requested: float | None) -> None:
    """Cap the next blocking call on ``sock`` at the time left before the deadline.

    Socket timeouts count per call, so a server sending one byte every half second never trips
    a 10-second read timeout; capping every call at the time left makes the deadline hold for
    the status line, the headers, the body and the TLS handshake alike.
    """
    remaining = _remaining()
    if remaining is None:
        return
    if remaining <= 0:
        raise TimeoutError("the fetch deadline has passed")
    socket.socket.settimeout(sock, remaining if requested is None else min(requested, remaining))


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every blocking call ends by the calling thread's fetch deadline."""

    _requested: float | None = None

    def settimeout(self, value: float | None) -> None:
        self._requested = value
        super().settimeout(value)

    def connect(self, address: Any) -> None:
        _bound(self, self._requested)
        super().connect(address)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        _bound(self, self._requested)
        return super().recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        _bound(self, self._requested)
        return super().recv_into(buffer, nbytes, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        _bound(self, self._requested)
        super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The TLS counterpart of :class:`_DeadlineSocket` (handshake included)."""

    _requested: float | None = None

    def settimeout(self, value: float | None) -> None:
        self._requested = value
        super().settimeout(value)

    def do_handshake(self, block: bool = False) -> None:
        _bound(self, self._requested)
        super().do_handshake(block)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        _bound(self, self._requested)
        return super().read(len, buffer)

    def sendall(self, data: Any, flags: int = 0) -> None:
        _bound(self, self._requested)
        super().sendall(data, flags)


def open_connection(
    address: str, port: int, timeout: float | None, options: Any = None
) -> socket.socket:
    """A TCP connection to an address that the policy has already checked."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = _DeadlineSocket(family, socket.SOCK_STREAM)
    try:
        for option in options or ():
            sock.setsockopt(*option)
        sock.settimeout(timeout)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _tls_context() -> ssl.SSLContext:
    """urllib3's default verifying context, making deadline-bound TLS sockets."""
    context = create_urllib3_context()
    context.load_default_certs()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


def _guarded_connection(base: type[HTTPConnection], policy: AddressPolicy) -> type[HTTPConnection]:
    """A connection class that connects only to addresses ``policy`` allows, by the deadline."""

    class GuardedConnection(base):  # type: ignore[misc, valid-type]
        def _new_conn(self) -> socket.socket:
            try:
                addresses = policy.resolve(self._dns_host, self.port, timeout=_remaining())
            except socket.gaierror as exc:
                raise NameResolutionError(self.host, self, exc) from exc
            except TimeoutError as exc:
                raise ConnectTimeoutError(self, f"DNS lookup of {self.host} timed out") from exc
            error: Exception | None = None
            for address in addresses:
                try:
                    return open_connection(address, self.port, self.timeout, self.socket_options)
                except TimeoutError:
                    error = ConnectTimeoutError(self, f"connection to {self.host} timed out")
                except OSError as exc:
                    error = NewConnectionError(self, f"cannot connect to {self.host}: {exc}")
            assert error is not None
            raise error

    return GuardedConnection


def parse_retry_after(value: str | None, cap: float) -> float | None:
    """Seconds from a Retry-After header (delta or HTTP date), clamped to [0, cap]."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), cap)


class Fetcher:
    """Thread-safe fetcher with one pooled HTTP client; see the module docstring."""

    def __init__(self, config: FetchConfig, policy: AddressPolicy, *, num_pools: int = 64) -> None:
        self.config = config
        self.policy = policy
        self._pools = urllib3.PoolManager(
            num_pools=num_pools,
            maxsize=config.per_host,
            block=True,
            retries=False,
            ssl_context=_tls_context(),
        )
        http_conn = _guarded_connection(HTTPConnection, policy)
        https_conn = _guarded_connection(HTTPSConnection, policy)
        http_pool = type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
        https_pool = type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})
        self._pools.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}
        self._headers = {
            "User-Agent": config.user_agent,
            "Accept": config.accept,
            "Accept-Encoding": "identity",
        }

    def close(self) -> None:
        self._pools.clear()

    def fetch(self, url: str, *, deadline: float | None = None) -> FetchResponse:
        """The body of ``url``; raises FetchError with a manifest status and attempt count.

        ``deadline`` overrides the configured one for this call (seconds).
        """
        cfg = self.config
        seconds = cfg.deadline if deadline is None else deadline
        deadline_at = time.monotonic() + seconds
        outer = getattr(_local, "deadline_at", None)
        _local.deadline_at = deadline_at if outer is None else min(outer, deadline_at)
        try:
            return self._fetch(url, deadline_at, seconds)
        finally:
            _local.deadline_at = outer

    def _fetch(self, url: str, deadline_at: float, seconds: float) -> FetchResponse:
        cfg = self.config
        attempt = 0
        while True:
            attempt += 1
            try:
                body, status, final_url = self._attempt(url, deadline_at)
                return FetchResponse(body, status, final_url, attempt)
            except FetchError as exc:
                exc.attempts = attempt
                if exc.status in (Status.TIMEOUT, Status.CONNECTION_ERROR) and (
                    time.monotonic() >= deadline_at - 0.001
                ):
                    error = FetchError(
                        Status.TIMEOUT,
                        f"deadline of {seconds:g}s reached ({exc})",
                        http_status=exc.http_status,
                    )
                    error.attempts = attempt
                    raise error from None
                if not exc.retryable or attempt > cfg.retries:
                    raise
                delay = exc.retry_after
                if delay is None:
                    step = min(cfg.backoff_max, cfg.backoff_base * 2 ** (attempt - 1))
                    delay = step / 2 + random.uniform(0, step / 2)
                if time.monotonic() + delay >= deadline_at:
                    raise
                time.sleep(delay)

    def _attempt(self, url: str, deadline_at: float) -> tuple[bytes, int, str]:
        cfg = self.config
        seen = {url}
        current = url
        for _hop in range(cfg.max_redirects + 1):
            scheme = urlsplit(current).scheme.lower()
            if scheme not in ("http", "https"):
                raise FetchError(
                    Status.BLOCKED, f"scheme {scheme!r} is not allowed ({redact_url(current)})"
                )
            response = self._open(current, deadline_at)
            body: bytes | None = None
            try:
                status = response.status
                if status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError(
                            Status.HTTP_ERROR, f"HTTP {status} without Location", http_status=status
                        )
                    current = urljoin(current, location)
                    if current in seen:
                        raise FetchError(
                            Status.TOO_MANY_REDIRECTS,
                            f"redirect loop at {redact_url(current)}",
                            http_status=status,
                        )
                    seen.add(current)
                    continue
                if status >= 500 or status in _RETRY_STATUSES:
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), cfg.max_retry_after
                    )
                    raise FetchError(
                        Status.HTTP_ERROR,
                        f"HTTP {status}",
                        http_status=status,
                        retryable=True,
                        retry_after=retry_after,
                    )
                if not 200 <= status < 300:
                    raise FetchError(Status.HTTP_ERROR, f"HTTP {status}", http_status=status)
                body = self._read_body(response, deadline_at)
                return body, status, current
            finally:
                if body is None:
                    _discard(response)
                response.release_conn()
        raise FetchError(Status.TOO_MANY_REDIRECTS, f"more than {cfg.max_redirects} redirects")

    def _open(self, url: str, deadline_at: float) -> Any:
        cfg = self.config
        remaining = deadline_at - time.monotonic()
        if remaining <= 0:
            raise FetchError(Status.TIMEOUT, "the fetch deadline was reached")
        timeout = urllib3.Timeout(
            connect=min(cfg.connect_timeout, remaining), read=min(cfg.read_timeout, remaining)
        )
        try:
            response = self._pools.urlopen(
                "GET",
                url,
                redirect=False,
                retries=False,
                timeout=timeout,
                headers=self._headers,
                preload_content=False,
                decode_content=False,
                assert_same_host=False,
                pool_timeout=remaining,
            )
        except BlockedAddress as exc:
            raise FetchError(Status.BLOCKED, f"address policy: {exc}") from None
        except (LocationParseError, LocationValueError) as exc:
            raise FetchError(Status.INVALID_URL, f"cannot parse URL: {exc}") from None
        except EmptyPoolError:
            raise FetchError(
                Status.TIMEOUT,
                "no free connection to the host before the fetch deadline "
                f"({cfg.per_host} per host, all busy)",
            ) from None
        except NameResolutionError as exc:
            raise FetchError(
                Status.CONNECTION_ERROR, f"DNS lookup failed: {_describe(exc)}"
            ) from None
        except NewConnectionError as exc:  # a ConnectTimeoutError subclass, so before it
            raise FetchError(Status.CONNECTION_ERROR, _describe(exc), retryable=True) from None
        except Urllib3Timeout as exc:
            raise FetchError(Status.TIMEOUT, _describe(exc), retryable=True) from None
        except SSLError as exc:
            raise FetchError(Status.CONNECTION_ERROR, f"TLS error: {_describe(exc)}") from None
        except (HTTPError, OSError) as exc:
            raise FetchError(Status.CONNECTION_ERROR, _describe(exc), retryable=True) from None
        return response

    def _read_body(self, response: Any, deadline_at: float) -> bytes:
        cfg = self.config
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
            response.close()
            raise FetchError(
                Status.TOO_LARGE,
                f"Content-Length {declared} exceeds {cfg.max_bytes} bytes",
                http_status=response.status,
            )
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                remaining = deadline_at - time.monotonic()
                if remaining <= 0:
                    response.close()
                    raise FetchError(
                        Status.TIMEOUT,
                        f"body not complete by the fetch deadline ({total} bytes read)",
                        http_status=response.status,
                    )
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > cfg.max_bytes:
                    response.close()
                    raise FetchError(
                        Status.TOO_LARGE,
                        f"body exceeds {cfg.max_bytes} bytes",
                        http_status=response.status,
                    )
                chunks.append(chunk)
        except Urllib3Timeout as exc:
            response.close()
            raise FetchError(
                Status.TIMEOUT,
                f"reading the body: {_describe(exc)}",
                http_status=response.status,
                retryable=True,
            ) from None
        except (HTTPError, OSError) as exc:
            response.close()
            raise FetchError(
                Status.CONNECTION_ERROR,
                f"reading the body: {_describe(exc)}",
                http_status=response.status,
                retryable=True,
            ) from None
        return b"".join(chunks)


def _discard(response: Any) -> None:
    """Leave the connection reusable after an unread answer: drain a short body, else close."""
    length = response.headers.get("Content-Length", "")
    try:
        if length.isdigit() and int(length) <= _DRAIN_LIMIT:
            response.drain_conn()
            return
    except (HTTPError, OSError):
        pass
    response.close()


_POOL_PREFIX = re.compile(r"\w*Pool\(host=[^)]*\): |\s*\((?:read|connect) timeout=[^)]*\)")


def _describe(exc: BaseException) -> str:
    text = _POOL_PREFIX.sub("", redact_text(str(exc))) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
