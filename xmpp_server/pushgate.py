"""``natterd push``: the XEP-0357 app server, run as an XEP-0114 component of natterd.

natterd publishes one pubsub item per notification to this component's domain
(``xmpp_server/modules/push.py``); the gateway answers each publish and forwards it:

* ``device_type = fcm`` (the default): Firebase Cloud Messaging HTTP v1,
  ``POST {fcm_endpoint}/v1/projects/{fcm_project}/messages:send`` with a bearer token and a
  data message ``{type, message_count, sender[, body][, call_id, call_media]}``
  (android priority high; calls live 30 s);
* ``device_type = apns``: Apple Push over HTTP/2 (httpx), ``POST {apns_endpoint}/3/device/
  {token}`` with the provider token; messages are alerts, calls VoIP pushes
  (``apns-push-type: voip``, topic ``<apns_topic>.voip``, expiration 0).

The registration is what the client gave natterd when it enabled push: the pubsub node is
the device token (FCM registration token or APNs device token), the publish options carry
``device_type``. A delivery the push service refuses is answered with an iq error
(``item-not-found`` for a token it no longer knows, else ``service-unavailable``).

Limits for now: the FCM token and the APNs JWT are static configuration values (OAuth 2
service-account refresh and JWT signing from a .p8 key are not built yet); there is no
publish-options secret check (natterd is the only one that can reach the component).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import httpx

from xmpp_server.component import NS_COMPONENT, handshake_digest, to_client_ns
from xmpp_server.config import Config, PushGatewayConfig
from xmpp_server.errors import NS_STREAMS, StanzaError, StreamError
from xmpp_server.modules.push import NS_PUBSUB, NS_PUSH, form_values
from xmpp_server.stanza import IQ, error_reply, iq_result, qn
from xmpp_server.xml import (
    NS_CLIENT,
    Element,
    ElementReceived,
    StreamClosed,
    StreamOpened,
    XmlStreamParser,
    escape_attr,
    tobytes,
)

log = logging.getLogger("natterd.push")

RECONNECT_DELAY = 5.0


@dataclass(frozen=True, slots=True)
class Notification:
    token: str  # the pubsub node
    device_type: str  # "fcm" or "apns"
    summary: dict[str, str]  # urn:xmpp:push:summary fields
    options: dict[str, str]  # publish options

    @property
    def is_call(self) -> bool:
        return self.summary.get("last-message-priority") == "high"


def parse_publish(iq: Element) -> Notification | None:
    """The notification in a pubsub publish iq, None if it is not one."""
    publish = iq.find(f"{qn(NS_PUBSUB, 'pubsub')}/{qn(NS_PUBSUB, 'publish')}")
    if publish is None:
        return None
    notification = publish.find(f"{qn(NS_PUBSUB, 'item')}/{qn(NS_PUSH, 'notification')}")
    summary = form_values(
        notification.find(qn("jabber:x:data", "x")) if notification is not None else None
    )
    options_el = iq.find(
        f"{qn(NS_PUBSUB, 'pubsub')}/{qn(NS_PUBSUB, 'publish-options')}/{qn('jabber:x:data', 'x')}"
    )
    options = form_values(options_el)
    return Notification(
        publish.get("node", ""), options.get("device_type", "fcm"), summary, options
    )


class PushFailed(Exception):
    def __init__(self, message: str, *, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone  # the push service does not know the token (any more)


class Forwarder:
    """Sends notifications to FCM and APNs over one HTTP/2-capable client."""

    def __init__(self, config: PushGatewayConfig) -> None:
        self.config = config
        self.client = httpx.AsyncClient(http2=True, timeout=config.timeout)

    async def close(self) -> None:
        await self.client.aclose()

    async def send(self, n: Notification) -> None:
        if not n.token:
            raise PushFailed("no device token (pubsub node)", gone=True)
        if n.device_type == "apns":
            await self._apns(n)
        elif n.device_type == "fcm":
            await self._fcm(n)
        else:
            raise PushFailed(f"unknown device_type {n.device_type!r}", gone=True)

    def _data(self, n: Notification) -> dict[str, str]:
        s = n.summary
        data = {
            "type": "call" if n.is_call else "message",
            "message_count": s.get("message-count", "1"),
        }
        for src, dst in (
            ("last-message-sender", "sender"),
            ("last-message-body", "body"),
            ("call-id", "call_id"),
            ("call-media", "call_media"),
        ):
            if s.get(src):
                data[dst] = s[src]
        return data

    async def _fcm(self, n: Notification) -> None:
        c = self.config
        if not c.fcm_project:
            raise PushFailed("FCM is not configured (pushgate.fcm_project)")
        android: dict[str, Any] = {"priority": "high"}
        if n.is_call:
            android["ttl"] = "30s"  # a call that rings late is no use
        body = {"message": {"token": n.token, "data": self._data(n), "android": android}}
        url = f"{c.fcm_endpoint.rstrip('/')}/v1/projects/{c.fcm_project}/messages:send"
        headers = {"Authorization": f"Bearer {c.fcm_token}"}
        await self._post(url, headers, body)

    async def _apns(self, n: Notification) -> None:
        c = self.config
        if not c.apns_token or not c.apns_topic:
            raise PushFailed("APNs is not configured (pushgate.apns_token, apns_topic)")
        data = self._data(n)
        headers = {"authorization": f"bearer {c.apns_token}", "apns-priority": "10"}
        payload: dict[str, Any]
        if n.is_call:
            headers |= {
                "apns-push-type": "voip",
                "apns-topic": f"{c.apns_topic}.voip",
                "apns-expiration": "0",
            }
            payload = {"aps": {}, **data}
        else:
            headers |= {"apns-push-type": "alert", "apns-topic": c.apns_topic}
            alert = {"title": data.get("sender", "New message"), "body": data.get("body", "")}
            if not alert["body"]:
                alert["body"] = "New message"
            badge = int(data["message_count"]) if data["message_count"].isdigit() else 1
            payload = {
                "aps": {"alert": alert, "badge": badge, "sound": "default", "mutable-content": 1},
                **data,
            }
        url = f"{c.apns_endpoint.rstrip('/')}/3/device/{n.token}"
        await self._post(url, headers, payload)

    async def _post(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        try:
            response = await self.client.post(url, headers=headers, json=body)
        except httpx.HTTPError as exc:
            raise PushFailed(f"{url}: {exc}") from None
        if response.status_code >= 300:
            gone = response.status_code in (400, 404, 410)
            raise PushFailed(f"{url}: HTTP {response.status_code} {response.text[:200]}", gone=gone)


class PushGateway:
    """One component connection to natterd; ``start`` connects and shakes hands."""

    def __init__(self, config: PushGatewayConfig, forwarder: Forwarder | None = None) -> None:
        self.config = config
        self.forwarder = forwarder or Forwarder(config)
        self.sent = 0  # notifications forwarded
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = XmlStreamParser()
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        c = self.config
        self._reader, self._writer = await asyncio.open_connection(c.server_host, c.server_port)
        self._writer.write(
            f"<?xml version='1.0'?><stream:stream xmlns='{NS_COMPONENT}' "
            f"xmlns:stream='{NS_STREAMS}' to='{escape_attr(c.domain)}'>".encode()
        )
        stream_id: str | None = None
        while True:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("natterd closed the component stream")
            for ev in self._parser.feed(data):
                if isinstance(ev, StreamOpened):
                    stream_id = ev.attrs.get("id", "")
                    digest = handshake_digest(stream_id, c.secret)
                    self._writer.write(f"<handshake>{digest}</handshake>".encode())
                elif isinstance(ev, ElementReceived):
                    if ev.element.tag == qn(NS_COMPONENT, "handshake"):
                        log.info("connected to natterd as %s", c.domain)
                        self._task = asyncio.create_task(self._read_loop())
                        return
                    raise ConnectionError(f"handshake refused: {ET.tostring(ev.element)!r}")
                elif isinstance(ev, StreamClosed):
                    raise ConnectionError("natterd closed the component stream")

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(b"</stream:stream>")
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        await self.forwarder.close()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while data := await self._reader.read(65536):
                for ev in self._parser.feed(data):
                    if isinstance(ev, StreamClosed):
                        return
                    if isinstance(ev, ElementReceived):
                        stanza = to_client_ns(ev.element)
                        if stanza.tag == IQ and stanza.get("type") in ("set", "get"):
                            task = asyncio.create_task(self._handle_iq(stanza))
                            self._pending.add(task)
                            task.add_done_callback(self._pending.discard)
        except (ConnectionError, OSError, StreamError) as exc:
            log.warning("component stream ended: %s", exc)

    def _send(self, stanza: Element) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(tobytes(stanza, NS_CLIENT))

    async def _handle_iq(self, iq: Element) -> None:
        notification = parse_publish(iq) if iq.get("type") == "set" else None
        if notification is None:
            self._send(error_reply(iq, StanzaError(condition="feature-not-implemented")))
            return
        try:
            await self.forwarder.send(notification)
        except PushFailed as exc:
            log.warning("push to %s failed: %s", notification.device_type, exc)
            condition = "item-not-found" if exc.gone else "service-unavailable"
            self._send(error_reply(iq, StanzaError(str(exc), condition=condition)))
            return
        self.sent += 1
        self._send(iq_result(iq))


async def serve(config: Config) -> None:
    """Run until SIGINT/SIGTERM, reconnecting to natterd when the stream breaks."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    while not stopping.is_set():
        gateway = PushGateway(config.pushgate)
        try:
            await gateway.start()
            done = asyncio.ensure_future(gateway.wait_closed())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([done, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            done.cancel()
        except (ConnectionError, OSError, StreamError) as exc:
            log.warning("cannot reach natterd: %s", exc)
        finally:
            await gateway.stop()
        if not stopping.is_set():
            try:
                async with asyncio.timeout(RECONNECT_DELAY):
                    await stopping.wait()
            except TimeoutError:
                pass
