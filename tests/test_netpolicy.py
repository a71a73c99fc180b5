"""The address policy, with injected resolvers: no test here opens a socket."""

from __future__ import annotations

import ipaddress

import pytest

from ml.netpolicy import AddressPolicy, BlockedAddress, blocked_reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "not globally routable"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("fd00::1", "private"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:8.8.8.8", "IPv4-mapped"),
        ("64:ff9b::a00:1", "NAT64"),
        ("2002:a00:1::", "6to4/Teredo"),
        ("192.0.2.1", "private"),
        ("198.18.0.1", "private"),
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
        return {"public.test": ["93.184.215.14"], "internal.test": ["10.0.0.7"],
                "mixed.test": ["93.184.215.14", "169.254.169.254"]}[host]

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
