"""Address policy (SSRF guard): which IP addresses the downloader may connect to.

The refused ranges are one explicit table, :data:`REFUSED`, built from IANA's special-purpose
address registries (RFC 6890 and its updates); it does not lean on Python's ``ipaddress`` flags,
which on some Python versions call ``fec0::/10`` or ``192.0.0.0/24`` hosts global. On top of the
table, an IPv6 address must lie in global unicast space (``2000::/3``), and anything Python does
not call global is refused as well (a second opinion, never the only one).

``allow`` opens networks on purpose: tests and the offline demo open ``127.0.0.0/8``; a
deployment may open an internal image host with ``ML_ALLOW_NETWORKS``. Run parameters (the
Airflow form) can never change the policy.

The check runs on the exact address the socket connects to (see ``ml.fetch``), so a host name
that resolves differently on a second lookup (DNS rebinding) cannot slip through, and a name
with any refused address is refused whole.

Usage::

    policy = AddressPolicy(allow=["127.0.0.0/8"])
    policy.resolve("example.org", 80)   # -> ["93.184.215.14"] or raises BlockedAddress
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``resolver(host, port)`` returns the host's addresses as strings.
Resolver = Callable[[str, int], Sequence[str]]

#: Every refused range and why: (network, reason). SECURITY.md prints this table; a test checks
#: each row (its first, a middle and its last address) and that the document lists it.
REFUSED: tuple[tuple[str, str], ...] = (
    # IPv4
    ("0.0.0.0/8", "'this network' and the unspecified address"),
    ("10.0.0.0/8", "private network (RFC 1918)"),
    ("100.64.0.0/10", "shared address space, carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, including the cloud metadata address 169.254.169.254"),
    ("172.16.0.0/12", "private network (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
    ("192.0.2.0/24", "documentation TEST-NET-1"),
    ("192.31.196.0/24", "AS112 service"),
    ("192.52.193.0/24", "AMT relay"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private network (RFC 1918)"),
    ("192.175.48.0/24", "direct delegation AS112 service"),
    ("198.18.0.0/15", "network benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation TEST-NET-2"),
    ("203.0.113.0/24", "documentation TEST-NET-3"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved for future use, and the broadcast address"),
    # IPv6
    ("::/96", "unspecified, loopback and IPv4-compatible addresses"),
    ("::ffff:0:0/96", "IPv4-mapped address"),
    ("::ffff:0:0:0/96", "IPv4-translated address (SIIT)"),
    ("64:ff9b::/96", "NAT64 well-known prefix"),
    ("64:ff9b:1::/48", "NAT64 local-use prefix"),
    ("100::/64", "discard-only prefix"),
    ("2001::/23", "IETF protocol assignments, including Teredo (2001::/32)"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4 tunnel address"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6) SIDs"),
    ("fc00::/7", "unique-local address (private IPv6)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_REFUSED = tuple((ipaddress.ip_network(net), reason) for net, reason in REFUSED)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
#: DNS lookups run on these threads so that a hung resolver cannot outlive a fetch's deadline.
_LOOKUPS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dns")


class BlockedAddress(Exception):  # noqa: N818 - reads as a status, like TimeoutError's peers
    """The host resolves to an address the policy refuses; no connection was attempted."""


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for ``host`` (raises socket.gaierror)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused by default, or None when it is a public unicast address."""
    for network, reason in _REFUSED:
        if ip.version == network.version and ip in network:
            return f"{reason} ({network})"
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST_V6:
        return "IPv6 address outside global unicast space (2000::/3)"
    if not ip.is_global:
        return "address that is not globally routable"
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

    def resolve(self, host: str, port: int, *, timeout: float | None = None) -> list[str]:
        """The addresses to connect to for ``host``; refuses if any of them is blocked.

        Refusing on any blocked address (not just skipping it) keeps a name that mixes
        public and internal records from being used to probe the internal one. ``timeout``
        bounds the lookup (raises TimeoutError).
        """
        bare = host.strip("[]")
        try:
            ipaddress.ip_address(bare.split("%", 1)[0])
            addresses: Sequence[str] = [bare]
        except ValueError:
            addresses = self._lookup(host, port, timeout)
        if not addresses:
            raise socket.gaierror(f"no addresses for {host}")
        for address in addresses:
            try:
                self.check(address)
            except BlockedAddress as exc:
                raise BlockedAddress(f"{host} resolves to {exc}") from None
            except ValueError:
                raise socket.gaierror(f"the resolver gave {address!r} for {host}") from None
        return list(addresses)

    def _lookup(self, host: str, port: int, timeout: float | None) -> Sequence[str]:
        if timeout is None:
            return self.resolver(host, port)
        future = _LOOKUPS.submit(self.resolver, host, port)
        try:
            return future.result(timeout=max(0.0, timeout))
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"DNS lookup of {host} did not finish in time") from None
