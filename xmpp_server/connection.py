"""The asyncio shell around one client socket: read, feed the stream, act on its events, write."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from xmpp_server import stream as st
from xmpp_server.errors import (
    BadRequest,
    ServiceUnavailable,
    StanzaError,
    StreamError,
)
from xmpp_server.jid import JID
from xmpp_server.sm import Pending, StreamManagement
from xmpp_server.stanza import IQ, MESSAGE, qn
from xmpp_server.storage.errors import STORAGE_DOWN
from xmpp_server.xml import Element

if TYPE_CHECKING:
    from xmpp_server.server import Host

log = logging.getLogger("natterd.c2s")

READ_SIZE = 65536
NS_DELAY = "urn:xmpp:delay"


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the connection's identity: ``[alice@example.org/phone]``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['id']}] {msg}", kwargs  # type: ignore[index]


class Connection:
    """One client connection; once bound it is the router's ``Session``."""

    def __init__(
        self,
        host: Host,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        direct_tls: bool,
    ) -> None:
        self.host = host
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.ip: str = peer[0] if peer else "?"
        self.log = ConnectionLog(log, {"id": f"{self.ip}"})
        settings = host.stream_settings
        self.stream = st.Stream(
            settings, tls=direct_tls, bindings=host.bindings if direct_tls else None
        )
        # Session state (router.Session protocol).
        self.jid: JID = JID(None, host.domain)
        self.available = False
        self.priority = 0
        self.presence: Element | None = None
        self.interested = False
        self.directed: set[JID] = set()
        self.bound = False
        # XEP-0198: the session's SM state; a detached session waits to be resumed.
        self.sm: StreamManagement | None = None
        self.detached = False
        self._resumable_end = False  # the transport died: keep the session for resumption
        self._replaced = False  # a resuming connection took this session over
        self._ended = False  # end_session ran: deliveries take the lost path
        self._auth_deadline: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._unbound = asyncio.Event()
        self._rescue: deque[Element] = deque()  # unconfirmed stanzas being rerouted
        self._ack_requested = False
        # Mailbox operations this session's stanzas queued (xmpp_server.mailbox): an ack
        # (XEP-0198 <a/>, a resumption, the answer to the next iq) waits until they commit.
        self._settle_seq = 0
        self._closing = False
        self._flush_pending = False
        self._tokens = float(host.config.c2s.read_burst)
        self._last_refill = time.monotonic()
        # XEP-0352: while the client says it is inactive, ``host.inactive_policy`` decides
        # per stanza to send it, hold it (latest presence per sender) or drop it.
        self.inactive = False
        self._held: dict[str, tuple[Element, Callable[[], None] | None]] = {}

    # -- Session protocol -------------------------------------------------------------

    def deliver(
        self,
        stanza: Element,
        on_ack: Callable[[], None] | None = None,
        on_lost: Callable[[Element], None] | None = None,
        data: bytes | None = None,
    ) -> None:
        """Send ``stanza``. ``on_ack`` runs once the client confirmed it (XEP-0198) or, without
        stream management, once it was written; ``on_lost`` runs instead when the session
        ends without confirmation (default: give a message to another resource or offline
        storage). ``data`` is ``stanza`` already serialized (a fan-out serializes once).

        Output is written once per event-loop pass: everything a connection gets in one
        pass (a burst of messages, a room's broadcasts) goes out in one TLS record and one
        send() instead of one each."""
        if self._ended:
            # A session that is over (a stale reference, a hook still running): never write
            # into the void, give the stanza the path of one the client never received.
            self._lost(Pending(stanza, on_ack, on_lost))
            return
        if self.inactive and self.host.inactive_policy is not None:
            verdict = self.host.inactive_policy(stanza)
            if verdict != "send":
                if verdict == "hold":
                    key = stanza.get("from", "")
                    old = self._held.pop(key, None)  # the newest goes to the end
                    self._held[key] = (stanza, on_ack)
                    if old is not None and old[1] is not None:
                        old[1]()
                elif on_ack is not None:
                    on_ack()
                return
        sm = self.sm
        if sm is not None:
            if not sm.track(Pending(stanza, on_ack, on_lost)):
                self.terminate(StreamError("resource-constraint", "too many unacknowledged"))
                return
            if self.detached or self._closing:
                return
            self._send(stanza, data)
            if not self._ack_requested:
                # One <r/> after the current burst of output, not one per stanza.
                self._ack_requested = True
                asyncio.get_running_loop().call_soon(self._request_ack)
            return
        if self._closing:
            self._lost(Pending(stanza, on_ack, on_lost))
            return
        self._send(stanza, data)
        if on_ack is not None:
            on_ack()

    def set_inactive(self, inactive: bool) -> None:
        """XEP-0352 ``<inactive/>``/``<active/>``; becoming active sends what was held."""
        self.inactive = inactive
        if not inactive:
            held, self._held = self._held, {}
            for stanza, on_ack in held.values():
                self.deliver(stanza, on_ack)

    def _send(self, stanza: Element, data: bytes | None) -> None:
        if data is None:
            self.stream.send(stanza)
        else:
            self.stream.send_serialized(data)
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_pending = False
        self._flush()

    def _request_ack(self) -> None:
        if self.sm is not None and self.sm.queue and not self.detached and not self._closing:
            self.stream.request_ack()
            self._flush()

    def terminate(self, error: StreamError) -> None:
        self.log.info("closing: %s", error.condition)
        if self.detached:
            self._schedule(self.end_session())
            return
        self.stream.close(error)
        self._flush()
        self._close_transport()

    # -- main loop --------------------------------------------------------------------

    async def run(self) -> None:
        self.log.info("connected")
        # Counted from connect, not from the last byte: a client trickling a byte now and
        # then keeps the idle timer happy but must still log in within auth_timeout.
        self._auth_deadline = asyncio.get_running_loop().call_later(
            self.host.config.c2s.auth_timeout, self._auth_expired
        )
        try:
            await self._read_loop()
        except (OSError, asyncio.IncompleteReadError) as exc:
            # OSError covers ConnectionError and ssl.SSLError: a TLS peer that keeps writing
            # after our close_notify, or that closes without one, is a lost connection.
            self.log.info("connection lost: %s", exc)
        except Exception:
            self.log.exception("connection failed")
            self._step("error", self._internal_error)
        finally:
            # Teardown runs whatever ended the stream, cancellation included: a session left
            # bound after its socket died swallows messages and never gives back its queue.
            # It runs as its own task, so cancelling this one does not cut it short; then
            # ``Server.stop`` waits for it with the rest of ``host.background``.
            task = asyncio.ensure_future(self._teardown())
            self.host.background.add(task)
            task.add_done_callback(self.host.background.discard)
            await asyncio.shield(task)

    def _auth_expired(self) -> None:
        """RFC 6120 §4.9.3.14 ``policy-violation``, not ``connection-timeout`` (§4.9.3.4):
        the peer may well be sending, it has just not logged in within the time allowed."""
        self._auth_deadline = None
        if self.bound or self._closing:
            return
        timeout = self.host.config.c2s.auth_timeout
        self.terminate(StreamError("policy-violation", f"not logged in within {timeout:g} s"))

    def _cancel_auth_deadline(self) -> None:
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
            self._auth_deadline = None

    def _internal_error(self) -> None:
        self.stream.close(StreamError("internal-server-error"))
        self._flush()

    def _step(self, name: str, action: Callable[[], object]) -> None:
        """One teardown step; its failure is logged and the next step runs anyway."""
        try:
            action()
        except StreamError as exc:
            # Input the parser still held when it was let go (text after the last stanza).
            self.log.info("teardown: %s: %s", name, exc.condition)
        except Exception:
            self.log.exception("teardown step %r failed", name)

    async def _teardown(self) -> None:
        self._closing = True
        self._cancel_auth_deadline()
        self._step("close transport", self._close_transport)
        self._step("release parser", self.stream.no_more_input)
        if self._replaced or not self.bound:
            self.log.info("disconnected")
            return
        if self.sm is not None and self.sm.resumable and self._resumable_end:
            self._step("detach", self._detach)
            if self.detached:
                return
        try:
            await self.end_session()
        except Exception:
            self.log.exception("ending the session failed")
        self.log.info("disconnected")

    # -- session end and resumption (XEP-0198) ----------------------------------------

    def _detach(self) -> None:
        """Keep the session (presence, queue) for a client that may come back and resume."""
        timeout = self.host.config.c2s.resume_timeout
        self.detached = True
        self.log.info("connection lost; session kept %.0f s for resumption", timeout)
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(timeout, lambda: self._schedule(self.end_session()))

    async def end_session(self) -> None:
        """The session is over for good: leave the router, then rescue what the client
        never acknowledged. From the first line on, anything still delivered to this
        session takes the lost path (another resource or offline storage), and each step
        runs even when the one before it failed."""
        if not self.bound:
            return
        self.bound = False
        self._ended = True
        self.detached = False
        if self._expiry is not None:
            self._expiry.cancel()
        if self.sm is not None:
            self.host.resumable.pop(self.sm.id, None)
        try:
            await self.host.router.unbind(self)
        except Exception:
            self.log.exception("leaving the router failed")
        finally:
            self._unbound.set()
            if self.sm is not None:
                for pending in self.sm.take_unacked():
                    try:
                        self._lost(pending)
                    except Exception:
                        self.log.exception("could not rescue an unacknowledged stanza")

    def _lost(self, pending: Pending) -> None:
        if pending.on_lost is not None:
            pending.on_lost(pending.stanza)
            return
        self._rescue.append(pending.stanza)
        if len(self._rescue) == 1:
            self._schedule(self._reroute_all())

    async def _reroute_all(self) -> None:
        """Reroute in one task, one at a time, so the order of messages is kept."""
        await self._unbound.wait()
        while self._rescue:
            await self._reroute(self._rescue[0])
            self._rescue.popleft()

    async def _reroute(self, stanza: Element) -> None:
        """A stanza this session never confirmed: messages go to another resource or offline
        storage (stamped with their original time); iq requests get an error."""
        router = self.host.router
        if stanza.tag == MESSAGE and stanza.get("type", "normal") in ("chat", "normal"):
            if stanza.find(qn(NS_DELAY, "delay")) is None:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                delay = Element(qn(NS_DELAY, "delay"), {"from": self.host.domain, "stamp": stamp})
                stanza.append(delay)
            try:
                await router.deliver_message_to_bare(None, stanza, self.jid.bare)
            except StanzaError as exc:
                self.log.warning("could not keep an unacknowledged message: %s", exc)
        elif stanza.tag == IQ and stanza.get("type") in ("get", "set"):
            router.bounce(None, stanza, ServiceUnavailable())

    def _schedule(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.host.background.add(task)
        task.add_done_callback(self.host.background.discard)

    def _enable_sm(self, event: st.SmEnableRequested) -> list[st.StreamEvent]:
        c2s = self.host.config.c2s
        resumable = event.resume and c2s.resume_timeout > 0
        self.sm = StreamManagement(secrets.token_urlsafe(18), resumable=resumable)
        if resumable:
            self.host.resumable[self.sm.id] = self
        return self.stream.sm_enabled(self.sm.id, resumable, int(c2s.resume_timeout))

    async def _resume(self, event: st.ResumeRequested) -> list[st.StreamEvent]:
        old = self.host.resumable.get(event.previd)
        user = self.stream.jid
        if old is None or old.sm is None or user is None or old.jid.bare != user.bare:
            return self.stream.resume_failed()
        sm = old.sm
        await self._settle(old._settle_seq)  # <resumed h=…/> acknowledges what old handled
        try:
            confirmed = sm.ack(event.h)
        except StreamError:
            return self.stream.resume_failed(sm.handled)
        # Take the session over from the old connection, which may not know yet it is dead.
        old._replaced = True
        old.bound = False
        if old._expiry is not None:
            old._expiry.cancel()
        old._close_transport()
        self.sm = sm
        self.jid = old.jid
        self.available, self.priority, self.presence = old.available, old.priority, old.presence
        self.interested, self.directed = old.interested, old.directed
        self.inactive, self._held = old.inactive, old._held
        self.host.router.replace(old, self)
        self.host.resumable[sm.id] = self
        self.bound = True
        self._cancel_auth_deadline()
        self.log.extra = {"id": str(self.jid)}
        self.log.info("resumed session, %d stanzas to resend", len(sm.queue))
        for pending in confirmed:
            if pending.on_ack is not None:
                pending.on_ack()
        events = self.stream.resumed(self.jid, event.previd, sm.handled)
        for pending in sm.queue:
            self.stream.send(pending.stanza)
        self.stream.request_ack()
        self._ack_requested = True
        return events

    async def _read_loop(self) -> None:
        idle = self.host.config.c2s.idle_timeout
        slack = min(1.0, idle / 10)
        loop = asyncio.get_running_loop()
        # One deadline for the whole loop, moved on only once it lags by ``slack``: a timeout
        # context per read (a timer made and cancelled) was 8 % of the CPU of a chat.
        deadline = asyncio.timeout_at(loop.time() + idle)
        try:
            async with deadline:
                while not self.stream.closed and not self._closing:
                    due = loop.time() + idle
                    if due - (deadline.when() or 0.0) > slack:
                        deadline.reschedule(due)
                    if not await self._read_once():
                        return
        except TimeoutError:
            if not deadline.expired():
                raise
            self._resumable_end = True  # a phone asleep may come back and resume
            self.terminate(StreamError("connection-timeout", "idle for too long"))

    async def _read_once(self) -> bool:
        """Read and handle what arrived; False at EOF."""
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            self._resumable_end = True
            raise
        if not data:
            self._resumable_end = True  # EOF without </stream:stream>
            return False
        if self.bound and log.isEnabledFor(logging.DEBUG):
            # Only after binding: negotiation carries SASL secrets (PLAIN is a password).
            self.log.debug("< %r", data)
        await self._handle(self.stream.receive_data(data))
        self._flush()
        if not self._closing:
            await self.writer.drain()
        await self._rate_limit(len(data))
        return True

    async def _rate_limit(self, size: int) -> None:
        """Token bucket on bytes read: a flooding client is slowed down, not served faster."""
        rate = self.host.config.c2s.read_rate
        if rate <= 0:
            return
        now = time.monotonic()
        burst = float(self.host.config.c2s.read_burst)
        self._tokens = min(burst, self._tokens + (now - self._last_refill) * rate) - size
        self._last_refill = now
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / rate)

    async def _handle(self, events: list[st.StreamEvent]) -> None:
        queue = deque(events)
        while queue:
            event = queue.popleft()
            if isinstance(event, st.StanzaReceived):
                mailbox = self.host.mailbox
                if event.stanza.tag == IQ:
                    # The answer to an iq confirms what was sent before it (a client
                    # without stream management has no other ack).
                    await self._settle(self._settle_seq)
                await self.host.router.route(self, event.stanza)
                if mailbox is not None:
                    self._settle_seq = mailbox.queued
                if self.sm is not None:
                    self.sm.count_handled()  # in durable storage once _settle() returns
            elif isinstance(event, st.AckReceived):
                assert self.sm is not None
                try:
                    confirmed = self.sm.ack(event.h)
                except StreamError as exc:  # handled-count-too-high
                    self.log.info("client acknowledged more than was sent: %s", exc)
                    self.terminate(exc)
                    return
                for pending in confirmed:
                    if pending.on_ack is not None:
                        pending.on_ack()
                # Stanzas sent after our <r/> still need confirming.
                self._ack_requested = bool(self.sm.queue)
                if self._ack_requested:
                    asyncio.get_running_loop().call_soon(self._request_ack)
            elif isinstance(event, st.NonzaReceived):
                tag = event.element.tag
                handler = self.host.nonza_handlers.get(tag[1:].partition("}")[0])
                if handler is not None:
                    handler(self, event.element)
            elif isinstance(event, st.AckRequested):
                assert self.sm is not None
                await self._settle(self._settle_seq)
                self.stream.send_ack(self.sm.handled)
            elif isinstance(event, st.SmEnableRequested):
                queue.extend(self._enable_sm(event))
            elif isinstance(event, st.ResumeRequested):
                queue.extend(await self._resume(event))
            elif isinstance(event, st.CredentialsNeeded):
                queue.extend(await self._credentials(event))
            elif isinstance(event, st.AuthFailed):
                self._auth_failed(event)
            elif isinstance(event, st.Authenticated):
                self.host.login_guard.success(self.ip, str(event.jid.bare))
                self.log.info("authenticated as %s (%s)", event.jid, event.mechanism)
                self.log.extra = {"id": str(event.jid)}
            elif isinstance(event, st.BindRequested):
                queue.extend(await self._bind(event))
            elif isinstance(event, st.RegistrationRequested):
                queue.extend(await self._register(event))
            elif isinstance(event, st.TlsRequested):
                await self._start_tls()
            elif isinstance(event, st.StreamEnded):
                self._flush()
                self._closing = True
                if event.error is not None:
                    self.log.info("stream error: %s", event.error)
                    await self._linger()
                self._close_transport()
                return

    async def _settle(self, seq: int) -> None:
        """Wait until the mailbox committed operation ``seq`` (at once when it has)."""
        mailbox = self.host.mailbox
        if mailbox is not None and mailbox.committed < seq:
            self._flush()  # what is ready goes out while we wait
            await mailbox.settle(seq)

    async def _start_tls(self) -> None:
        self._flush()
        await self.writer.drain()
        try:
            await self.writer.start_tls(self.host.ssl_context)
        except Exception as exc:
            self.log.info("TLS handshake failed: %s", exc)
            self._closing = True
            return
        self.stream.tls_started(self.host.bindings)

    async def _credentials(self, event: st.CredentialsNeeded) -> list[st.StreamEvent]:
        now = time.monotonic()
        try:
            user = str(JID.make(event.username, self.host.domain))
        except ValueError:
            return self.stream.provide_credentials(None)
        wait = self.host.login_guard.blocked(self.ip, user, now)
        if wait > 0:
            self.log.info("login for %s throttled for %.0f s", user, wait)
            return self.stream.reject_auth(
                "temporary-auth-failure", f"too many failed logins; retry in {wait:.0f} s"
            )
        try:
            creds = await self.host.storage.accounts.credentials(user, event.mechanism)
        except STORAGE_DOWN as exc:
            # RFC 6120 §6.5.12: the client retries later, rather than seeing a bare TCP close
            # (or, worse, "not-authorized" and asking its user for a new password).
            self.log.warning("login for %s: storage unavailable (%s)", user, type(exc).__name__)
            return self.stream.reject_auth(
                "temporary-auth-failure", "the account database is unavailable; retry shortly"
            )
        return self.stream.provide_credentials(creds)

    def _auth_failed(self, event: st.AuthFailed) -> None:
        self.log.info("authentication failed for %s: %s", event.username, event.condition)
        if event.condition != "not-authorized":
            return
        user: str | None = None
        if event.username:
            try:
                user = str(JID.make(event.username, self.host.domain))
            except ValueError:
                pass
        self.host.login_guard.failure(self.ip, user, time.monotonic())

    async def _register(self, event: st.RegistrationRequested) -> list[st.StreamEvent]:
        """XEP-0077 on an unauthenticated stream, limited per IP like failed logins."""
        from xmpp_server.modules.register import Register

        module = self.host.modules.get("register")
        now = time.monotonic()
        if not isinstance(module, Register):
            return self.stream.registration_failed(event.iq, ServiceUnavailable())
        refusal = module.refusal(self.ip, now)
        if refusal is not None:
            return self.stream.registration_failed(event.iq, refusal)
        try:
            await module.register_account(event.username, event.password)
        except StanzaError as exc:
            return self.stream.registration_failed(event.iq, exc)
        module.registered(self.ip, now)
        self.log.info("registered account %s", event.username)
        return self.stream.registration_done(event.iq)

    async def _bind(self, event: st.BindRequested) -> list[st.StreamEvent]:
        assert self.stream.jid is not None
        resource = event.resource or secrets.token_urlsafe(9)
        try:
            full = self.stream.jid.with_resource(resource)
        except ValueError as exc:
            return self.stream.bind_failed(event.iq, BadRequest(str(exc)))
        self.jid = full
        self.log.extra = {"id": str(full)}
        await self.host.router.bind(self)
        self.bound = True
        self._cancel_auth_deadline()
        return self.stream.bind_done(event.iq, full)

    # -- output -----------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.stream.data_to_send()
        if not data or self.writer.is_closing():
            return
        if self.bound and log.isEnabledFor(logging.DEBUG):
            self.log.debug("> %r", data)
        self.writer.write(data)
        buffered = self.writer.transport.get_write_buffer_size()
        if buffered > self.host.config.limits.max_output_buffer and not self._closing:
            self.log.warning("client does not read its output; closing")
            self._closing = True
            self.stream.close(StreamError("resource-constraint", "output not read"))
            self._close_transport()

    async def _linger(self) -> None:
        """Half-close and discard what the peer still sends, so our stream error is not lost
        to a TCP reset (closing with unread input makes the kernel send RST)."""
        try:
            await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(2.0):
                while await self.reader.read(READ_SIZE):
                    pass
        except (TimeoutError, ConnectionError, OSError):
            pass

    def _close_transport(self) -> None:
        self._closing = True
        if not self.writer.is_closing():
            self.writer.close()
