"""The STUN/TURN server on real loopback sockets, driven by clients we did not write:
aiostun (Binding over UDP, TCP, TLS), aioice (STUN, TURN over UDP/TCP/TLS, ICE through relays
only) and Debian's RFC 3489 ``stun`` client."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioice
import aiostun
import pytest
from aioice import stun as aioice_stun
from aioice import turn as aioice_turn

from stun.credentials import turn_credentials
from stun.service import StunService
from tests.ports import retry_on_port_clash
from tests.stun.live import SECRET, free_port, started, stun_config

TIMEOUT = 20.0


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[StunService]:
    running = await started(tmp_path)
    try:
        yield running
    finally:
        await running.stop()


def address(service: StunService, transport: str) -> tuple[str, int]:
    return service.addresses(transport)[0]  # type: ignore[arg-type]


def credentials(user: str = "alice@localhost", ttl: int = 3600) -> tuple[str, str]:
    return turn_credentials(SECRET, user, ttl, time.time())


def client_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------------------------------
# Binding


@pytest.mark.parametrize(
    "proto", [aiostun.UDP, aiostun.TCP, aiostun.TLS], ids=["udp", "tcp", "tls"]
)
async def test_aiostun_binding(service: StunService, proto: int) -> None:
    transport = {aiostun.UDP: "udp", aiostun.TCP: "tcp", aiostun.TLS: "tls"}[proto]
    host, port = address(service, transport)
    async with aiostun.Client(host=host, port=port, proto=proto, timeout=5) as client:
        mapped = await client.get_mapped_address()
        local = client.get_local_addr()
    assert (mapped["ip"], mapped["port"]) == local[:2]
    assert service.stats.requests["BINDING"] == 1


async def test_aioice_binding(service: StunService) -> None:
    loop = asyncio.get_running_loop()

    class Protocol(asyncio.DatagramProtocol):
        transaction: aioice_stun.Transaction | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            assert self.transaction is not None
            self.transaction.response_received(aioice_stun.parse_message(data), addr)

        def send_stun(self, message: aioice_stun.Message, addr: tuple[str, int]) -> None:
            self.transport.sendto(bytes(message), addr)  # type: ignore[attr-defined]

    transport, protocol = await loop.create_datagram_endpoint(Protocol, local_addr=("127.0.0.1", 0))
    try:
        request = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
        request.add_fingerprint()
        protocol.transaction = aioice_stun.Transaction(request, address(service, "udp"), protocol)
        response, _ = await asyncio.wait_for(protocol.transaction.run(), TIMEOUT)
    finally:
        transport.close()
    assert response.attributes["XOR-MAPPED-ADDRESS"] == transport.get_extra_info("sockname")
    assert response.attributes["SOFTWARE"] == "natterd"
    assert "FINGERPRINT" in response.attributes  # echoed, and checked by aioice's parser


async def test_binding_over_ipv6(tmp_path: Path) -> None:
    try:
        free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")

    async def start() -> StunService:
        port = free_port("::1")
        config = stun_config(tmp_path, host=["::1"], udp_port=port, tcp_port=port, tls_port=0)
        return await StunService.start(config)

    running = await retry_on_port_clash(start)
    port = running.addresses("udp")[0][1]
    try:
        for proto in (aiostun.UDP, aiostun.TCP):
            async with aiostun.Client(
                host="::1", port=port, proto=proto, family=aiostun.IP6, timeout=5
            ) as client:
                mapped = await client.get_mapped_address()
                assert (mapped["ip"], mapped["port"]) == client.get_local_addr()[:2]
    finally:
        await running.stop()


# ---------------------------------------------------------------------------------------------
# TURN with aioice's client


class Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.errors: list[Exception] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr[:2]))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


async def turn_endpoint(
    service: StunService, transport: str = "udp", user: str = "alice@localhost", **kwargs: Any
) -> tuple[aioice_turn.TurnTransport, Receiver]:
    username, password = kwargs.pop("credentials", None) or credentials(user)
    return await asyncio.wait_for(
        aioice_turn.create_turn_endpoint(
            Receiver,
            server_addr=address(service, transport),
            username=username,
            password=password,
            transport="tcp" if transport in ("tcp", "tls") else "udp",
            ssl=client_tls() if transport == "tls" else None,
            **kwargs,
        ),
        TIMEOUT,
    )


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_aioice_turn_relays_between_two_sockets(service: StunService, transport: str) -> None:
    loop = asyncio.get_running_loop()
    turn, receiver = await turn_endpoint(service, transport)
    peer_transport, peer = await loop.create_datagram_endpoint(
        Receiver, local_addr=("127.0.0.1", 0)
    )
    try:
        relayed = turn.get_extra_info("sockname")
        assert relayed[0] == "127.0.0.1"
        turn_server = service.network.core.turn
        assert turn_server is not None
        assert turn_server.settings.min_port <= relayed[1] <= turn_server.settings.max_port
        peer_address = peer_transport.get_extra_info("sockname")
        # aioice binds a channel (which installs the permission), then sends ChannelData.
        turn.sendto(b"ping", peer_address)
        data, source = await asyncio.wait_for(peer.queue.get(), TIMEOUT)
        assert (data, source) == (b"ping", relayed)
        peer_transport.sendto(b"pong", relayed)
        data, source = await asyncio.wait_for(receiver.queue.get(), TIMEOUT)
        assert (data, source) == (b"pong", peer_address)
        # A bigger payload, with a length that needs padding over TCP.
        payload = bytes(range(256)) * 4 + b"xyz"
        turn.sendto(payload, peer_address)
        assert (await asyncio.wait_for(peer.queue.get(), TIMEOUT))[0] == payload
        stats = service.stats
        assert stats.allocations_active == 1
        assert stats.relayed_packets == 3
        assert stats.relayed_bytes == 8 + len(payload)
        assert stats.errors[401] == 1  # the first request, to learn the nonce
    finally:
        peer_transport.close()
        turn.close()
    # Closing deletes the allocation (Refresh with LIFETIME 0).
    for _ in range(100):
        if service.stats.allocations_active == 0:
            break
        await asyncio.sleep(0.05)
    assert service.stats.allocations_active == 0


async def test_data_indication_from_a_permitted_peer(service: StunService) -> None:
    """aioice only accepts Data indications from peers it bound a channel to; use a second
    port of a permitted IP address, which the server reports as a Data indication."""
    loop = asyncio.get_running_loop()
    turn, receiver = await turn_endpoint(service)
    bound_transport, bound = await loop.create_datagram_endpoint(
        Receiver, local_addr=("127.0.0.1", 0)
    )
    try:
        turn.sendto(b"hello", bound_transport.get_extra_info("sockname"))
        await asyncio.wait_for(bound.queue.get(), TIMEOUT)
        relayed = turn.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.1", 0))
            other.sendto(b"via data indication", relayed)
            data, source = await asyncio.wait_for(receiver.queue.get(), TIMEOUT)
            assert (data, source) == (b"via data indication", other.getsockname())
    finally:
        bound_transport.close()
        turn.close()


class IndicationClient(aioice_turn.TurnClientUdpProtocol):
    """aioice's TURN client, keeping the Data indications it would drop without a channel."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.indications: asyncio.Queue[aioice_stun.Message] = asyncio.Queue()

    def datagram_received(self, data: bytes | str, addr: tuple[str, int]) -> None:
        assert isinstance(data, bytes)
        try:
            message = aioice_stun.parse_message(data)
        except ValueError:
            message = None
        if message is not None and message.message_method == aioice_stun.Method.DATA:
            self.indications.put_nowait(message)
        else:
            super().datagram_received(data, addr)


