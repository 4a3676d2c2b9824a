"""XEP-0077 In-Band Registration: password change and account removal for a signed-in
user, and :meth:`Register.register_account` for the stream to create accounts with.

Off by default: open registration on a public server invites spam accounts.
Error replies to a password change carry no copy of the request (XEP-0077 §3.3
SHOULD NOT), so the new password is not echoed back on the wire.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xmpp_server.credentials import ScramCredentials
from xmpp_server.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotAcceptable,
    NotAllowed,
    RegistrationRequired,
    ResourceConstraint,
    StanzaError,
    StreamError,
)
from xmpp_server.jid import JID
from xmpp_server.login_guard import network_of
from xmpp_server.modules.base import Module
from xmpp_server.modules.blocking import Blocking
from xmpp_server.router import IqKey, Session
from xmpp_server.sasl import make_credentials, saslprep
from xmpp_server.stanza import iq_addresses, iq_result, make, qn
from xmpp_server.storage import AccountExists, AccountNotFound
from xmpp_server.throttle import FailureThrottle
from xmpp_server.xml import Element

if TYPE_CHECKING:
    from xmpp_server.server import Host

NS_REGISTER = "jabber:iq:register"


@dataclass(frozen=True)
class RegisterOptions:
    allow_new_accounts: bool = True
    """Whether register_account may create accounts (password change and removal stay)."""
    min_password_length: int = field(default=8, metadata={"min": 1})
    """In characters, after SASLprep."""
    max_per_ip: int = field(default=5, metadata={"min": 1})
    """Accounts one address (IPv6: its /64) may create on unauthenticated streams per
    ``per_ip_window``."""
    per_ip_window: float = field(default=3600.0, metadata={"gt": 0})
    max_total: int = field(default=100, metadata={"min": 1})
    """Accounts all addresses together may create per ``total_window``: a botnet has many
    addresses. Beyond it registration answers ``resource-constraint`` until the window passed."""
    total_window: float = field(default=3600.0, metadata={"gt": 0})


class Register(Module):
    name = "register"
    options_class = RegisterOptions
    enabled_by_default = False
    features = (NS_REGISTER,)

    def __init__(self, host: Host, options: RegisterOptions) -> None:
        super().__init__(host, options)
        window = options.per_ip_window
        self.per_ip = FailureThrottle(options.max_per_ip, window, window)
        total = options.total_window
        self.total = FailureThrottle(options.max_total, total, total)

    def refusal(self, address: str, now: float) -> StanzaError | None:
        """Why ``address`` may not create an account now, or None."""
        if self.per_ip.blocked(network_of(address), now):
            return ResourceConstraint("too many registrations from your address")
        if self.total.blocked("", now):
            return ResourceConstraint("too many new accounts lately; try again later")
        return None

    def registered(self, address: str, now: float) -> None:
        """Count an account ``address`` created against both limits."""
        self.per_ip.failure(network_of(address), now)
        self.total.failure("", now)

    def setup(self) -> None:
        router = self.host.router
        # Clients send these with no 'to' or to the server (XEP-0077's own examples do both).
        for target in ("bare", "host"):
            router.add_iq(IqKey("get", target, NS_REGISTER, "query"), self.on_get)
            router.add_iq(IqKey("set", target, NS_REGISTER, "query"), self.on_set)

    # -- for the stream: registration before authentication ----------------------------

    async def register_account(self, username: str, password: str) -> None:
        """Create ``username``@domain; raises NotAllowed, NotAcceptable or Conflict."""
        if not self.options.allow_new_accounts:
            raise NotAllowed("registration is closed")
        try:
            user = JID.make(username, self.host.domain)
        except ValueError as exc:
            raise NotAcceptable(f"bad username: {exc}") from None
        credentials = await self._credentials(password)
        try:
            await self.host.storage.accounts.create(str(user), credentials)
        except AccountExists:
            raise Conflict("that username is taken") from None
        self._forget(user)

    # -- after authentication ------------------------------------------------------------

    def _user(self, origin: Session | None, iq: Element) -> tuple[Session, JID]:
        requester, account = iq_addresses(iq)
        if origin is None:
            raise Forbidden()
        if account.local is None:  # addressed to the server: about the sender's account
            account = requester.bare
        if requester.bare != account:
            raise Forbidden("you can only manage your own account")
        return origin, account

    async def on_get(self, origin: Session | None, iq: Element) -> None:
        session, user = self._user(origin, iq)
        query = Element(qn(NS_REGISTER, "query"))
        ET.SubElement(query, qn(NS_REGISTER, "registered"))
        ET.SubElement(query, qn(NS_REGISTER, "username")).text = user.local
        ET.SubElement(query, qn(NS_REGISTER, "password"))
        session.deliver(iq_result(iq, query))

    async def on_set(self, origin: Session | None, iq: Element) -> None:
        query = iq.find(qn(NS_REGISTER, "query"))
        assert query is not None  # the router dispatched on it
        # Someone else's account: answered with the request as it came, like a JID that is
        # no account (the router makes the error service-unavailable for strangers).
        session, user = self._user(origin, iq)
        try:
            if query.find(qn(NS_REGISTER, "remove")) is not None:
                await self._remove(session, iq, query, user)
            else:
                await self._change_password(session, iq, query, user)
        except StanzaError:
            iq.remove(query)  # keep the request, password and all, out of the error reply
            raise

    async def _remove(self, session: Session, iq: Element, query: Element, user: JID) -> None:
        if len(query) != 1:
            raise BadRequest("<remove/> must be the only child of <query/>")
        if not await self.host.storage.accounts.exists(str(user)):
            raise RegistrationRequired()
        await self._leave(session, user)
        if self.host.known_accounts is not None:
            self.host.known_accounts.forget(user)
        if not await self.host.storage.accounts.delete(str(user)):
            raise RegistrationRequired()
        self._forget(user)
        session.deliver(iq_result(iq))
        # XEP-0077 §3.2: the account is gone, so is every stream signed in to it.
        for resource in list(self.host.router.resources(user)):
            resource.terminate(StreamError("not-authorized", "the account was removed"))

    async def _leave(self, session: Session, user: JID) -> None:
        """Say goodbye through the presence module while the roster still exists: contacts
        see every resource go offline and (XEP-0077 §3.2) lose their subscriptions.
        Afterwards the closing streams find nothing left to broadcast or record."""
        router = self.host.router
        for resource in router.available(user):
            await router.route(resource, make("presence", type="unavailable"))
        for item in await self.host.storage.rosters.items(str(user)):
            if item.subscription in ("from", "both"):
                await router.route(session, make("presence", to=item.jid, type="unsubscribed"))
            if item.subscription in ("to", "both") or item.ask:
                await router.route(session, make("presence", to=item.jid, type="unsubscribe"))

    async def _change_password(
        self, session: Session, iq: Element, query: Element, user: JID
    ) -> None:
        username = query.findtext(qn(NS_REGISTER, "username"))
        password = query.findtext(qn(NS_REGISTER, "password"))
        if not username or not password:
            # §3.3: an empty password never replaces the current one.
            raise BadRequest("both <username/> and <password/> are required")
        try:
            named = JID.make(username, self.host.domain)
        except ValueError:
            named = None
        if named != user:
            raise Forbidden("you can only change your own password")
        credentials = await self._credentials(password)
        try:
            await self.host.storage.accounts.set_credentials(str(user), credentials)
        except AccountNotFound:
            raise RegistrationRequired() from None
        session.deliver(iq_result(iq))

    async def _credentials(self, password: str) -> list[ScramCredentials]:
        try:
            prepped = saslprep(password)
        except ValueError as exc:
            raise NotAcceptable(f"unusable password: {exc}") from None
        minimum = self.options.min_password_length
        if len(prepped) < minimum:
            raise NotAcceptable(f"the password must have at least {minimum} characters")
        iterations = self.host.config.auth.scram_iterations
        # PBKDF2 at a few thousand iterations per family would stall every other stream.
        return await asyncio.to_thread(make_credentials, password, iterations)

    def _forget(self, user: JID) -> None:
        blocking = self.host.modules.get("blocking")
        if isinstance(blocking, Blocking):
            blocking.forget(user)
