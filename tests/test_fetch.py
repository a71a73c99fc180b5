"""The fetcher against the local image server's faults (loopback opened explicitly)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

import ml.fetch
from devkit.imageserver import ImageServer
from ml.fetch import FetchConfig, Fetcher, FetchError, parse_retry_after
from ml.netpolicy import AddressPolicy

CONFIG = FetchConfig(
    connect_timeout=1.0,
    read_timeout=1.0,
    deadline=3.0,
    retries=2,
    backoff_base=0.05,
    max_retry_after=2.0,
    max_bytes=1024 * 1024,
)


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    fetcher = Fetcher(CONFIG, AddressPolicy.from_cidrs(["127.0.0.0/8"]))
    yield fetcher
    fetcher.close()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address the fetcher opened a socket to."""
    opened: list[tuple[str, int]] = []
    real = ml.fetch.open_connection

    def record(address: str, port: int, *args: object) -> socket.socket:
        opened.append((address, port))
        return real(address, port, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ml.fetch, "open_connection", record)
    return opened


def _error(fetcher: Fetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetcher.fetch(url)
    return info.value


@pytest.mark.integration
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
@pytest.mark.integration
def test_fault_statuses(
    fetcher: Fetcher,
    image_server: ImageServer,
    query: dict[str, str],
    status: str,
    http_status: int | None,
    attempts: int,
) -> None:
    error = _error(fetcher, image_server.url(f"fault/{status}/{len(query)}.jpg", **query))
    assert (error.status, error.http_status, error.attempts) == (status, http_status, attempts)


@pytest.mark.integration
def test_transient_500_is_retried(fetcher: Fetcher, image_server: ImageServer) -> None:
    url = image_server.url("flaky/500.jpg", fault="500", fail="2")
    response = fetcher.fetch(url)
    assert response.attempts == 3 and response.http_status == 200


@pytest.mark.integration
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


@pytest.mark.integration
def test_trickling_body_hits_the_deadline(fetcher: Fetcher, image_server: ImageServer) -> None:
    started = time.monotonic()
    error = _error(fetcher, image_server.url("slow/1.jpg", fault="slow", interval="0.2"))
    elapsed = time.monotonic() - started
    assert error.status == "timeout"
    assert elapsed < CONFIG.deadline + 1.5


@pytest.mark.integration
def test_redirects_are_followed(fetcher: Fetcher, image_server: ImageServer) -> None:
    response = fetcher.fetch(image_server.url("moved/1.jpg", fault="redirect", hops="2"))
    assert response.http_status == 200 and "fault" not in response.final_url


@pytest.mark.integration
def test_redirect_to_metadata_address_is_blocked_without_connecting(
    fetcher: Fetcher, image_server: ImageServer, connections: list[tuple[str, int]]
) -> None:
    error = _error(fetcher, image_server.url("evil/1.jpg", fault="redirect-blocked"))
    assert error.status == "blocked" and "169.254.169.254" in str(error)
    assert all(host == "127.0.0.1" for host, _ in connections)


@pytest.mark.integration
def test_redirect_to_other_scheme_is_blocked(fetcher: Fetcher, image_server: ImageServer) -> None:
    url = image_server.url("evil/2.jpg", fault="redirect-blocked", to="file:///etc/passwd")
    assert _error(fetcher, url).status == "blocked"


@pytest.mark.integration
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


@pytest.mark.integration
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


# --- one deadline for everything a fetch does -------------------------------------------------

SLOW = FetchConfig(
    connect_timeout=1.0, read_timeout=10.0, deadline=2.0, retries=2, backoff_base=0.05, per_host=1
)


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["slow-headers", "stall", "slow"])
def test_trickled_status_line_headers_or_body_end_at_the_deadline(
    image_server: ImageServer, fault: str
) -> None:
    fetcher = Fetcher(SLOW, AddressPolicy.from_cidrs(["127.0.0.0/8"]))
    started = time.monotonic()
    error = _error(fetcher, image_server.url(f"deadline/{fault}.jpg", fault=fault, interval="0.3"))
    elapsed = time.monotonic() - started
    assert error.status == "timeout" and "deadline" in str(error)
    assert SLOW.deadline - 0.2 <= elapsed < SLOW.deadline + 1.0


def _arrived(image_server: ImageServer, path: str, timeout: float = 10.0) -> None:
    """Wait until the image server has received a request for ``path`` (the event the test
    synchronises on, not a guess at how long it takes)."""
    deadline = time.monotonic() + timeout
    while not any(hit.split("?")[0] == path for hit in list(image_server.hits)):
        assert time.monotonic() < deadline, f"no request for {path} within {timeout:g}s"
        time.sleep(0.01)