async def test_aioice_create_permission_send_and_data_indications(service: StunService) -> None:
    """CreatePermission and Send/Data indications, encoded by aioice's STUN codec."""
    loop = asyncio.get_running_loop()
    server = address(service, "udp")
    username, password = credentials()
    transport, client = await loop.create_datagram_endpoint(
        lambda: IndicationClient(
            server, username, password, lifetime=600, channel_refresh_time=500
        ),
        remote_addr=server,
    )
    peer_transport, peer = await loop.create_datagram_endpoint(
        Receiver, local_addr=("127.0.0.1", 0)
    )
    try:
        relayed = await asyncio.wait_for(client.connect(), TIMEOUT)
        peer_address = peer_transport.get_extra_info("sockname")
        permission = aioice_stun.Message(
            aioice_stun.Method.CREATE_PERMISSION, aioice_stun.Class.REQUEST
        )
        permission.attributes["XOR-PEER-ADDRESS"] = peer_address
        response, _ = await asyncio.wait_for(client.request_with_retry(permission), TIMEOUT)
        assert response.message_class == aioice_stun.Class.RESPONSE
        send = aioice_stun.Message(aioice_stun.Method.SEND, aioice_stun.Class.INDICATION)
        send.attributes["XOR-PEER-ADDRESS"] = peer_address
        send.attributes["DATA"] = b"sent in an indication"
        client.send_stun(send, server)
        assert await asyncio.wait_for(peer.queue.get(), TIMEOUT) == (
            b"sent in an indication",
            relayed,
        )
        peer_transport.sendto(b"back in an indication", relayed)
        indication = await asyncio.wait_for(client.indications.get(), TIMEOUT)
        assert indication.attributes["XOR-PEER-ADDRESS"] == peer_address
        assert indication.attributes["DATA"] == b"back in an indication"
        await asyncio.wait_for(client.delete(), TIMEOUT)  # Refresh with LIFETIME 0
        assert service.stats.allocations_active == 0
    finally:
        peer_transport.close()
        transport.close()


