"""Address policy (SSRF guard): which IP addresses the downloader may connect to.

Only globally routable unicast addresses are allowed by default. Loopback, private (RFC 1918),
shared (100.64/10), link-local (169.254/16, the cloud metadata address included), multicast,
reserved, unspecified, IPv6 unique-local, IPv4-mapped, NAT64 and 6to4/Teredo addresses are
refused. Tests and the offline demo open loopback with an explicit ``allow`` list of networks.

The check runs on the exact address the socket connects to (see ``ml.fetch``), so a host name
that resolves differently on a second lookup (DNS rebinding) cannot slip through.

Usage::

    policy = AddressPolicy(allow=["127.0.0.0/8"])
    policy.resolve("example.org", 80)   # -> ["93.184.215.14"] or raises BlockedAddress
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``resolver(host, port)`` returns the host's addresses as strings.
Resolver = Callable[[str, int], Sequence[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class BlockedAddress(Exception):  # noqa: N818 - reads as a status, like TimeoutError's peers
    """The host resolves to an address the policy refuses; no connection was attempted."""


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for ``host`` (raises socket.gaierror)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused by default, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "IPv4-mapped IPv6 address"
        if ip in _NAT64 or ip in _NAT64_LOCAL:
            return "NAT64 address"
        if ip.sixtofour is not None or ip.teredo is not None:
            return "6to4/Teredo tunnel address"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    )
    for name, hit in checks:
        if hit:
            return f"{name} address"
    if not ip.is_global:
        return "not globally routable"
    return None


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings (``127.0.0.0/8``, ``::1/128``); raise ValueError with the bad one."""
    networks: list[IPNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"--allow-network {value!r} is not a CIDR network: {exc}") from exc
    return tuple(networks)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses may be connected to; ``allow`` opens networks the default refuses."""

    allow: tuple[IPNetwork, ...] = ()
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str], resolver: Resolver | None = None) -> AddressPolicy:
        return cls(parse_networks(cidrs), resolver or system_resolver)

    def check(self, address: str) -> None:
        """Raise BlockedAddress unless a connection to ``address`` is allowed."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip.version == net.version and ip in net for net in self.allow):
            return
        reason = blocked_reason(ip)
        if reason is not None:
            raise BlockedAddress(f"{address} is a {reason}")

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``; refuses if any of them is blocked.

        Refusing on any blocked address (not just skipping it) keeps a name that mixes
        public and internal records from being used to probe the internal one.
        """
        bare = host.strip("[]")
        try:
            ipaddress.ip_address(bare.split("%", 1)[0])
            addresses: Sequence[str] = [bare]
        except ValueError:
            addresses = self.resolver(host, port)
        if not addresses:
            raise socket.gaierror(f"no addresses for {host}")
        for address in addresses:
            try:
                self.check(address)
            except BlockedAddress as exc:
                raise BlockedAddress(f"{host} resolves to {exc}") from None
        return list(addresses)
