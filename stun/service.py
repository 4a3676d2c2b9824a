"""The STUN/TURN service as natterd runs it: ``[stun]`` config in, listening sockets out.

``StunService.start(config)`` / ``stop()`` are what ``xmpp_server.server`` calls when
``[stun] enabled = true``; ``serve(config)`` is ``natterd stun``, the service alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from stun.auth import LongTermAuth, Nonces
from stun.credentials import load_secret
from stun.network import Address, Transport
from stun.policy import PeerPolicy
from stun.ratelimit import RateLimiter
from stun.server import Alternate, StunServer
from stun.stats import StunStats
from stun.transport import SocketNetwork
from stun.turn import RelayHost, TurnServer, TurnSettings
from xmpp_server import tls
from xmpp_server.config import Config, ConfigError, StunConfig

log = logging.getLogger("natterd.stun")

TICK = 1.0  # seconds between expiry sweeps
WORKER_START = 30.0  # seconds a worker process has to open its sockets
ALPN = ["stun.turn", "stun.nat-discovery"]  # RFC 7443
_PROBES = {4: ("192.0.2.1", socket.AF_INET), 6: ("2001:db8::1", socket.AF_INET6)}


def _version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _unspecified(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def _route_address(version: int) -> str | None:
    """This host's address on the default route: connecting a UDP socket sends nothing."""
    probe, family = _PROBES[version]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((probe, 9))
        except OSError:
            return None
        return str(sock.getsockname()[0])


def relay_hosts(
    stun: StunConfig, route_address: Callable[[int], str | None] = _route_address
) -> dict[int, RelayHost]:
    """Where relays bind, per IP version, and the address clients are told.

    ``relay_host`` (or else the first ``host`` of each family) is bound; a wildcard there is
    advertised as ``public_host`` when that is an address of the family, or else as this
    host's address on the default route.
    """
    hosts: dict[int, RelayHost] = {}
    candidates = [stun.relay_host] if stun.relay_host else list(stun.host)
    for host in candidates:
        version = _version(host)
        if version is None:
            raise ConfigError(f"expected an IP address, got {host!r}", "stun.relay_host")
        if version in hosts:
            continue
        advertised = host
        if _unspecified(host):
            found = stun.public_host if _version(stun.public_host) == version else None
            found = found or route_address(version)
            if found is None:
                log.warning("no IPv%d address to advertise for relays on %s", version, host)
                continue
            advertised = found
        hosts[version] = RelayHost(host, advertised)
    return hosts


def alternate(stun: StunConfig) -> Alternate | None:
    """RFC 5780's second address and port, paired with the first concrete ``host``."""
    if not stun.alternate_host:
        return None
    version = _version(stun.alternate_host)
    if version is None:
        raise ConfigError(
            f"expected an IP address, got {stun.alternate_host!r}", "stun.alternate_host"
        )
    primary = next((h for h in stun.host if _version(h) == version and not _unspecified(h)), None)
    if primary is None:
        raise ConfigError(
            f"needs a specific IPv{version} address in stun.host to pair with",
            "stun.alternate_host",
        )
    if stun.udp_port == 0 or stun.alternate_port in (0, stun.udp_port):
        raise ConfigError(
            "needs stun.udp_port and a different stun.alternate_port", "stun.alternate_host"
        )
    # As sockets spell them, so that the addresses requests arrive on compare equal.
    hosts = (str(ipaddress.ip_address(primary)), str(ipaddress.ip_address(stun.alternate_host)))
    return Alternate(hosts, (stun.udp_port, stun.alternate_port))


@dataclass(frozen=True)
class Listener:
    transport: Transport
    address: Address