async def test_aioice_ice_through_relays_only(service: StunService) -> None:
    """Two ICE agents that may use nothing but relayed candidates from our TURN server."""
    agents = []
    for controlling, user in ((True, "alice@localhost"), (False, "bob@localhost")):
        username, password = credentials(user)
        agents.append(
            aioice.Connection(
                ice_controlling=controlling,
                turn_server=address(service, "udp"),
                turn_username=username,
                turn_password=password,
                transport_policy=aioice.TransportPolicy.RELAY,
            )
        )
    a, b = agents
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(a.gather_candidates(), b.gather_candidates())
            for local, remote in ((a, b), (b, a)):
                assert [c.type for c in local.local_candidates] == ["relay"]
                for candidate in local.local_candidates:
                    await remote.add_remote_candidate(candidate)
                await remote.add_remote_candidate(None)
                remote.remote_username = local.local_username
                remote.remote_password = local.local_password
            await asyncio.gather(a.connect(), b.connect())
            await a.send(b"over the relays")
            assert await b.recv() == b"over the relays"
            await b.send(b"and back")
            assert await a.recv() == b"and back"
        assert service.stats.allocations_active == 2
    finally:
        await asyncio.gather(a.close(), b.close())


# ---------------------------------------------------------------------------------------------
# What TURN refuses


@pytest.mark.parametrize(
    "creds",
    [
        turn_credentials(SECRET, "alice@localhost", 60, time.time() - 3600),  # expired
        (f"{int(time.time()) + 3600}:alice@localhost", "guessed"),  # forged
        turn_credentials("another secret", "alice@localhost", 3600, time.time()),  # forged
    ],
    ids=["expired", "wrong-password", "wrong-secret"],
)
async def test_bad_credentials_are_401(service: StunService, creds: tuple[str, str]) -> None:
    with pytest.raises(aioice_stun.TransactionFailed) as info:
        await turn_endpoint(service, credentials=creds)
    assert info.value.response.error_code == 401
    assert service.stats.allocations_total == 0


async def test_loopback_peer_is_403_without_allowed_peers(tmp_path: Path) -> None:
    running = await started(tmp_path, allowed_peers=[])
    try:
        turn, receiver = await turn_endpoint(running)
        try:
            turn.sendto(b"to loopback", ("127.0.0.1", 9))
            for _ in range(200):
                if receiver.errors:
                    break
                await asyncio.sleep(0.02)
            [error] = receiver.errors
            assert isinstance(error, aioice_stun.TransactionFailed)
            assert error.response.error_code == 403
        finally:
            turn.close()
    finally:
        await running.stop()


async def test_user_quota_is_486(tmp_path: Path) -> None:
    running = await started(tmp_path, max_allocations_per_user=1)
    try:
        first, _ = await turn_endpoint(running, "tcp")
        try:
            with pytest.raises(aioice_stun.TransactionFailed) as info:
                await turn_endpoint(running, "udp")
            assert info.value.response.error_code == 486
            other, _ = await turn_endpoint(running, "udp", user="bob@localhost")
            other.close()
        finally:
            first.close()
    finally:
        await running.stop()


async def test_tcp_allocation_goes_with_the_connection(service: StunService) -> None:
    turn, _ = await turn_endpoint(service, "tcp")
    assert service.stats.allocations_active == 1
    turn._TurnTransport__inner_protocol.transport.close()  # type: ignore[attr-defined]
    for _ in range(100):
        if service.stats.allocations_active == 0:
            break
        await asyncio.sleep(0.02)
    assert service.stats.allocations_active == 0


# ---------------------------------------------------------------------------------------------
# RFC 5780 and RFC 3489 clients


async def test_aiostun_rfc5780_change_request(tmp_path: Path) -> None:
    running = await started(tmp_path, alternate_host="127.0.0.2", alternate_port=free_port())
    try:
        primary = address(running, "udp")
        client = aiostun.Client(host=primary[0], port=primary[1], timeout=5)
        await client.connect(remote_addr=False)
        try:
            response = await client.bind_request(remote_addr=primary)
            other = response.get_attribute(aiostun.attribute.AttrOtherAddress).params
            origin = response.get_attribute(aiostun.attribute.AttrResponseOrigin).params
            assert (origin["ip"], origin["port"]) == primary
            assert other["ip"] == "127.0.0.2" and other["port"] != primary[1]
            change = aiostun.AttrChangeRequest(changeIp=True, changePort=True)
            changed = await client.bind_request(attrs=[change], remote_addr=primary)
            origin = changed.get_attribute(aiostun.attribute.AttrResponseOrigin).params
            assert (origin["ip"], origin["port"]) == (other["ip"], other["port"])
        finally:
            client.close()
    finally:
        await running.stop()


@pytest.mark.skipif(
    shutil.which("stun") is None,
    reason="Debian's stun-client is not installed (scripts/install-peers.sh installs it)",
)
async def test_debian_stun_client(tmp_path: Path) -> None:
    """stun 0.97 speaks RFC 3489: no magic cookie, CHANGE-REQUEST, CHANGED-ADDRESS."""
    running = await started(tmp_path, alternate_host="127.0.0.2", alternate_port=free_port())
    try:
        host, port = address(running, "udp")
        process = await asyncio.create_subprocess_exec(
            "stun",
            f"{host}:{port}",
            "-v",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
    finally:
        await running.stop()
    text = output.decode(errors="replace")
    # On loopback there is no NAT: the client must see an open Internet connection.
    assert "Primary: Open" in text, text
    assert running.stats.requests["BINDING"] >= 3
    assert running.stats.errors == {}
