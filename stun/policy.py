"""Which peers a relay may reach: not the server's own networks, unless configured.

An open TURN relay lets anyone on the Internet reach the server's loopback and LAN
(metadata services, databases, admin ports). We deny those ranges by name rather than with
``ipaddress.is_private``, which also covers documentation and benchmarking ranges
(198.18.0.0/15) that test labs use as "public" addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENIED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network", including the unspecified address
        "10.0.0.0/8",  # RFC 1918
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local
        "172.16.0.0/12",  # RFC 1918
        "192.168.0.0/16",  # RFC 1918
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        "::/128",  # unspecified
        "::1/128",  # loopback
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
    )
)


class PeerPolicy:
    """``allows(ip)``: False for denied ranges unless an ``allowed_peers`` CIDR covers it."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        """Raises ValueError for a malformed CIDR."""
        self.allowed = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allowed)

    def allows(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
        if any(ip in network for network in self.allowed):
            return True
        return not any(ip in network for network in DENIED_NETWORKS)