class StunService:
    """The running STUN/TURN server; ``stats`` holds its counters."""

    def __init__(self, network: SocketNetwork, stats: StunStats) -> None:
        self.network = network
        self.stats = stats  # this process's counters (each worker keeps its own)
        self.listeners: list[Listener] = []
        self.workers: list[BaseProcess] = []
        self._tick: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, config: Config, clock: Callable[[], float] = time.time, *, worker: bool = False
    ) -> StunService:
        """Open every configured listener, and start ``stun.workers - 1`` more processes on
        the same ports (``worker``: this is one of them); raises ConfigError or OSError
        (port in use) or RuntimeError (a worker failed)."""
        stun = config.stun
        if stun.relay_min_port > stun.relay_max_port:
            raise ConfigError("must not exceed stun.relay_max_port", "stun.relay_min_port")
        try:
            policy = PeerPolicy(stun.allowed_peers)
        except ValueError as exc:
            raise ConfigError(str(exc), "stun.allowed_peers") from None
        pairing = alternate(stun)
        stats = StunStats()
        turn: TurnServer | None = None
        auth: LongTermAuth | None = None

        def core(network: SocketNetwork) -> StunServer:
            nonlocal turn, auth
            if stun.turn:
                settings = TurnSettings(
                    relay_hosts=relay_hosts(stun),
                    min_port=stun.relay_min_port,
                    max_port=stun.relay_max_port,
                    max_allocations=stun.max_allocations,
                    max_allocations_per_user=stun.max_allocations_per_user,
                )
                turn = TurnServer(settings, network, policy, stats)
                realm = stun.realm or config.server.domain
                auth = LongTermAuth(realm, load_secret(config), Nonces(os.urandom(32)))
            limiter = RateLimiter(stun.rate, stun.burst)
            return StunServer(network, stats, limiter, turn=turn, auth=auth, alternate=pairing)

        network = SocketNetwork(core, clock, reuse_port=stun.workers > 1)
        service = cls(network, stats)
        try:
            await service._listen(config, pairing)
            if not worker:
                await service._start_workers(config, stun.workers - 1)
        except BaseException:
            await service._stop_workers()
            await network.close()
            raise
        service._tick = asyncio.create_task(service._run_ticks(clock))
        return service

    async def _start_workers(self, config: Config, count: int) -> None:
        """Spawned, not forked: a fork would copy this process's event loop and sockets."""
        context = multiprocessing.get_context("spawn")
        for number in range(1, count + 1):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker_main,
                args=(config, os.getpid(), sender),
                name=f"natterd-stun-{number}",
                daemon=True,
            )
            process.start()
            sender.close()
            self.workers.append(process)
            answered = await asyncio.to_thread(receiver.poll, WORKER_START)
            problem = receiver.recv() if answered else "did not start in time"
            receiver.close()
            if problem:
                raise RuntimeError(f"STUN worker {number}: {problem}")
        if count:
            log.info("STUN: %d more worker processes on the same ports", count)

    async def _stop_workers(self) -> None:
        for process in self.workers:
            if process.is_alive():
                process.terminate()
        for process in self.workers:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()
        self.workers.clear()

    async def _listen(self, config: Config, pairing: Alternate | None) -> None:
        stun = config.stun
        udp: list[Address] = []
        if stun.udp_port:
            udp = [(host, stun.udp_port) for host in stun.host]
        if pairing is not None:
            (first, second), (port, other_port) = pairing.hosts, pairing.ports
            udp += [(first, other_port), (second, port), (second, other_port)]
        for address in udp:
            self.listeners.append(Listener("udp", await self.network.listen_udp(address)))
        if stun.tcp_port:
            for bound in await self.network.listen_stream(list(stun.host), stun.tcp_port, None):
                self.listeners.append(Listener("tcp", bound))
        if stun.tls_port:
            cert, key = tls.ensure_certificate(config)
            context = tls.server_context(cert, key, config.tls.min_version)
            context.set_alpn_protocols(ALPN)
            hosts = list(stun.host)
            for bound in await self.network.listen_stream(hosts, stun.tls_port, context):
                self.listeners.append(Listener("tls", bound))
        for listener in self.listeners:
            log.info("STUN listening on %s %s:%d", listener.transport, *listener.address)
        if self.network.core.turn is not None:
            for version, host in self.network.core.turn.settings.relay_hosts.items():
                log.info(
                    "TURN relays on %s, advertised as %s (IPv%d)",
                    host.bind,
                    host.advertised,
                    version,
                )

    async def _run_ticks(self, clock: Callable[[], float]) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.network.core.tick(clock())
            except Exception:  # a bug here must not stop expiry for good
                log.exception("STUN expiry sweep failed")

    def addresses(self, transport: Transport) -> list[Address]:
        """Where the service listens on ``transport`` (with the ports actually bound)."""
        return [item.address for item in self.listeners if item.transport == transport]

    async def stop(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
        await self._stop_workers()
        await self.network.close()
        log.info("STUN stopped: %s", self.stats.snapshot())


async def serve(config: Config) -> None:
    """Run the STUN/TURN server alone until SIGINT/SIGTERM (``natterd stun``)."""
    service = await StunService.start(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await service.stop()


def _worker_main(config: Config, parent: int, ready: Connection) -> None:
    """An extra STUN process (``[stun] workers``): the parent's Ctrl-C and SIGTERM are the
    parent's to handle; it stops this one, or this one stops when the parent is gone."""
    from xmpp_server.cli import loop_factory

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=loop_factory(config.server.event_loop)) as runner:
        runner.run(_worker(config, parent, ready))


async def _worker(config: Config, parent: int, ready: Connection) -> None:
    try:
        service = await StunService.start(config, worker=True)
    except (ConfigError, OSError) as exc:
        ready.send(str(exc))
        return
    ready.send("")
    ready.close()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    try:
        while not stopping.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), TICK)
    finally:
        await service.stop()
