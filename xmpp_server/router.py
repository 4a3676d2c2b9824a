"""The one place that decides where a stanza goes (RFC 6121 §8).

Client stanzas enter through :meth:`Router.route`, which stamps ``from`` so no
client can speak for another, then classifies the target (the server itself, a
local account's bare JID, a full JID, a component domain, elsewhere) and either
hands the stanza to a registered handler or applies the RFC's default rule.
:class:`StanzaError` raised by a handler is turned into an error reply here and
nowhere else; errors are never answered with errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from xmpp_server.errors import (
    InternalServerError,
    JidMalformed,
    RemoteServerNotFound,
    ServiceUnavailable,
    StanzaError,
    StreamError,
)
from xmpp_server.jid import JID
from xmpp_server.stanza import KIND, check_client_stanza, error_reply, make, new_id, payload
from xmpp_server.xml import Element

log = logging.getLogger("natterd.router")


class Session(Protocol):
    """What the router needs of a bound client session (implemented by Connection)."""

    jid: JID  # full JID
    available: bool  # sent initial presence and not yet unavailable
    priority: int
    presence: Element | None  # last available presence broadcast
    interested: bool  # asked for the roster: receives roster pushes
    directed: set[JID]  # JIDs that got directed available presence

    def deliver(
        self,
        stanza: Element,
        on_ack: Callable[[], None] | None = None,
        on_lost: Callable[[Element], None] | None = None,
        data: bytes | None = None,
    ) -> None: ...

    def terminate(self, error: StreamError) -> None: ...


IqHandler = Callable[[Session | None, Element], Awaitable[None]]
Hook = Callable[[Session | None, Element, JID], Awaitable[bool]]
"""A hook returns True when it has fully handled the stanza."""
SessionHook = Callable[[Session], Awaitable[None]]
DomainHandler = Callable[[Session | None, Element, JID], Awaitable[None]]
Filter = Callable[[Element, JID, JID], Awaitable[StanzaError | bool]]
"""(stanza, from, to-bare) → False to pass, True to drop silently, an error to bounce."""
DeliveredHook = Callable[[Element, JID, list[Session]], None]
"""(message, recipient account, the sessions it was written to) after a live delivery."""
Keeper = Callable[[Element, JID, list[Session]], Awaitable[bool]]
"""(message, recipient account, its live sessions) → True when it delivered the message
itself, keeping it in durable storage until a client acknowledges it (the offline module)."""
Entitled = Callable[[JID, JID], Awaitable[bool]]
"""(account, requester) → whether the requester may learn about the account (subscribed)."""


class _SendersOwn(Exception):
    """A stanza error about the sender's own doing (a ``message/sent`` hook refused it):
    the sender gets it unchanged, not the discreet answer given on an account's behalf."""

    def __init__(self, error: StanzaError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class IqKey:
    type: str  # "get" | "set"
    target: str  # "host" | "bare" (a local account, the sender's own included)
    ns: str
    tag: str


@dataclass
class _Hooks:
    items: list[tuple[int, Hook]] = field(default_factory=list)

    def add(self, priority: int, hook: Hook) -> None:
        self.items.append((priority, hook))
        self.items.sort(key=lambda item: -item[0])


class Router:
    """Who is online where, and which handler takes which stanza."""

    def __init__(
        self,
        domain: str,
        account_exists: Callable[[JID], Awaitable[bool]],
        entitled: Entitled | None = None,
    ) -> None:
        self.domain = domain
        self.account_exists = account_exists
        # Who may see errors answered on behalf of an account (see :meth:`_discreet`);
        # None: only the account itself.
        self.entitled = entitled
        self.sessions: dict[JID, dict[str, Session]] = {}
        self._iq: dict[IqKey, IqHandler] = {}
        self._hooks: dict[str, _Hooks] = {}
        self._domains: dict[str, DomainHandler] = {}
        self._in_filters: list[Filter] = []
        self._out_filters: list[Filter] = []
        self._bound: list[SessionHook] = []
        self._unbound: list[SessionHook] = []
        self._available: list[SessionHook] = []
        self._delivered: list[DeliveredHook] = []
        self.keeper: Keeper | None = None
        # Server-originated iq requests awaiting their answer: id → (addressee, future).
        self._requests: dict[str, tuple[str, asyncio.Future[Element]]] = {}

    # -- registration -----------------------------------------------------------------

    def add_iq(self, key: IqKey, handler: IqHandler) -> None:
        if key in self._iq:
            raise ValueError(f"two handlers for {key}")
        self._iq[key] = handler

    def add_hook(self, event: str, hook: Hook, priority: int = 0) -> None:
        """Events, highest priority first; a hook returning True ends the stanza's journey:

        * ``message/sent``: a client's message, after filters, before delivery (archive the
          sender's copy, carbons of what was sent);
        * ``message/incoming``: a message for an existing local account, before it is
          delivered or stored (stamp the stanza-id, archive the recipient's copy);
        * ``message/bare``, ``message/full``, ``message/host``, ``message/offline``;
        * ``presence/bare``, ``presence/full``, ``presence/host``, ``presence/self`` (no 'to').
        """
        self._hooks.setdefault(event, _Hooks()).add(priority, hook)

    def add_domain(self, domain: str, handler: DomainHandler) -> None:
        self._domains[domain] = handler

    def add_filter(self, direction: str, flt: Filter) -> None:
        (self._in_filters if direction == "in" else self._out_filters).append(flt)

    def on_bound(self, hook: SessionHook) -> None:
        self._bound.append(hook)

    def on_unbound(self, hook: SessionHook) -> None:
        self._unbound.append(hook)

    def on_delivered(self, hook: DeliveredHook) -> None:
        """Called after a message was written to live sessions of its recipient (carbons)."""
        self._delivered.append(hook)

    def on_available(self, hook: SessionHook) -> None:
        """Called after a session's initial presence (offline delivery starts here)."""
        self._available.append(hook)

    async def session_available(self, session: Session) -> None:
        for hook in self._available:
            await hook(session)

    # -- sessions ---------------------------------------------------------------------

    def resources(self, bare: JID) -> Iterable[Session]:
        return self.sessions.get(bare, {}).values()

    def available(self, bare: JID) -> list[Session]:
        return [s for s in self.sessions.get(bare, {}).values() if s.available]

    def session(self, full: JID) -> Session | None:
        assert full.resource is not None
        return self.sessions.get(full.bare, {}).get(full.resource)

    async def bind(self, session: Session) -> None:
        """Register ``session``; an existing session with the same full JID is replaced."""
        jid = session.jid
        assert jid.resource is not None
        resources = self.sessions.setdefault(jid.bare, {})
        old = resources.get(jid.resource)
        if old is not None and old is not session:
            await self.unbind(old)
            old.terminate(StreamError("conflict", "replaced by a new session"))
            resources = self.sessions.setdefault(jid.bare, {})
        resources[jid.resource] = session
        for hook in self._bound:
            await hook(session)

    def replace(self, old: Session, new: Session) -> None:
        """A resumed stream (XEP-0198) takes over ``old``'s place without any hooks running."""
        resources = self.sessions.get(old.jid.bare, {})
        if resources.get(old.jid.resource or "") is old:
            resources[old.jid.resource or ""] = new

    async def unbind(self, session: Session) -> None:
        jid = session.jid
        resources = self.sessions.get(jid.bare)
        if resources is None or resources.get(jid.resource or "") is not session:
            return
        # Out of the table first, then the hooks: a second unbind of the same session, or a
        # new session binding the same resource while the hooks run, finds the table right.
        del resources[jid.resource or ""]
        if not resources:
            del self.sessions[jid.bare]
        for hook in self._unbound:
            try:
                await hook(session)
            except Exception:
                log.exception("session close hook failed for %s", jid)

    # -- routing ----------------------------------------------------------------------

    async def route(self, origin: Session, stanza: Element) -> None:
        """Route a stanza a client sent: stamp ``from``, check its shape, then deliver it."""
        stanza.set("from", str(origin.jid))
        malformed = check_client_stanza(stanza)
        if malformed is not None:
            # bad-request, or nothing at all for a malformed result or error (never answered).
            log.debug("malformed %s from %s: %s", stanza.tag, origin.jid, malformed.text)
            self.bounce(origin, stanza, malformed)
            return
        try:
            to = _to(stanza)
        except StanzaError as exc:
            self.bounce(origin, stanza, exc)
            return
        await self._dispatch(origin, stanza, to, origin.jid)

    async def deliver(self, stanza: Element) -> None:
        """Route a stanza the server or a module originates (``from`` already set)."""
        try:
            to = _to(stanza)
            sender = JID.parse(stanza.get("from") or self.domain)
        except (StanzaError, ValueError):
            log.warning("dropping server stanza with bad addresses")
            return
        await self._dispatch(None, stanza, to, sender)

    async def request(self, iq: Element, timeout: float, sender: str | None = None) -> Element:
        """Send an iq get/set from the server's JID (or ``sender``, a JID the server acts for:
        the relay, voicemail, a conference's mixer) to a local full JID and wait for the
        answer (a result or an error stanza); TimeoutError if none comes in ``timeout``."""
        to = JID.parse(iq.get("to", ""))
        if to.resource is None or self.session(to) is None:
            raise ServiceUnavailable("no such session")
        id_ = new_id()
        iq.set("id", id_)
        iq.set("from", sender or self.domain)
        answer: asyncio.Future[Element] = asyncio.get_running_loop().create_future()
        self._requests[id_] = (str(to), answer)
        try:
            await self.deliver(iq)
            async with asyncio.timeout(timeout):
                return await answer
        finally:
            self._requests.pop(id_, None)

    async def request_set(self, sender: str, to: str, child: Element, timeout: float) -> Element:
        """:meth:`request` of an iq set carrying ``child``; its result, RuntimeError when
        ``to`` answers with an error."""
        iq = make("iq", type="set", to=to)
        iq.append(child)
        reply = await self.request(iq, timeout, sender)
        if reply.get("type") == "error":
            raise RuntimeError(f"{to} refused {child.get('action') or child.tag}")
        return reply

    def _answered(self, stanza: Element) -> bool:
        """Whether ``stanza`` answered one of our requests (then it goes no further)."""
        pending = self._requests.get(stanza.get("id", ""))
        # Only the addressee may answer: 'from' was stamped by route(), so it cannot be forged.
        if pending is None or stanza.get("from") != pending[0]:
            return False
        if not pending[1].done():
            pending[1].set_result(stanza)
        return True

    async def _dispatch(
        self, origin: Session | None, stanza: Element, to: JID | None, sender: JID
    ) -> None:
        kind = KIND.get(stanza.tag)
        if kind is None:
            return
        if (
            self._requests
            and kind == "iq"
            and stanza.get("type") in ("result", "error")
            and self._answered(stanza)
        ):
            return
        # Errors past the sender's own checks (its blocklist) speak for the addressee.
        addressee_speaks = False
        try:
            if to is None:
                await self._to_self(origin, stanza, kind, sender)
                return
            if to.domain != self.domain:
                handler = self._domains.get(to.domain)
                if handler is None:
                    raise RemoteServerNotFound(f"{to.domain} is not served here")
                if await self._filtered(self._out_filters, stanza, sender, to):
                    return
                await handler(origin, stanza, to)
                return
            if to.local is None:
                await self._to_host(origin, stanza, kind, to)
                return
            if sender.bare != to.bare or origin is None:
                if await self._filtered(self._out_filters, stanza, sender, to):
                    return
                addressee_speaks = True
                if await self._filtered(self._in_filters, stanza, sender, to):
                    return
            addressee_speaks = True
            if kind == "message" and not await self._message_pipeline(origin, stanza, to):
                return
            if to.resource is None:
                await self._to_bare(origin, stanza, kind, to)
            else:
                await self._to_full(origin, stanza, kind, to)
        except _SendersOwn as own:
            self.bounce(origin, stanza, own.error)
        except StanzaError as exc:
            if addressee_speaks and origin is not None and kind != "presence":
                exc = await self._discreet(exc, sender, to)
            self.bounce(origin, stanza, exc)
        except Exception:
            log.exception("error while routing a %s", kind)
            error: StanzaError = InternalServerError()
            if addressee_speaks and origin is not None and kind != "presence":
                error = await self._discreet(error, sender, to)
            self.bounce(origin, stanza, error)

    async def _discreet(self, exc: StanzaError, sender: JID, to: JID | None) -> StanzaError:
        """The error a client gets for an iq or message to a local account: only the account
        itself and contacts with a presence subscription to it get the real one; anyone else
        gets a bare ``service-unavailable``, exactly what a JID that is no account answers
        (XEP-0054 §3.3, RFC 6121 §8.5.1), so errors cannot tell which accounts exist.
        (Presence errors are left alone: they concern the sender's own roster.)"""
        if to is None or to.local is None or to.domain != self.domain:
            return exc
        if sender.bare == to.bare:
            return exc
        if exc.condition == "service-unavailable" and not exc.text and not exc.extra:
            return exc
        if self.entitled is not None:
            try:
                if await self.entitled(to.bare, sender.bare):
                    return exc
            except Exception:
                log.exception("could not check who may see errors of %s", to.bare)
        return ServiceUnavailable()

    async def _message_pipeline(self, origin: Session | None, stanza: Element, to: JID) -> bool:
        """Run the sent/incoming hooks for a message to a local account; False = stop."""
        if to.bare not in self.sessions and not await self.account_exists(to.bare):
            if stanza.get("type") == "error":
                return False
            raise ServiceUnavailable()
        try:
            if origin is not None and await self._run_hooks("message/sent", origin, stanza, to):
                return False
        except StanzaError as exc:
            raise _SendersOwn(exc) from exc  # about the sender (a rate limit), said as is
        return not await self._run_hooks("message/incoming", origin, stanza, to)

    def delivered(self, stanza: Element, user: JID, sessions: list[Session]) -> None:
        for hook in self._delivered:
            hook(stanza, user, sessions)

    async def _filtered(self, filters: list[Filter], stanza: Element, sender: JID, to: JID) -> bool:
        for flt in filters:
            verdict = await flt(stanza, sender, to)
            if isinstance(verdict, StanzaError):
                raise verdict
            if verdict:
                return True
        return False

    async def _run_hooks(
        self, event: str, origin: Session | None, stanza: Element, to: JID
    ) -> bool:
        hooks = self._hooks.get(event)
        if hooks is not None:
            for _, hook in hooks.items:
                if await hook(origin, stanza, to):
                    return True
        return False

    async def _handle_iq(self, origin: Session | None, stanza: Element, target: str) -> bool:
        type_ = stanza.get("type")
        if type_ not in ("get", "set"):
            return type_ in ("result", "error")  # answers to request() were taken earlier
        first = payload(stanza)
        if first is None:
            raise ServiceUnavailable()
        ns, _, tag = first.tag[1:].partition("}")
        handler = self._iq.get(IqKey(type_, target, ns, tag))
        if handler is None:
            raise ServiceUnavailable()
        await handler(origin, stanza)
        return True

    async def _to_self(
        self, origin: Session | None, stanza: Element, kind: str, sender: JID
    ) -> None:
        if kind == "presence":
            await self._run_hooks("presence/self", origin, stanza, sender.bare)
        elif kind == "iq":
            await self._handle_iq(origin, stanza, "bare")
        else:
            await self._to_bare(origin, stanza, kind, sender.bare)

    async def _to_host(self, origin: Session | None, stanza: Element, kind: str, to: JID) -> None:
        if to.resource is not None and kind != "iq":
            return
        if kind == "iq":
            await self._handle_iq(origin, stanza, "host")
        else:
            await self._run_hooks(f"{kind}/host", origin, stanza, to)

    async def _to_bare(self, origin: Session | None, stanza: Element, kind: str, to: JID) -> None:
        if kind == "iq":
            if not await self.account_exists(to):
                raise ServiceUnavailable()
            await self._handle_iq(origin, stanza, "bare")
            return
        if await self._run_hooks(f"{kind}/bare", origin, stanza, to):
            return
        if kind == "presence":
            return  # the presence module owns everything about presence
        await self.deliver_message_to_bare(origin, stanza, to)

    async def deliver_message_to_bare(
        self, origin: Session | None, stanza: Element, to: JID
    ) -> None:
        """RFC 6121 §8.5.2: a message for an account's bare JID."""
        type_ = stanza.get("type", "normal")
        if type_ == "error":
            return
        if type_ == "groupchat":
            raise ServiceUnavailable()
        sessions = [s for s in self.available(to) if s.priority >= 0]
        if sessions and type_ != "headline":
            top = max(s.priority for s in sessions)
            sessions = [s for s in sessions if s.priority == top]
        if sessions:
            if self.keeper is None or not await self.keeper(stanza, to, sessions):
                for s in sessions:
                    s.deliver(stanza)
            self.delivered(stanza, to, sessions)
            return
        if type_ == "headline":
            return
        if not await self.account_exists(to):
            raise ServiceUnavailable()
        if await self._run_hooks("message/offline", origin, stanza, to):
            return
        raise ServiceUnavailable("the recipient is offline")

    async def _to_full(self, origin: Session | None, stanza: Element, kind: str, to: JID) -> None:
        if await self._run_hooks(f"{kind}/full", origin, stanza, to):
            return
        session = self.session(to)
        if session is not None:
            if kind != "message":
                session.deliver(stanza)
                return
            if self.keeper is None or not await self.keeper(stanza, to.bare, [session]):
                session.deliver(stanza)
            self.delivered(stanza, to.bare, [session])
            return
        # RFC 6121 §8.5.3.2: no such resource.
        if kind == "iq":
            if stanza.get("type") in ("get", "set"):
                raise ServiceUnavailable()
        elif kind == "message":
            type_ = stanza.get("type", "normal")
            if type_ in ("normal", "chat"):
                await self.deliver_message_to_bare(origin, stanza, to.bare)
            elif type_ == "groupchat":
                raise ServiceUnavailable()
        elif stanza.get("type") in ("subscribe", "subscribed", "unsubscribe", "unsubscribed"):
            await self._to_bare(origin, stanza, kind, to.bare)

    def bounce(self, origin: Session | None, stanza: Element, exc: StanzaError) -> None:
        """Answer ``stanza`` with an error; never answer an error or a result."""
        if stanza.get("type") in ("error", "result"):
            return
        reply = error_reply(stanza, exc)
        if not reply.get("from"):
            # No 'to' meant "my own account": the account answers (RFC 6120 §10.3.3).
            sender = stanza.get("from") or ""
            reply.set("from", sender.partition("/")[0] if sender else self.domain)
        to = reply.get("to") or ""
        if origin is not None and to in (str(origin.jid), str(origin.jid.bare)):
            # The bare JID: subscription stanzas are stamped with it (RFC 6121 §3.1.2).
            origin.deliver(reply)
            return
        try:
            target = JID.parse(to)
        except ValueError:
            return
        if target.domain == self.domain and target.resource is not None:
            session = self.session(target)
            if session is not None:
                session.deliver(reply)


def _to(stanza: Element) -> JID | None:
    to = stanza.get("to")
    if not to:
        return None
    try:
        return JID.parse(to)
    except ValueError as exc:
        raise JidMalformed(str(exc)) from None
