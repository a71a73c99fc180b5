"""The fetcher against the local image server's faults (loopback opened explicitly)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from urllib3.util import connection as urllib3_connection

from ml.fetch import FetchConfig, Fetcher, FetchError, parse_retry_after
from ml.imageserver import ImageServer
from ml.netpolicy import AddressPolicy

CONFIG = FetchConfig(connect_timeout=1.0, read_timeout=1.0, deadline=3.0, retries=2,
                     backoff_base=0.05, max_retry_after=2.0, max_bytes=1024 * 1024)


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    fetcher = Fetcher(CONFIG, AddressPolicy.from_cidrs(["127.0.0.0/8"]))
    yield fetcher
    fetcher.close()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address the fetcher opened a socket to."""
    opened: list[tuple[str, int]] = []
    real = urllib3_connection.create_connection

    def record(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        opened.append(address)
        return real(address, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(urllib3_connection, "create_connection", record)
    return opened


def _error(fetcher: Fetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetcher.fetch(url)
    return info.value


def test_ok(fetcher: Fetcher, image_server: ImageServer) -> None:
    response = fetcher.fetch(image_server.url("a/ok.jpg"))
    assert response.http_status == 200 and response.body[:3] == b"\xff\xd8\xff"
    assert response.attempts == 1


@pytest.mark.parametrize(
    ("query", "status", "http_status", "attempts"),
    [
        ({"fault": "404"}, "http_error", 404, 1),
        ({"fault": "500"}, "http_error", 500, 3),
        ({"fault": "429", "retry_after": "0"}, "http_error", 429, 3),
        ({"fault": "redirect-loop"}, "too_many_redirects", 302, 1),
        ({"fault": "redirect", "hops": "6"}, "too_many_redirects", None, 1),
        ({"fault": "oversized"}, "too_large", 200, 1),
        ({"fault": "oversized", "chunked": "1"}, "too_large", 200, 1),
        ({"fault": "reset"}, "connection_error", None, 3),
    ],
)
def test_fault_statuses(fetcher: Fetcher, image_server: ImageServer, query: dict[str, str],
                        status: str, http_status: int | None, attempts: int) -> None:
    error = _error(fetcher, image_server.url(f"fault/{status}/{len(query)}.jpg", **query))
    assert (error.status, error.http_status, error.attempts) == (status, http_status, attempts)


def test_transient_500_is_retried(fetcher: Fetcher, image_server: ImageServer) -> None:
    url = image_server.url("flaky/500.jpg", fault="500", fail="2")
    response = fetcher.fetch(url)
    assert response.attempts == 3 and response.http_status == 200


def test_retry_after_is_honoured(fetcher: Fetcher, image_server: ImageServer) -> None:
    url = image_server.url("flaky/429.jpg", fault="429", fail="1", retry_after="1")
    started = time.monotonic()
    response = fetcher.fetch(url)
    assert response.attempts == 2
    assert time.monotonic() - started >= 0.95  # waited as told, not the 50 ms backoff


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3", 10) == 3.0
    assert parse_retry_after("3000", 10) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 10) == 0.0
    assert parse_retry_after("soon", 10) is None
    assert parse_retry_after(None, 10) is None


def test_trickling_body_hits_the_deadline(fetcher: Fetcher, image_server: ImageServer) -> None:
    started = time.monotonic()
    error = _error(fetcher, image_server.url("slow/1.jpg", fault="slow", interval="0.2"))
    elapsed = time.monotonic() - started
    assert error.status == "timeout"
    assert elapsed < CONFIG.deadline + 1.5


def test_redirects_are_followed(fetcher: Fetcher, image_server: ImageServer) -> None:
    response = fetcher.fetch(image_server.url("moved/1.jpg", fault="redirect", hops="2"))
    assert response.http_status == 200 and "fault" not in response.final_url


def test_redirect_to_metadata_address_is_blocked_without_connecting(
    fetcher: Fetcher, image_server: ImageServer, connections: list[tuple[str, int]]
) -> None:
    error = _error(fetcher, image_server.url("evil/1.jpg", fault="redirect-blocked"))
    assert error.status == "blocked" and "169.254.169.254" in str(error)
    assert all(host == "127.0.0.1" for host, _ in connections)


def test_redirect_to_other_scheme_is_blocked(fetcher: Fetcher, image_server: ImageServer) -> None:
    url = image_server.url("evil/2.jpg", fault="redirect-blocked", to="file:///etc/passwd")
    assert _error(fetcher, url).status == "blocked"


def test_loopback_is_blocked_by_default(
    image_server: ImageServer, connections: list[tuple[str, int]]
) -> None:
    fetcher = Fetcher(CONFIG, AddressPolicy())
    url = image_server.url("private/1.jpg")
    error = _error(fetcher, url)
    assert error.status == "blocked" and error.attempts == 1
    assert connections == []
    assert image_server.hits[url.removeprefix(image_server.base_url)] == 0


@pytest.mark.parametrize(
    ("host", "addresses"),
    [
        ("metadata.test", ["169.254.169.254"]),
        ("intranet.test", ["10.0.0.7"]),
        ("home.test", ["192.168.0.1"]),
        ("mapped.test", ["::ffff:10.0.0.1"]),
        ("ula.test", ["fd12:3456::1"]),
        ("rebind.test", ["93.184.215.14", "127.0.0.1"]),
    ],
)
def test_injected_names_to_blocked_addresses_never_connect(
    host: str, addresses: list[str], connections: list[tuple[str, int]]
) -> None:
    policy = AddressPolicy(resolver=lambda h, p: addresses)
    fetcher = Fetcher(CONFIG, policy)
    for scheme in ("http", "https"):
        error = _error(fetcher, f"{scheme}://{host}/photo.jpg")
        assert error.status == "blocked"
    assert connections == []


def test_injected_name_to_allowed_address_connects_there(
    image_server: ImageServer, connections: list[tuple[str, int]]
) -> None:
    port = int(image_server.base_url.rsplit(":", 1)[1])
    policy = AddressPolicy.from_cidrs(["127.0.0.0/8"], resolver=lambda h, p: ["127.0.0.1"])
    fetcher = Fetcher(CONFIG, policy)
    response = fetcher.fetch(f"http://photos.test:{port}/named.jpg")
    assert response.http_status == 200
    assert connections == [("127.0.0.1", port)]


def test_dns_failure_is_a_connection_error() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    fetcher = Fetcher(CONFIG, AddressPolicy(resolver=resolver))
    error = _error(fetcher, "http://gone.test/x.jpg")
    assert error.status == "connection_error" and "DNS" in str(error)
    assert error.attempts == 1  # a dead name is not retried


def test_refused_connection_is_a_connection_error(fetcher: Fetcher) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = _error(fetcher, f"http://127.0.0.1:{port}/x.jpg")
    assert error.status == "connection_error" and error.attempts == 3


def test_per_host_cap_bounds_connections() -> None:
    from concurrent.futures import ThreadPoolExecutor

    fetcher = Fetcher(FetchConfig(per_host=2), AddressPolicy.from_cidrs(["127.0.0.0/8"]))
    with ImageServer() as server, ThreadPoolExecutor(8) as pool:
        urls = [server.url(f"cap/{i}.jpg", delay="0.1") for i in range(16)]
        assert all(r.http_status == 200 for r in pool.map(fetcher.fetch, urls))
        assert server.peak == 2
