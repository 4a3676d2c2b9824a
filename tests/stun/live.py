"""Real sockets for the service tests: free loopback ports and a started StunService."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stun.service import StunService
from tests.ports import free_udp_tcp_port, retry_on_port_clash
from xmpp_server.config import Config, build_config

SECRET = "interop-secret"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP (the config has no "any port": 0 means off)."""
    return free_udp_tcp_port(host)


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
    """A StunService on ports free now, on new ones if something took them meanwhile."""
    return await retry_on_port_clash(lambda: StunService.start(stun_config(tmp_path, **stun)))
