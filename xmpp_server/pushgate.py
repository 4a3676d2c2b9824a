"""``natterd push``: the XEP-0357 app server, run as an XEP-0114 component of natterd.

natterd publishes one pubsub item per notification to this component's domain
(``xmpp_server/modules/push.py``); the gateway answers each publish and forwards it:

* ``device_type = fcm`` (the default): Firebase Cloud Messaging HTTP v1,
  ``POST {fcm_endpoint}/v1/projects/{project}/messages:send`` with a data message
  ``{type, message_count, sender[, body][, call_id, call_media]}`` (android priority high;
  calls live 30 s);
* ``device_type = apns``: Apple Push over HTTP/2 (httpx), ``POST {apns_endpoint}/3/device/
  {token}``; messages are alerts, calls VoIP pushes (``apns-push-type: voip``, topic
  ``<apns_topic>.voip``, expiration 0).

Credentials (``push_auth.py`` signs them): FCM takes an OAuth 2 access token that the gateway
gets from Google with the service-account file (``fcm_service_account``), fetches again a few
minutes before it expires, one fetch at a time, and once more when FCM answers 401. APNs
takes a provider token, an ES256 JWT signed with the .p8 key (``apns_key_file``), reused for
50 minutes and signed again when APNs answers 403 ``ExpiredProviderToken``. Fixed tokens
(``fcm_token``, ``apns_token``) stay for tests and setups that manage tokens elsewhere.

The registration is what the client gave natterd when it enabled push: the pubsub node is
the device token (FCM registration token or APNs device token), the publish options carry
``device_type``. A delivery the push service refuses is answered with an iq error
(``item-not-found`` for a token it no longer knows, else ``service-unavailable``).

Limits for now: there is no publish-options secret check (natterd is the only one that can
reach the component).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from xmpp_server.component import NS_COMPONENT, handshake_digest, to_client_ns
from xmpp_server.config import Config, ConfigError, PushGatewayConfig
from xmpp_server.errors import NS_STREAMS, StanzaError, StreamError
from xmpp_server.modules.push import NS_PUBSUB, NS_PUSH, form_values
from xmpp_server.push_auth import (
    AccessTokenCache,
    Clock,
    ProviderTokenCache,
    ServiceAccount,
    load_apns_key,
    parse_token_response,
    token_request,
)
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


def _read_key_file(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key) from None


class Credentials:
    """What the gateway authenticates with. It outlives reconnections to natterd, so an
    access token or provider token is reused across them."""

    def __init__(
        self,
        config: PushGatewayConfig,
        *,
        service_account: ServiceAccount | None = None,
        apns_key: ec.EllipticCurvePrivateKey | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.config = config
        self.service_account = service_account
        self.clock = clock
        self.fcm_project = config.fcm_project or (
            service_account.project_id if service_account is not None else ""
        )
        self._fcm_tokens = AccessTokenCache(clock)
        self._fcm_lock = asyncio.Lock()
        self._apns: ProviderTokenCache | None = None
        if apns_key is not None:
            self._apns = ProviderTokenCache(
                apns_key, config.apns_key_id, config.apns_team_id, clock
            )

    @classmethod
    def load(cls, config: PushGatewayConfig, clock: Clock = time.time) -> Credentials:
        """Read the key files named in the configuration (``ConfigError`` if one is bad)."""
        account = apns_key = None
        if config.fcm_service_account:
            key = "pushgate.fcm_service_account"
            try:
                account = ServiceAccount.from_json(_read_key_file(config.fcm_service_account, key))
            except ValueError as exc:
                raise ConfigError(f"{config.fcm_service_account}: {exc}", key) from None
        if config.apns_key_file:
            key = "pushgate.apns_key_file"
            try:
                apns_key = load_apns_key(_read_key_file(config.apns_key_file, key))
            except ValueError as exc:
                raise ConfigError(f"{config.apns_key_file}: {exc}", key) from None
        return cls(config, service_account=account, apns_key=apns_key, clock=clock)

    @property
    def fcm_ready(self) -> bool:
        return bool(self.fcm_project) and bool(self.service_account or self.config.fcm_token)

    @property
    def apns_ready(self) -> bool:
        return bool(self._apns or self.config.apns_token) and bool(self.config.apns_topic)

    async def fcm_token(self, client: httpx.AsyncClient) -> str:
        """The access token to send to FCM, fetched first if there is no fresh one."""
        if self.service_account is None:
            return self.config.fcm_token
        token = self._fcm_tokens.current()
        if token is not None:
            return token
        async with self._fcm_lock:
            # Sends that waited here find the token the first one fetched.
            token = self._fcm_tokens.current()
            if token is None:
                token = await self._fetch_fcm_token(client, self.service_account)
            return token

    async def _fetch_fcm_token(self, client: httpx.AsyncClient, account: ServiceAccount) -> str:
        url = account.token_uri
        try:
            response = await client.post(url, data=token_request(account, self.clock()))
        except httpx.HTTPError as exc:
            raise PushFailed(f"{url}: {exc}") from None
        if response.status_code != 200:
            raise PushFailed(f"{url}: HTTP {response.status_code} {response.text[:200]}")
        try:
            token, expires_in = parse_token_response(response.json())
        except ValueError as exc:
            raise PushFailed(f"{url}: {exc}") from None
        self._fcm_tokens.store(token, expires_in)
        log.info("FCM access token for %s, valid %d s", account.client_email, expires_in)
        return token

    def fcm_refused(self, token: str) -> bool:
        """FCM answered 401 to ``token``: whether to retry with a new one."""
        if self.service_account is None:
            return False
        self._fcm_tokens.invalidate(token)
        return True

    def apns_token(self) -> str:
        return self._apns.token() if self._apns is not None else self.config.apns_token

    def apns_refused(self, token: str) -> bool:
        """APNs answered ``ExpiredProviderToken`` to ``token``: whether to retry with a new one."""
        if self._apns is None:
            return False
        self._apns.expired(token)
        return True


class Forwarder:
    """Sends notifications to FCM and APNs over one HTTP/2-capable client."""

    def __init__(self, config: PushGatewayConfig, credentials: Credentials | None = None) -> None:
        self.config = config
        self.credentials = credentials if credentials is not None else Credentials.load(config)
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
        creds = self.credentials
        if not creds.fcm_ready:
            raise PushFailed(
                "FCM is not configured (pushgate.fcm_service_account, or fcm_project and fcm_token)"
            )
        android: dict[str, Any] = {"priority": "high"}
        if n.is_call:
            android["ttl"] = "30s"  # a call that rings late is no use
        body = {"message": {"token": n.token, "data": self._data(n), "android": android}}
        base = self.config.fcm_endpoint.rstrip("/")
        url = f"{base}/v1/projects/{creds.fcm_project}/messages:send"
        token = await creds.fcm_token(self.client)
        response = await self._post(url, {"Authorization": f"Bearer {token}"}, body)
        if response.status_code == 401 and creds.fcm_refused(token):
            log.info("FCM refused the access token; fetching a new one")
            token = await creds.fcm_token(self.client)
            response = await self._post(url, {"Authorization": f"Bearer {token}"}, body)
        _check(url, response)

    async def _apns(self, n: Notification) -> None:
        c, creds = self.config, self.credentials
        if not creds.apns_ready:
            raise PushFailed(
                "APNs is not configured (pushgate.apns_topic and apns_key_file or apns_token)"
            )
        data = self._data(n)
        headers = {"apns-priority": "10"}
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
        token = creds.apns_token()
        response = await self._post(url, headers | {"authorization": f"bearer {token}"}, payload)
        expired = response.status_code == 403 and _apns_reason(response) == "ExpiredProviderToken"
        if expired and creds.apns_refused(token):
            log.info("APNs called the provider token expired; signing a new one")
            token = creds.apns_token()
            headers["authorization"] = f"bearer {token}"
            response = await self._post(url, headers, payload)
        _check(url, response)

    async def _post(
        self, url: str, headers: dict[str, str], body: dict[str, Any]
    ) -> httpx.Response:
        try:
            return await self.client.post(url, headers=headers, json=body)
        except httpx.HTTPError as exc:
            raise PushFailed(f"{url}: {exc}") from None


def _apns_reason(response: httpx.Response) -> str:
    """The ``reason`` of an APNs error answer ("" for success or an unreadable body)."""
    if response.status_code < 300:
        return ""
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("reason", "")) if isinstance(body, dict) else ""


def _check(url: str, response: httpx.Response) -> None:
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
    credentials = Credentials.load(config.pushgate)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    while not stopping.is_set():
        gateway = PushGateway(config.pushgate, Forwarder(config.pushgate, credentials))
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
