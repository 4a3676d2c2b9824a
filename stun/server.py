"""The STUN server core (sans-IO): Binding (RFC 8489), NAT discovery (RFC 5780), and the
front door of TURN: rate limiting, parsing, authentication and error responses.

Packets that cannot be parsed are dropped without an answer (answering garbage would make
us a reflector); requests that parse but break a rule get an error response, built in one
place (``_error``) from the ``StunError`` a handler raised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from stun.auth import Credentials, LongTermAuth
from stun.binding import binding_success, software_attribute
from stun.errors import StunError
from stun.message import (
    CHANGE_IP,
    CHANGE_PORT,
    ChannelData,
    Class,
    Message,
    Method,
    is_channel_data,
    parse_channel_data,
    parse_message,
)
from stun.network import Address, Endpoint, Network
from stun.ratelimit import RateLimiter
from stun.stats import StunStats
from stun.turn import TurnServer

log = logging.getLogger("natterd.stun")

SOFTWARE = "natterd"
CHANGE_REQUEST = 0x0003
TURN_METHODS = {Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND}


@dataclass(frozen=True)
class Alternate:
    """RFC 5780: two addresses and two ports; a request on any of the four combinations can
    be answered from another one (CHANGE-REQUEST) and names the opposite one (OTHER-ADDRESS)."""

    hosts: tuple[str, str]
    ports: tuple[int, int]

    def covers(self, address: Address) -> bool:
        return address[0] in self.hosts and address[1] in self.ports

    def flip(self, address: Address, change_ip: bool, change_port: bool) -> Address:
        host, port = address
        if change_ip:
            host = self.hosts[1 - self.hosts.index(host)]
        if change_port:
            port = self.ports[1 - self.ports.index(port)]
        return host, port


class StunServer:
    """Feed it packets from clients (``receive``) and from relays (``receive_from_peer``);
    it answers through ``network``. ``turn`` and ``auth`` are None when TURN is off."""

    def __init__(
        self,
        network: Network,
        stats: StunStats,
        limiter: RateLimiter,
        *,
        turn: TurnServer | None = None,
        auth: LongTermAuth | None = None,
        alternate: Alternate | None = None,
        software: str | None = SOFTWARE,
    ) -> None:
        self.network = network
        self.stats = stats
        self.limiter = limiter
        self.turn = turn
        self.auth = auth
        self.alternate = alternate
        self.software = software

    @property
    def software(self) -> str | None:
        """SOFTWARE in every answer to an RFC 8489 request (None: not sent)."""
        return self._software

    @software.setter
    def software(self, value: str | None) -> None:
        self._software = value
        self._software_attribute = software_attribute(value)  # for the fast Binding answer

    # -----------------------------------------------------------------------------------------
    # Input

    def receive(self, data: bytes, endpoint: Endpoint, now: float) -> None:
        """One datagram, or one frame cut from a stream by ``StreamFramer``."""
        if is_channel_data(data):
            self._channel_data(data, endpoint, now)
            return
        if _looks_like_request(data) and not self.limiter.allow(endpoint.client[0], now):
            self.stats.rate_limited += 1
            return
        if self.alternate is None:  # RFC 5780 answers name other addresses: general path
            answer = binding_success(data, endpoint.client, self._software_attribute)
            if answer is not None:
                self.stats.requests["BINDING"] += 1
                self.network.send(endpoint, answer, None)
                return
        try:
            message = parse_message(data, classic=True)
        except ValueError as exc:
            self._drop(endpoint, str(exc))
            return
        if message.classic and message.message_method != Method.BINDING:
            self._drop(endpoint, "RFC 3489 message other than Binding")
            return
        if message.message_class == Class.REQUEST:
            self.stats.requests[message.message_method.name] += 1
            self._request(message, endpoint, now)
        elif message.message_class == Class.INDICATION:
            if message.message_method == Method.SEND and self.turn is not None:
                self.turn.handle_send(message, endpoint, now)
            # Binding indications are keepalives: nothing to do.
        else:
            self._drop(endpoint, f"unexpected {message.message_class.name.lower()}")

    def _channel_data(self, data: bytes, endpoint: Endpoint, now: float) -> None:
        if self.turn is None:
            self._drop(endpoint, "ChannelData without TURN")
            return
        try:
            frame: ChannelData = parse_channel_data(data)
        except ValueError as exc:
            self._drop(endpoint, str(exc))
            return
        self.turn.handle_channel_data(frame, endpoint, now)

    def receive_from_peer(self, relay: Address, data: bytes, peer: Address, now: float) -> None:
        if self.turn is not None:
            self.turn.receive_from_peer(relay, data, peer, now)

    def connection_lost(self, endpoint: Endpoint) -> None:
        if self.turn is not None:
            self.turn.connection_lost(endpoint)

    def tick(self, now: float) -> None:
        """Call about once a second: expires TURN state and forgets idle rate buckets."""
        if self.turn is not None:
            self.turn.expire(now)
        self.limiter.prune(now)

    def _drop(self, endpoint: Endpoint, why: str) -> None:
        self.stats.dropped += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("x %s/%s:%d dropped: %s", endpoint.transport, *endpoint.client, why)

    # -----------------------------------------------------------------------------------------
    # Requests

    def _request(self, request: Message, endpoint: Endpoint, now: float) -> None:
        credentials: Credentials | None = None
        source: Address | None = None
        try:
            if request.message_method == Method.BINDING:
                attributes, source = self._binding(request, endpoint)
            elif request.message_method in TURN_METHODS:
                if self.turn is None or self.auth is None:
                    raise StunError(400, "TURN is not offered here")
                credentials = self.auth.authenticate(request, endpoint.client[0], now)
                if request.unknown:
                    raise StunError(420)
                attributes = self.turn.handle_request(
                    request, endpoint, credentials.username, credentials.user, now
                )
            else:
                raise StunError(400, f"{request.message_method.name} is not a request")
        except StunError as exc:
            response = self._error(request, exc, endpoint, now)
        else:
            response = Message(
                request.message_method, Class.RESPONSE, request.transaction_id, dict(attributes)
            )
        if self.software is not None and not request.classic:
            response.attributes["SOFTWARE"] = self.software
        if credentials is not None:
            credentials.sign(response)
        if "FINGERPRINT" in request.attributes:
            response.add_fingerprint()
        self.network.send(endpoint, bytes(response), source)

    def _error(self, request: Message, error: StunError, endpoint: Endpoint, now: float) -> Message:
        self.stats.errors[error.code] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "> %s/%s:%d %s error %d %s",
                endpoint.transport,
                *endpoint.client,
                request.message_method.name,
                error.code,
                error.reason,
            )
        response = Message(request.message_method, Class.ERROR, request.transaction_id)
        response.attributes["ERROR-CODE"] = (error.code, error.reason)
        if error.code == 420:
            response.attributes["UNKNOWN-ATTRIBUTES"] = request.unknown
        if error.code in (401, 438) and self.auth is not None:
            response.attributes.update(self.auth.challenge(endpoint.client[0], now))
        return response

    def _binding(
        self, request: Message, endpoint: Endpoint
    ) -> tuple[dict[str, Any], Address | None]:
        """The mapped address, and with RFC 5780 where the answer comes from."""
        change = request.attributes.get("CHANGE-REQUEST", 0)
        alternate = self.alternate
        if alternate is not None and not (
            endpoint.transport == "udp" and alternate.covers(endpoint.server)
        ):
            alternate = None
        if change & (CHANGE_IP | CHANGE_PORT) and alternate is None:
            # No second address to answer from: RFC 5780 section 7.2 says 420, as if
            # CHANGE-REQUEST were unknown. (A request without flags changes nothing: fine.)
            request.unknown.append(CHANGE_REQUEST)
        if request.unknown:
            raise StunError(420)
        attributes: dict[str, Any] = {}
        source: Address | None = None
        if request.classic:
            # RFC 3489 clients know nothing of XOR-MAPPED-ADDRESS (RFC 8489 section 12).
            attributes["MAPPED-ADDRESS"] = endpoint.client
        else:
            attributes["XOR-MAPPED-ADDRESS"] = endpoint.client
        if alternate is not None:
            source = alternate.flip(
                endpoint.server, bool(change & CHANGE_IP), bool(change & CHANGE_PORT)
            )
            other = alternate.flip(endpoint.server, True, True)
            if request.classic:
                attributes["SOURCE-ADDRESS"] = source
                attributes["CHANGED-ADDRESS"] = other
            else:
                attributes["RESPONSE-ORIGIN"] = source
                attributes["OTHER-ADDRESS"] = other
        return attributes, source


def _looks_like_request(data: bytes) -> bool:
    """A STUN request, judged from the type's class bits alone, before paying for a parse."""
    return len(data) >= 2 and data[0] & 0xC1 == 0 and data[1] & 0x10 == 0
