"""Which peers a relay may reach: public unicast addresses only, unless configured.

An open TURN relay lets anyone on the Internet reach the server's loopback and LAN (metadata
services, databases, admin ports) and whatever sits behind the provider's carrier-grade NAT.
So every range in IANA's special-purpose registries (RFC 6890 and its updates, IPv4 and IPv6),
multicast and the reserved blocks are refused unless an ``allowed_peers`` CIDR covers them.
IPv6 peers must be global unicast (2000::/3); addresses that carry an IPv4 address inside
(v4-mapped, NAT64, 6to4, Teredo) are judged by that IPv4 address, since that is where the
packets end up. Sans-IO: a pure function of the address and the configuration.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _networks(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


DENIED_V4: tuple[IPNetwork, ...] = _networks(
    "0.0.0.0/8",  # "this network", including the unspecified address
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # shared address space: carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local
    "172.16.0.0/12",  # RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments (DS-Lite, PCP/TURN anycast, NAT64 discovery)
    "192.0.2.0/24",  # documentation (TEST-NET-1)
    "192.31.196.0/24",  # AS112
    "192.52.193.0/24",  # AMT
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  # RFC 1918
    "192.175.48.0/24",  # AS112 direct delegation
    "198.18.0.0/15",  # benchmarking (RFC 2544): NAT labs allow it explicitly
    "198.51.100.0/24",  # documentation (TEST-NET-2)
    "203.0.113.0/24",  # documentation (TEST-NET-3)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the limited broadcast address 255.255.255.255
)
"""Every IPv4 range of the special-purpose registry, multicast and reserved space."""

GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
"""IPv6 outside it (loopback, unspecified, ULA fc00::/7, link-local, site-local, multicast,
discard 100::/64, local-use NAT64 64:ff9b:1::/48, SRv6 5f00::/16, ...) is never a peer."""

DENIED_V6: tuple[IPNetwork, ...] = _networks(
    "2001::/23",  # IETF protocol assignments (benchmarking 2001:2::/48, ORCHID, AMT, AS112)
    "2001:db8::/32",  # documentation
    "2620:4f:8000::/48",  # AS112 direct delegation
    "3fff::/20",  # documentation (RFC 9637)
)
"""Special-purpose IPv6 ranges inside 2000::/3 (Teredo and 6to4 are judged by their IPv4)."""

NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix (RFC 6052)


def embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address leads to (v4-mapped, NAT64, 6to4, Teredo server and
    client), or None for an address that carries none."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return None


def special_purpose(ip: IPAddress) -> bool:
    """True for an address no relay should reach by default (a pure registry lookup)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in network for network in DENIED_V4)
    inner = embedded_v4(ip)
    if inner is not None:
        return any(special_purpose(v4) for v4 in inner)
    if ip not in GLOBAL_UNICAST_V6:
        return True
    return any(ip in network for network in DENIED_V6)


class PeerPolicy:
    """``allows(ip)``: False for special-purpose ranges unless ``allowed_peers`` covers it."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        """Raises ValueError for a malformed CIDR."""
        self.allowed = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allowed)

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self.allowed)

    def allows(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if self._allowed(ip):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            inner = embedded_v4(ip)
            if inner is not None:  # ::ffff:127.0.0.1 reaches 127.0.0.1
                return all(self._allowed(v4) or not special_purpose(v4) for v4 in inner)
        return not special_purpose(ip)
