"""Clients that connect from other loopback addresses (127.0.0.2, ...), so a test can play
many source addresses on one machine, as attackers on other networks would."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.e2e.harness import Client

OWNER = "127.0.0.1"


class FromSource:
    """Mixin for a slixmpp client: its connection comes from ``self.source``."""

    source = OWNER

    async def _attempt_connection(
        self: Any, host: str, port: int, tls: bool, server_hostname: str | None
    ) -> bool:
        self.event_when_connected = "connected"
        try:
            await self.loop.create_connection(
                lambda: self, host, port, local_addr=(self.source, 0)
            )
        except OSError as exc:
            self.event("connection_failed", exc)
            return False
        return True


class SourcedClient(FromSource, Client):
    def __init__(self, *args: Any, source: str = OWNER, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source


def _loopback_aliases_work() -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


needs_loopback_aliases = pytest.mark.skipif(
    not _loopback_aliases_work(), reason="127.0.0.2 is not a local address here"
)
