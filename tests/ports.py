"""Ports for tests that must not fight `make run`, each other (pytest -n) or anything else.

A test binds port 0 and reads the real port back whenever the code under test allows it.
Where it cannot (a port handed to a child process, or a listener whose 0 means "off", such as
``[http] port`` or the STUN ports), it takes a port that is free now and starts again on a
new one if something took it meanwhile: ``retry_on_port_clash``.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar

from xmpp_server.config import ComponentsConfig, StunConfig, load_config

T = TypeVar("T")

ATTEMPTS = 8
CLASH_ERRNOS = frozenset({errno.EADDRINUSE})
CLASH_TEXT = "Address already in use"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now. Racy by nature: pass it on only inside
    ``retry_on_port_clash``."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP right now (STUN/TURN listen on both)."""
    family = _family(host)
    for _ in range(100):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def is_port_clash(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says a port was taken."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in CLASH_ERRNOS:
            return True
        if CLASH_TEXT in str(current):
            return True
        if isinstance(current, BaseExceptionGroup):
            return any(is_port_clash(inner) for inner in current.exceptions)
        current = current.__cause__ or current.__context__
    return False


async def retry_on_port_clash(start: Callable[[], Awaitable[T]], attempts: int = ATTEMPTS) -> T:
    """``await start()``, again (it picks its ports anew each call) while a port clashes."""
    for attempt in range(attempts):
        try:
            return await start()
        except Exception as exc:
            if attempt == attempts - 1 or not is_port_clash(exc):
                raise
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def on_free_port(
    make: Callable[[int], AbstractAsyncContextManager[T]],
    free: Callable[[], int] = free_tcp_port,
    attempts: int = ATTEMPTS,
) -> AsyncIterator[T]:
    """Enter ``make(port)`` with a port from ``free()``, on a new port while entering fails
    with a clash. Only entering is retried: a failure inside the block is the test's own."""
    async with contextlib.AsyncExitStack() as stack:

        async def enter() -> T:
            return await stack.enter_async_context(make(free()))

        value = await retry_on_port_clash(enter, attempts)
        yield value


# ------------------------------------------------------------------ the demo's ports, taken

DEMO_CONFIG = Path(__file__).parents[1] / "deploy" / "natterd.demo.toml"
TAKE_DEMO_PORTS_ENV = "NATTER_TEST_TAKE_DEMO_PORTS"


def demo_ports() -> list[tuple[str, socket.SocketKind, int]]:
    """(host, kind, port) of every listener ``make run`` starts, and of natterd's defaults for
    the listeners the demo leaves off (STUN/TURN, components): a test must need none of them."""
    config = load_config(DEMO_CONFIG, env={})
    tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
    host = config.c2s.host[0]
    ports = [
        (tcp, config.c2s.port),
        (tcp, config.c2s.direct_tls_port),
        (tcp, config.http.port),
        (tcp, config.http.tls_port),
    ]
    stun = config.stun if config.stun.enabled else StunConfig()
    ports += [(udp, stun.udp_port), (tcp, stun.tcp_port), (tcp, stun.tls_port)]
    ports += [(udp, stun.alternate_port), (tcp, stun.alternate_port)]
    components = config.components if config.components.enabled else ComponentsConfig()
    ports.append((tcp, components.port))
    return sorted({(host, kind, port) for kind, port in ports if port})


@contextlib.contextmanager
def holding_demo_ports() -> Iterator[list[tuple[str, socket.SocketKind, int]]]:
    """Hold the demo's ports as ``make run`` would, for as long as the block runs; yield the
    ports taken. A port already taken (by the demo itself, or by another pytest worker
    holding them) is taken either way and is left alone."""
    with contextlib.ExitStack() as stack:
        taken = []
        for host, kind, port in demo_ports():
            sock = stack.enter_context(socket.socket(_family(host), kind))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
            else:
                if kind == socket.SOCK_STREAM:
                    sock.listen()
            taken.append((host, kind, port))
        yield taken