@pytest.mark.integration
def test_a_stuck_fetch_gives_its_host_slot_back(image_server: ImageServer) -> None:
    """per_host=1: the good URL waits for the slot, and gets it when the deadline frees it."""
    import threading

    fetcher = Fetcher(SLOW, AddressPolicy.from_cidrs(["127.0.0.0/8"]))
    results: dict[str, object] = {}

    def run(name: str, url: str, deadline: float | None = None) -> None:
        try:
            results[name] = fetcher.fetch(url, deadline=deadline).http_status
        except FetchError as exc:
            results[name] = exc.status

    stuck = threading.Thread(
        target=run,
        args=("stuck", image_server.url("slot/stuck.jpg", fault="slow-headers", interval="0.5")),
    )
    stuck.start()
    _arrived(image_server, "/slot/stuck.jpg")  # the stuck fetch holds the host's one slot
    # The good fetch may wait longer than the stuck one's deadline: it gets the slot then.
    good_url = image_server.url("slot/good.jpg")
    good = threading.Thread(target=run, args=("good", good_url, SLOW.deadline + 2.0))
    good.start()
    stuck.join(5)
    good.join(5)
    assert results == {"stuck": "timeout", "good": 200}
    # The dead connection is not reused: the next fetch on the host works at once.
    started = time.monotonic()
    assert fetcher.fetch(image_server.url("slot/after.jpg")).http_status == 200
    assert time.monotonic() - started < 1.0


@pytest.mark.integration
def test_waiting_for_a_pool_slot_is_bounded(image_server: ImageServer) -> None:
    import threading

    fetcher = Fetcher(
        FetchConfig(deadline=1.0, per_host=1, retries=0), AddressPolicy.from_cidrs(["127.0.0.0/8"])
    )

    def hog_slot() -> None:
        with pytest.raises(FetchError):
            fetcher.fetch(image_server.url("pool/hog.jpg", fault="stall"), deadline=3.0)

    hog = threading.Thread(target=hog_slot)
    hog.start()
    _arrived(image_server, "/pool/hog.jpg")  # the hog holds the pool's one connection
    started = time.monotonic()
    error = _error(fetcher, image_server.url("pool/waiting.jpg"))
    assert error.status == "timeout" and "no free connection" in str(error)
    assert time.monotonic() - started < 1.5
    hog.join(5)


def test_a_trickled_tls_handshake_ends_at_the_deadline() -> None:
    """A server that answers the ClientHello one byte at a time."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"\x16\x03\x03\x10\x00")  # a handshake record of 4 KiB ...
            while not stop.wait(0.3):  # ... sent a byte at a time
                try:
                    conn.sendall(b"\x02")
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fetcher = Fetcher(
        FetchConfig(connect_timeout=5.0, read_timeout=10.0, deadline=1.5, retries=0),
        AddressPolicy.from_cidrs(["127.0.0.0/8"]),
    )
    started = time.monotonic()
    try:
        error = _error(fetcher, f"https://127.0.0.1:{listener.getsockname()[1]}/x.jpg")
    finally:
        stop.set()
        listener.close()
    assert error.status == "timeout" and time.monotonic() - started < 2.5


def test_a_hung_dns_lookup_ends_at_the_deadline() -> None:
    def resolver(host: str, port: int) -> list[str]:
        time.sleep(10)
        return ["93.184.215.14"]

    fetcher = Fetcher(FetchConfig(deadline=1.0, retries=3), AddressPolicy(resolver=resolver))
    started = time.monotonic()
    error = _error(fetcher, "http://slow-dns.test/x.jpg")
    assert error.status == "timeout" and time.monotonic() - started < 2.0


def test_tls_certificates_are_verified(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A self-signed server is refused (the deadline-aware TLS context still verifies)."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    cert, key = _self_signed(tmp_path)
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.handle_request, daemon=True).start()
    fetcher = Fetcher(CONFIG, AddressPolicy.from_cidrs(["127.0.0.0/8"]))
    try:
        error = _error(fetcher, f"https://127.0.0.1:{server.server_address[1]}/x.jpg")
    finally:
        server.server_close()
    assert error.status == "connection_error" and "TLS" in str(error)


def _self_signed(folder):  # type: ignore[no-untyped-def]
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.mark.integration
def test_messages_never_carry_url_credentials(image_server: ImageServer) -> None:
    fetcher = Fetcher(CONFIG, AddressPolicy())  # loopback refused: the error names the host
    url = image_server.url("secret.jpg", token="s3cr3t").replace("http://", "http://me:pw@")
    error = _error(fetcher, url)
    assert "s3cr3t" not in str(error) and "pw" not in str(error)
