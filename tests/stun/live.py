"""Real sockets for the service tests: free loopback ports and a started StunService."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from stun.service import StunService
from xmpp_server.config import Config, build_config

SECRET = "interop-secret"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP (the config has no "any port": 0 means off)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def relay_range() -> tuple[int, int]:
    """Relay ports below the kernel's ephemeral range, so clients rarely collide with them."""
    low = 20000 + 200 * (free_port() % 40)
    return low, low + 199


def stun_config(tmp_path: Path, **stun: Any) -> Config:
    low, high = relay_range()
    port = free_port()
    values: dict[str, Any] = {
        "enabled": True,
        "host": ["127.0.0.1"],
        "udp_port": port,
        "tcp_port": port,
        "tls_port": free_port(),
        "secret": SECRET,
        "realm": "example.org",
        "relay_min_port": low,
        "relay_max_port": high,
        "allowed_peers": ["127.0.0.0/8"],  # every peer here is on loopback
    }
    values.update(stun)
    data = {"server": {"domain": "localhost", "data_dir": str(tmp_path / "data")}, "stun": values}
    return build_config(data, base_dir=tmp_path)


async def started(tmp_path: Path, **stun: Any) -> StunService:
    for attempt in range(5):  # a port picked by free_port() may be taken meanwhile
        try:
            return await StunService.start(stun_config(tmp_path, **stun))
        except OSError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")
