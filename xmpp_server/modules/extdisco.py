"""XEP-0215 External Service Discovery: where the STUN/TURN servers are, with TURN credentials.

Clients ask the server's JID for ``<services xmlns='urn:xmpp:extdisco:2'/>`` (optionally
``type='turn'`` and so on) before a call. The list holds the built-in STUN/TURN server
(``[stun]``, when enabled) followed by the services configured here. Every restricted service
(TURN) comes with a fresh time-limited credential for the requester, in the scheme coturn calls
``use-auth-secret``: username ``<expiry>:<bare JID>``, password
``base64(HMAC-SHA1(secret, username))``, valid for ``[stun] credential_ttl`` seconds. A
configured external TURN server therefore accepts these credentials when it shares the
``[stun]`` secret. ``<credentials/>`` asks for a fresh credential for one service.

Only the server's own authenticated users are answered: credentials open a relay.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from stun.credentials import load_secret, turn_credentials
from xmpp_server.errors import BadRequest, Forbidden, ItemNotFound
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_result, qn
from xmpp_server.xml import Element

NS_EXTDISCO = "urn:xmpp:extdisco:2"

ServiceType = Literal["stun", "stuns", "turn", "turns"]
Transport = Literal["udp", "tcp"]


@dataclass(frozen=True)
class ExternalService:
    """One service run outside natterd, e.g. a coturn sharing the ``[stun]`` secret."""

    host: str
    type: ServiceType = "turn"
    port: int = field(default=3478, metadata={"min": 1, "max": 65535})
    transport: Transport = "udp"
    restricted: bool = False
    """Needs credentials: handed out in the ``use-auth-secret`` scheme with the [stun] secret."""


@dataclass(frozen=True)
class ExtDiscoOptions:
    services: tuple[ExternalService, ...] = ()
    """Advertised after the built-in server's services (the only ones when [stun] is off)."""


@dataclass(frozen=True)
class Service:
    type: str
    host: str
    port: int
    transport: str
    restricted: bool


def xep0082(timestamp: float) -> str:
    """An XEP-0082 DateTime in UTC, to the second."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class ExtDisco(Module):
    name = "extdisco"
    options_class = ExtDiscoOptions
    features = (NS_EXTDISCO,)
    options: ExtDiscoOptions
    _secret: str | None = None  # loaded on first use: no secret file unless one is needed

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "host", NS_EXTDISCO, "services"), self.on_services)
        router.add_iq(IqKey("get", "host", NS_EXTDISCO, "credentials"), self.on_credentials)

    def services(self) -> list[Service]:
        """The built-in server's services (when it runs), then the configured ones."""
        found: list[Service] = []
        stun = self.host.config.stun
        if stun.enabled:
            host = stun.public_host or (stun.host[0] if stun.host else "")
            if not host or _is_wildcard(host):
                host = self.host.domain  # listening everywhere: the domain names this machine
            listeners = [("udp", stun.udp_port), ("tcp", stun.tcp_port)]
            for transport, port in listeners:
                if port:
                    found.append(Service("stun", host, port, transport, False))
            if stun.turn:
                for transport, port in listeners:
                    if port:
                        found.append(Service("turn", host, port, transport, True))
                if stun.tls_port:
                    found.append(Service("turns", host, stun.tls_port, "tcp", True))
        for ext in self.options.services:
            found.append(Service(ext.type, ext.host, ext.port, ext.transport, ext.restricted))
        return found

    def _requester(self, iq: Element) -> JID:
        requester = JID.parse(iq.get("from", ""))
        if requester.domain != self.host.domain or not requester.local:
            raise Forbidden("external services are for this server's users")
        return requester.bare

    def _element(self, service: Service, user: JID, now: float) -> Element:
        attrs = {
            "type": service.type,
            "host": service.host,
            "port": str(service.port),
            "transport": service.transport,
        }
        if service.restricted:
            if self._secret is None:
                self._secret = load_secret(self.host.config)
            ttl = self.host.config.stun.credential_ttl
            username, password = turn_credentials(self._secret, str(user), ttl, now)
            expiry = int(username.split(":", 1)[0])
            attrs.update(
                restricted="1", username=username, password=password, expires=xep0082(expiry)
            )
        return Element(qn(NS_EXTDISCO, "service"), attrs)

    async def on_services(self, origin: Session | None, iq: Element) -> None:
        user = self._requester(iq)
        request = iq.find(qn(NS_EXTDISCO, "services"))
        wanted = request.get("type") if request is not None else None
        result = Element(qn(NS_EXTDISCO, "services"))
        if wanted:
            result.set("type", wanted)
        now = time.time()
        for service in self.services():
            if not wanted or service.type == wanted:
                result.append(self._element(service, user, now))
        if origin is not None:
            origin.deliver(iq_result(iq, result))

    async def on_credentials(self, origin: Session | None, iq: Element) -> None:
        """XEP-0215 §3.3: fresh credentials for the services named by type and host (and port)."""
        user = self._requester(iq)
        request = iq.find(qn(NS_EXTDISCO, "credentials"))
        asked = request.findall(qn(NS_EXTDISCO, "service")) if request is not None else []
        if not asked:
            raise BadRequest("name a service: <service type='…' host='…'/>")
        result = Element(qn(NS_EXTDISCO, "credentials"))
        now = time.time()
        services = self.services()
        for want in asked:
            type_, host, port = want.get("type"), want.get("host"), want.get("port")
            if not type_ or not host:
                raise BadRequest("a service needs a type and a host")
            matches = [
                s
                for s in services
                if s.type == type_ and s.host == host and (not port or str(s.port) == port)
            ]
            if not matches:
                raise ItemNotFound("no such service")
            result.extend(self._element(s, user, now) for s in matches)
        if origin is not None:
            origin.deliver(iq_result(iq, result))
