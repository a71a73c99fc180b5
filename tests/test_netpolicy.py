"""The address policy, with injected resolvers: no test here opens a socket."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from ml.netpolicy import REFUSED, AddressPolicy, BlockedAddress, blocked_reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private network"),
        ("172.16.0.1", "private network"),
        ("192.168.1.1", "private network"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.169.254", "cloud metadata"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("fd00::1", "unique-local"),
        ("fc00::1", "unique-local"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:8.8.8.8", "IPv4-mapped"),
        ("64:ff9b::a00:1", "NAT64"),
        ("2002:a00:1::", "6to4"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ("192.0.2.1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        # Python's ipaddress calls these two global on some versions; the table does not.
        ("fec0::1", "site-local"),
        ("192.0.0.100", "IETF protocol assignments"),
        ("4000::1", "outside global unicast"),
    ],
)
def test_blocked_addresses(address: str, reason: str) -> None:
    found = blocked_reason(ipaddress.ip_address(address))
    assert found is not None and reason in found


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_resolver_result_is_checked() -> None:
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return {
            "public.test": ["93.184.215.14"],
            "internal.test": ["10.0.0.7"],
            "mixed.test": ["93.184.215.14", "169.254.169.254"],
        }[host]

    policy = AddressPolicy(resolver=resolver)
    assert policy.resolve("public.test", 80) == ["93.184.215.14"]
    with pytest.raises(BlockedAddress, match="internal.test resolves to 10.0.0.7"):
        policy.resolve("internal.test", 80)
    with pytest.raises(BlockedAddress, match="169.254.169.254 is a link-local"):
        policy.resolve("mixed.test", 443)
    assert calls == [("public.test", 80), ("internal.test", 80), ("mixed.test", 443)]


def test_literal_addresses_skip_the_resolver() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise AssertionError("no lookup for a literal address")

    policy = AddressPolicy(resolver=resolver)
    with pytest.raises(BlockedAddress):
        policy.resolve("169.254.169.254", 80)
    with pytest.raises(BlockedAddress):
        policy.resolve("[::1]", 80)


def test_allow_list_opens_only_what_it_names() -> None:
    policy = AddressPolicy.from_cidrs(["127.0.0.0/8"], resolver=lambda h, p: ["127.0.0.1"])
    assert policy.resolve("localhost", 80) == ["127.0.0.1"]
    with pytest.raises(BlockedAddress):
        policy.resolve("::1", 80)
    with pytest.raises(BlockedAddress):
        policy.resolve("10.0.0.1", 80)


def test_bad_cidr_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--allow-network 'local' is not a CIDR"):
        AddressPolicy.from_cidrs(["local"])


@pytest.mark.parametrize(("network", "reason"), REFUSED, ids=[n for n, _ in REFUSED])
def test_every_row_of_the_table_is_refused(network: str, reason: str) -> None:
    net = ipaddress.ip_network(network)
    policy = AddressPolicy(resolver=lambda h, p: [])
    for ip in (net[0], net[net.num_addresses // 2], net[-1]):
        with pytest.raises(BlockedAddress, match=re.escape(reason)):
            policy.check(str(ip))
        assert blocked_reason(ip) is not None


@pytest.mark.parametrize(("network", "reason"), REFUSED, ids=[n for n, _ in REFUSED])
def test_allow_list_opens_a_refused_row_on_purpose(network: str, reason: str) -> None:
    net = ipaddress.ip_network(network)
    AddressPolicy.from_cidrs([network]).check(str(net[net.num_addresses // 2]))


@pytest.mark.parametrize(
    "address",
    [
        "1.1.1.1",
        "100.128.0.1",
        "192.0.1.1",
        "198.20.0.1",
        "2001:4860:4860::8888",
        "2a00:1450:4001::1",
    ],
)
def test_neighbours_of_refused_rows_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_security_document_lists_the_table() -> None:
    text = (Path(__file__).resolve().parent.parent / "SECURITY.md").read_text()
    missing = [net for net, _ in REFUSED if f"`{net}`" not in text]
    assert missing == []


def test_a_hung_resolver_is_bounded() -> None:
    import time

    def slow(host: str, port: int) -> list[str]:
        time.sleep(5)
        return ["93.184.215.14"]

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        AddressPolicy(resolver=slow).resolve("slow.test", 80, timeout=0.3)
    assert time.monotonic() - started < 2


def test_resolver_garbage_is_a_lookup_failure() -> None:
    import socket

    with pytest.raises(socket.gaierror):
        AddressPolicy(resolver=lambda h, p: ["not-an-ip"]).resolve("odd.test", 80)
