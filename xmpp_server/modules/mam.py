"""XEP-0313 Message Archive Management (``urn:xmpp:mam:2`` and ``#extended``), with XEP-0059
paging, XEP-0431 full-text search and XEP-0441 archiving preferences.

What is archived: messages of type chat or normal between accounts that carry a body, a
receipt (XEP-0184), a chat marker (XEP-0333), a correction (XEP-0308), an OMEMO payload or
call signalling (XEP-0353); never chat states alone, errors, headlines or groupchat; a
XEP-0334 ``<no-store/>`` or ``<no-permanent-store/>`` hint keeps a message out, ``<store/>``
brings one in. Each side keeps its own copy: the sender's under a new stanza-id, the
recipient's under the ``<stanza-id/>`` the recipient received (XEP-0359), so a client can page
from what it has seen.

Storage modes (``mode``, see docs/storage-modes.md):

* ``archive`` (default): every account's messages are archived, and kept for
  ``retention_days``;
* ``ephemeral``: nothing is archived; messages live only in the offline queue until they are
  delivered, like a phone messenger.

That server-wide mode is the default of every account. With ``allow_user_override`` a user can
change it through XEP-0441 preferences (``always``/``never``/``roster`` plus JID lists);
without it, stored preferences are ignored and changing them is ``not-allowed``. Queries
always work on whatever the archive holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.exc import SQLAlchemyError

from xmpp_server.errors import (
    NS_STREAMS,
    BadRequest,
    FeatureNotImplemented,
    Forbidden,
    ItemNotFound,
    JidMalformed,
    NotAllowed,
    PolicyViolation,
    ResourceConstraint,
    StreamError,
)
from xmpp_server.jid import JID, parse_valid
from xmpp_server.modules.base import Module
from xmpp_server.modules.jingle import JMI_TAGS
from xmpp_server.modules.mam_writer import ArchiveWriter
from xmpp_server.modules.stanza_id import STANZA_ID, new_stanza_id, stamp, stanza_id
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import clone, iq_addresses, iq_result, make, new_id, payload, qn
from xmpp_server.storage import ArchiveItem, ArchivePage, ArchivePrefs, UnknownArchiveId
from xmpp_server.storage.archive import DEFAULT_MODES, ArchiveEntry, DefaultMode, Direction
from xmpp_server.xml import (
    NS_CLIENT,
    STORED_LIMITS,
    Element,
    ElementReceived,
    XmlStreamParser,
    tostring,
)

if TYPE_CHECKING:
    from xmpp_server.server import Host

PREFS_CACHE = 100_000  # owners whose archiving preferences are kept in memory
log = logging.getLogger("natterd.mam")

NS_MAM = "urn:xmpp:mam:2"
NS_MAM_EXTENDED = "urn:xmpp:mam:2#extended"
NS_FULLTEXT = "urn:xmpp:fulltext:0"
NS_RSM = "http://jabber.org/protocol/rsm"
NS_DATA = "jabber:x:data"
NS_VALIDATE = "http://jabber.org/protocol/xdata-validate"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_HINTS = "urn:xmpp:hints"
FULLTEXT_FIELD = f"{{{NS_FULLTEXT}}}fulltext"

DEFAULT_PAGE = 50  # items per page when the client sends no RSM <max/>
# RSM <count/> and index are given while at most this many messages match: counting scans
# every match (30-60 ms for 100,000 on PostgreSQL), the page itself takes well under 1 ms.
COUNT_LIMIT = 10_000
MAX_IDS = 1000  # values of the 'ids' field in one query
MAX_PREF_JIDS = 1000  # JIDs in each preference list
PURGE_INTERVAL = 3600.0  # seconds between retention purges
REREADS = 5  # times a page is read again after setting unreadable rows aside
CATCH_UP_WAIT = 10.0  # seconds a query waits for queued copies before answering 'wait'

# Payloads that make a message worth archiving without a body (XEP-0313 §5.1.1 "MAY include
# additional non-conversation messages": these are what clients need to sync state).
_CONTENT = frozenset(
    {
        qn(NS_CLIENT, "body"),
        qn("urn:xmpp:receipts", "received"),
        qn("urn:xmpp:chat-markers:0", "received"),
        qn("urn:xmpp:chat-markers:0", "displayed"),
        qn("urn:xmpp:chat-markers:0", "acknowledged"),
        qn("urn:xmpp:message-correct:0", "replace"),
        qn("eu.siacs.conversations.axolotl", "encrypted"),
        qn("urn:xmpp:omemo:2", "encrypted"),
        qn("urn:xmpp:sfs:0", "file-sharing"),  # XEP-0447 files, sent without a body
        qn("urn:xmpp:stickers:0", "sticker"),  # XEP-0449
        *JMI_TAGS,  # XEP-0353 call signalling: devices that were away learn of calls
    }
)
_NO_STORE = frozenset({qn(NS_HINTS, "no-store"), qn(NS_HINTS, "no-permanent-store")})
_STORE = qn(NS_HINTS, "store")
_FIELDS = ("with", "start", "end", "before-id", "after-id", "ids")


@dataclass(frozen=True)
class MamOptions:
    mode: Literal["archive", "ephemeral"] = "archive"
    """archive: messages are archived by default; ephemeral: nothing is, by default."""
    allow_user_override: bool = True
    """Users may change the default through XEP-0441 preferences."""
    retention_days: int = field(default=365, metadata={"min": 0})
    """Archived messages older than this are purged every hour; 0 keeps them forever."""
    max_page: int = field(default=250, metadata={"min": 1})
    """Most items in one page of results; a larger RSM <max/> is lowered to this."""
    full_text: bool = True
    """Offer XEP-0431 full-text search."""
    max_backlog: int = field(default=10_000, metadata={"min": 1})
    """Archive copies waiting to be written (the database slow or down) past which new
    messages are refused with a ``wait``/``resource-constraint`` error instead of queued."""
    shutdown_timeout: float = field(default=10.0, metadata={"min": 0})
    """Seconds a stopping server waits for queued archive copies to be written."""


def should_archive(message: Element) -> bool:
    """XEP-0313 §5.1.1 and XEP-0334 hints: whether a message belongs in a user archive."""
    type_ = message.get("type", "normal")
    if type_ in ("error", "groupchat"):
        return False  # groupchat goes to room archives, on the room's JID
    content = store = False
    for child in message:  # one pass over the children: this runs for every message twice
        tag = child.tag
        if tag in _NO_STORE:
            return False
        if tag == _STORE:
            store = True
        elif tag in _CONTENT:
            content = True
    return store or (content and type_ in ("chat", "normal"))


def stored_copy(message: Element, domain: str) -> tuple[str, str | None]:
    """The message as it was sent, minus the stanza-ids and delays this server added for
    any archive (they are per copy; a result carries its own); and its searchable text."""
    copy = clone(message)
    for child in list(copy):
        if child.tag == STANZA_ID and _on_domain(child.get("by"), domain):
            copy.remove(child)
        elif child.tag == qn(NS_DELAY, "delay") and child.get("from") == domain:
            copy.remove(child)
    bodies = [b.text for b in message.findall(qn(NS_CLIENT, "body")) if b.text]
    return tostring(copy), "\n".join(bodies) if bodies else None


def _on_domain(jid: str | None, domain: str) -> bool:
    try:
        return jid is not None and JID.parse(jid).domain == domain
    except ValueError:
        return False


_STORED_LIMITS = STORED_LIMITS
_STREAM_OPEN = f"<s:stream xmlns='{NS_CLIENT}' xmlns:s='{NS_STREAMS}'>".encode()


def parse_stored(xmls: list[str]) -> list[Element]:
    """Parse a page of stored messages in one parser run (a parser per message costs 2.5
    times as much), with the same restrictions as client input."""
    data = _STREAM_OPEN + "".join(xmls).encode() + b"</s:stream>"
    events = XmlStreamParser(_STORED_LIMITS).feed(data)
    elements = [event.element for event in events if isinstance(event, ElementReceived)]
    if len(elements) != len(xmls):
        raise ValueError("the archive holds XML that is not one element per message")
    return elements


def parse_each(xmls: list[str]) -> list[Element | str]:
    """Each stored message parsed, or why it could not be: the whole page in one parser run
    when it is readable (the common case), else row by row, so one unreadable row (an
    ill-formed stanza archived before such input was refused, say) costs only itself."""
    try:
        return list(parse_stored(xmls))
    except (StreamError, ValueError):
        pass
    parsed: list[Element | str] = []
    for xml in xmls:
        try:
            parsed.extend(parse_stored([xml]))
        except (StreamError, ValueError) as exc:
            parsed.append(f"{type(exc).__name__}: {exc}")
    return parsed


def jid_matches(listed: Iterable[str], target: JID) -> bool:
    """XEP-0441 §2.3: a listed full JID matches exactly, a listed bare JID any resource."""
    for text in listed:
        try:
            jid = JID.parse(text)
        except ValueError:
            continue
        if jid == (target if jid.resource is not None else target.bare):
            return True
    return False


def parse_datetime(text: str) -> datetime:
    """A XEP-0082 DateTime; it must name its time zone."""
    value = text.strip()
    try:
        stamp_ = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in "Zz" else value)
    except ValueError:
        raise BadRequest(f"not a XEP-0082 date and time: {text!r}") from None
    if "T" not in value.upper() or stamp_.tzinfo is None:
        raise BadRequest(f"a date and time with a time zone is needed, got {text!r}")
    return stamp_


def format_datetime(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ArchiveQuery:
    """A parsed XEP-0313 query: the form's filters, then RSM paging."""

    with_jid: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    after_id: str | None = None
    before_id: str | None = None
    ids: tuple[str, ...] | None = None
    text: str | None = None
    after: str | None = None
    before: str | None = None  # "" = the last page
    index: int | None = None
    limit: int = DEFAULT_PAGE
    flip: bool = False


def parse_query(query: Element, *, full_text: bool, max_page: int) -> ArchiveQuery:
    """Read the data form and the RSM set of a ``<query/>``; raises BadRequest for a bad
    value and FeatureNotImplemented for a field this server does not know (XEP-0313 §4.1.5)."""
    values: dict[str, list[str]] = {}
    form = query.find(qn(NS_DATA, "x"))
    for fld in form.findall(qn(NS_DATA, "field")) if form is not None else ():
        var = fld.get("var", "")
        found = [(v.text or "").strip() for v in fld.findall(qn(NS_DATA, "value"))]
        if var == "FORM_TYPE":
            if found != [NS_MAM]:
                raise BadRequest(f"the form's FORM_TYPE must be {NS_MAM}")
        elif var in _FIELDS or (full_text and var == FULLTEXT_FIELD):
            values[var] = [v for v in found if v]
        else:
            raise FeatureNotImplemented(f"unknown field {var!r}")

    def single(var: str) -> str | None:
        found = values.get(var) or []
        if len(found) > 1:
            raise BadRequest(f"field {var!r} takes one value")
        return found[0] if found else None

    with_jid = single("with")
    if with_jid is not None:
        try:
            with_jid = str(JID.parse(with_jid))
        except ValueError as exc:
            raise BadRequest(f"'with' is not a JID: {exc}") from None
    start, end = single("start"), single("end")
    ids = values.get("ids") or None  # a field without values filters nothing
    if ids is not None and len(ids) > MAX_IDS:
        raise PolicyViolation(f"at most {MAX_IDS} ids in one query")

    rsm = query.find(qn(NS_RSM, "set"))
    limit, after, before, index = min(DEFAULT_PAGE, max_page), None, None, None
    if rsm is not None:
        if (text := rsm.findtext(qn(NS_RSM, "max"))) is not None:
            limit = min(_count(text, "max"), max_page)
        if (el := rsm.find(qn(NS_RSM, "after"))) is not None:
            after = (el.text or "").strip()
            if not after:
                raise BadRequest("RSM <after/> needs an id")
        if (el := rsm.find(qn(NS_RSM, "before"))) is not None:
            before = (el.text or "").strip()
        if (text := rsm.findtext(qn(NS_RSM, "index"))) is not None:
            index = _count(text, "index")
        if after is not None and before is not None:
            raise BadRequest("RSM <after/> and <before/> together; use after-id and before-id")
        if index is not None and (after is not None or before is not None):
            raise BadRequest("RSM <index/> together with <after/> or <before/>")

    return ArchiveQuery(
        with_jid=with_jid,
        start=parse_datetime(start) if start else None,
        end=parse_datetime(end) if end else None,
        after_id=single("after-id"),
        before_id=single("before-id"),
        ids=tuple(ids) if ids is not None else None,
        text=single(FULLTEXT_FIELD),
        after=after,
        before=before,
        index=index,
        limit=limit,
        flip=query.find(qn(NS_MAM, "flip-page")) is not None,
    )


def _count(text: str, name: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise BadRequest(f"RSM <{name}/> must be a whole number, got {text!r}")
    return value


def query_form(full_text: bool) -> Element:
    """The form a client gets from ``<iq type='get'><query/></iq>`` (XEP-0313 §4.1.5)."""
    form = Element(qn(NS_DATA, "x"), {"type": "form"})
    hidden = ET.SubElement(form, qn(NS_DATA, "field"), {"type": "hidden", "var": "FORM_TYPE"})
    ET.SubElement(hidden, qn(NS_DATA, "value")).text = NS_MAM
    kinds = [("with", "jid-single"), ("start", "text-single"), ("end", "text-single")]
    kinds += [("before-id", "text-single"), ("after-id", "text-single")]
    for var, kind in kinds:
        ET.SubElement(form, qn(NS_DATA, "field"), {"type": kind, "var": var})
    ids = ET.SubElement(form, qn(NS_DATA, "field"), {"type": "list-multi", "var": "ids"})
    validate = ET.SubElement(ids, qn(NS_VALIDATE, "validate"), {"datatype": "xs:string"})
    ET.SubElement(validate, qn(NS_VALIDATE, "open"))
    if full_text:
        ET.SubElement(form, qn(NS_DATA, "field"), {"type": "text-single", "var": FULLTEXT_FIELD})
    query = Element(qn(NS_MAM, "query"))
    query.append(form)
    return query


def fin(page: ArchivePage) -> Element:
    """The closing ``<fin/>`` with its RSM set: no first/last on an empty page (XEP-0059
    §2.6), no count or index past COUNT_LIMIT (both optional in XEP-0313 §4.3.2)."""
    el = Element(qn(NS_MAM, "fin"), {"complete": "true" if page.complete else "false"})
    rsm = ET.SubElement(el, qn(NS_RSM, "set"))
    if page.first is not None and page.last is not None:
        index = {"index": str(page.index)} if page.index is not None else {}
        ET.SubElement(rsm, qn(NS_RSM, "first"), index).text = page.first
        ET.SubElement(rsm, qn(NS_RSM, "last")).text = page.last
    if page.count is not None:
        ET.SubElement(rsm, qn(NS_RSM, "count")).text = str(page.count)
    return el


def prefs_element(prefs: ArchivePrefs) -> Element:
    el = Element(qn(NS_MAM, "prefs"), {"default": prefs.default})
    for name, jids in (("always", prefs.always), ("never", prefs.never)):
        listed = ET.SubElement(el, qn(NS_MAM, name))
        for jid in jids:
            ET.SubElement(listed, qn(NS_MAM, "jid")).text = jid
    return el


def parse_prefs(el: Element) -> ArchivePrefs:
    default = el.get("default")
    if default not in DEFAULT_MODES:
        raise BadRequest("'default' must be always, never or roster")
    lists: dict[str, tuple[str, ...]] = {}
    for name in ("always", "never"):
        jids: dict[str, None] = {}
        listed = el.find(qn(NS_MAM, name))
        for item in listed.findall(qn(NS_MAM, "jid")) if listed is not None else ():
            try:
                jids[str(JID.parse((item.text or "").strip()))] = None
            except ValueError as exc:
                raise JidMalformed(f"<{name}/> lists a bad JID: {exc}") from None
        if len(jids) > MAX_PREF_JIDS:
            raise PolicyViolation(f"at most {MAX_PREF_JIDS} JIDs in <{name}/>")
        lists[name] = tuple(jids)
    return ArchivePrefs(default, lists["always"], lists["never"])


def _without(page: ArchivePage, parsed: list[Element | str]) -> tuple[ArchivePage, list[Element]]:
    """The page minus its unreadable rows, when they could not be set aside: short, but the
    client still gets every readable message (its paging ids stay valid)."""
    kept = [(i, p) for i, p in zip(page.items, parsed, strict=True) if not isinstance(p, str)]
    items = [i for i, _ in kept]
    return (
        ArchivePage(
            items,
            items[0].stanza_id if items else None,
            items[-1].stanza_id if items else None,
            page.complete,
            page.count,
            page.index,
        ),
        [p for _, p in kept],
    )


class Mam(Module):
    name = "mam"
    options_class = MamOptions
    account_features = (NS_MAM, NS_MAM_EXTENDED, NS_FULLTEXT)

    def __init__(self, host: Host, options: Any) -> None:
        super().__init__(host, options)
        if not options.full_text:
            # Disco reads the features of the instance: this one offers no search.
            setattr(self, "account_features", (NS_MAM, NS_MAM_EXTENDED))  # noqa: B010
        self.default_mode: DefaultMode = "always" if options.mode == "archive" else "never"
        self._server_prefs = ArchivePrefs(self.default_mode)  # frozen: one for everyone
        self._purger: asyncio.Task[None] | None = None
        self._last_stamp = datetime.min.replace(tzinfo=UTC)
        # Stored preferences per owner (None = none set): read on every message, changed rarely
        # and only through this module, so a bounded cache saves a query per message.
        self._prefs: OrderedDict[str, ArchivePrefs | None] = OrderedDict()
        # Who has stored preferences at all, loaded at start: everyone else gets the server's
        # mode without a query, so a user's first message after login costs no round-trip.
        # Only this module writes preferences (a stale member just costs one lookup).
        self._with_prefs: set[JID] | None = None
        self.writer = ArchiveWriter(self._append_batch, max_backlog=options.max_backlog)

    def setup(self) -> None:
        router = self.host.router
        # After the stanza_id module (100), which stamps the id the recipient's copy uses.
        router.add_hook("message/sent", self.on_sent, priority=50)
        router.add_hook("message/incoming", self.on_incoming, priority=50)
        router.add_iq(IqKey("set", "bare", NS_MAM, "query"), self.on_query)
        router.add_iq(IqKey("get", "bare", NS_MAM, "query"), self.on_form)
        router.add_iq(IqKey("get", "bare", NS_MAM, "metadata"), self.on_metadata)
        router.add_iq(IqKey("get", "bare", NS_MAM, "prefs"), self.on_get_prefs)
        router.add_iq(IqKey("set", "bare", NS_MAM, "prefs"), self.on_set_prefs)

    async def start(self) -> None:
        if self.options.allow_user_override:
            self._with_prefs = parse_valid(await self.host.storage.archive.prefs_owners())
        newest = await self.host.storage.archive.newest_timestamp()
        if newest is not None:
            self._last_stamp = newest
        if self.options.retention_days:
            self._purger = asyncio.create_task(self._purge_forever(), name="mam-retention")

    async def stop(self) -> None:
        await self.writer.close(self.options.shutdown_timeout)
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge_expired()
            except (SQLAlchemyError, OSError):
                log.exception("archive retention purge failed; trying again later")
            await asyncio.sleep(PURGE_INTERVAL)

    async def purge_expired(self) -> int:
        """Delete what is older than ``retention_days``; returns how many messages."""
        cutoff = datetime.now(UTC) - timedelta(days=self.options.retention_days)
        purged = await self.host.storage.archive.purge(older_than=cutoff)
        if purged:
            log.info("purged %d archived messages from before %s", purged, cutoff)
        return purged

    # -- archiving --------------------------------------------------------------------

    async def prefs(self, owner: JID) -> ArchivePrefs:
        """The preferences in force for ``owner``: theirs if they may and did set any."""
        if self.options.allow_user_override:
            if self._with_prefs is not None and owner not in self._with_prefs:
                return self._server_prefs
            key = str(owner)
            if key in self._prefs:
                self._prefs.move_to_end(key)
                stored = self._prefs[key]
            else:
                stored = await self.host.storage.archive.get_prefs(key)
                self._prefs[key] = stored
                if len(self._prefs) > PREFS_CACHE:
                    self._prefs.popitem(last=False)
            if stored is not None:
                return stored
        return self._server_prefs

    def _keeps_nothing_for(self, owner: JID) -> bool:
        """True when ``owner``'s archive takes nothing whatever the message: the server
        archives nothing by default and they never asked otherwise (ephemeral mode's
        common case, checked before any other work per message)."""
        if self.default_mode != "never":
            return False
        if not self.options.allow_user_override:
            return True
        return self._with_prefs is not None and owner not in self._with_prefs

    async def wanted(self, owner: JID, peer: JID) -> bool:
        """Whether ``owner``'s preferences archive messages with ``peer`` (XEP-0441)."""
        prefs = await self.prefs(owner)
        if jid_matches(prefs.never, peer):
            return False
        if jid_matches(prefs.always, peer):
            return True
        if prefs.default == "roster":
            item = await self.host.storage.rosters.get(str(owner), str(peer.bare))
            return item is not None
        return prefs.default == "always"

    def admit(self) -> None:
        """Refuse a new message to archive while the backlog is full (the database slow or
        down): the sender gets a ``wait`` error and sends again later, where queueing it
        would grow memory without bound and dropping it would lose it silently."""
        if self.writer.full:
            raise ResourceConstraint("the message archive is behind; send again shortly")

    async def on_sent(self, origin: Session | None, message: Element, to: JID) -> bool:
        """The sender's copy, under an id of its own."""
        sender = JID.parse(message.get("from", ""))
        if (
            self.writer.full
            and should_archive(message)
            and not (self._keeps_nothing_for(sender.bare) and self._keeps_nothing_for(to.bare))
        ):
            self.admit()  # before any copy is queued or the message delivered
        if self._keeps_nothing_for(sender.bare):
            return False
        # A message to oneself is archived once, on the way in, under the id the client sees.
        if sender.bare != to.bare and should_archive(message):
            await self._archive(sender.bare, to, "out", message, new_stanza_id)
        return False

    async def on_incoming(self, origin: Session | None, message: Element, to: JID) -> bool:
        """The recipient's copy, under the stanza-id the recipient receives."""
        if not self._keeps_nothing_for(to.bare) and should_archive(message):
            sender = JID.parse(message.get("from") or self.host.domain)
            owner = to.bare
            await self._archive(
                owner,
                sender,
                "in",
                message,
                lambda: stanza_id(message, owner) or stamp(message, owner),
            )
        return False

    def next_stamp(self) -> datetime:
        """A time after every message archived so far (a cut-off for purging)."""
        return self._stamp()

    def _stamp(self) -> datetime:
        """Now, but never earlier than the previous message archived: archives are ordered by
        time, and a clock stepped back must not slip new messages in before ones a client has
        already paged past (it would never see them)."""
        now = datetime.now(UTC)
        if now <= self._last_stamp:
            now = self._last_stamp + timedelta(microseconds=1)
        self._last_stamp = now
        return now

    async def _archive(
        self, owner: JID, peer: JID, direction: Direction, message: Element, sid: Callable[[], str]
    ) -> None:
        """Queue the copy for the next batch: the archive is history, not the delivery path
        (that is the offline queue and stream management), so it is written behind, many
        messages per commit. Queries wait for the queue first, so they see every message.
        ``sid`` makes the copy's id only once it is wanted (ephemeral mode archives none)."""
        try:
            if not await self.wanted(owner, peer):
                return
        except (SQLAlchemyError, OSError):
            log.exception("could not read the archiving preferences of %s", owner)
            return
        self.enqueue(owner, peer, direction, message, sid())

    def enqueue(
        self, owner: JID, peer: JID, direction: Direction, message: Element, sid: str
    ) -> datetime:
        """Queue a copy for ``owner``'s archive whatever its preferences (a room decides by its
        configuration); returns the timestamp it is archived under."""
        xml, body = stored_copy(message, self.host.domain)
        when = self._stamp()
        self.writer.add(str(owner), ArchiveEntry(sid, str(peer), direction, when, xml, body))
        return when

    async def _append_batch(self, batch: Sequence[tuple[str, ArchiveEntry]]) -> None:
        await self.host.storage.archive.append_batch(batch)

    async def flushed(self) -> None:
        """Return once every message queued so far is in the database."""
        await self.writer.flushed()

    async def _caught_up(self) -> None:
        """Wait for the queued copies before reading an archive (a page must not skip a
        message still queued); while storage is down, a ``wait`` error, not a hang."""
        if not await self.writer.flushed(CATCH_UP_WAIT):
            raise ResourceConstraint("the message archive is catching up; ask again shortly")

    # -- queries ----------------------------------------------------------------------

    def _own(self, origin: Session | None, iq: Element) -> tuple[Session, JID]:
        requester, account = iq_addresses(iq)
        if origin is None or requester.bare != account:
            raise Forbidden("only the account itself may use its archive")
        return origin, account

    async def on_form(self, origin: Session | None, iq: Element) -> None:
        session, _ = self._own(origin, iq)
        self.answer_form(session, iq)

    def answer_form(self, session: Session, iq: Element) -> None:
        session.deliver(iq_result(iq, query_form(self.options.full_text)))

    async def on_query(self, origin: Session | None, iq: Element) -> None:
        session, owner = self._own(origin, iq)
        await self.answer_query(session, iq, owner)

    async def answer_query(self, session: Session, iq: Element, owner: JID) -> None:
        """Answer a query on ``owner``'s archive; the caller checked that it may be read."""
        query = payload(iq)
        assert query is not None  # the router dispatched on it
        request = parse_query(
            query, full_text=self.options.full_text, max_page=self.options.max_page
        )
        await self._caught_up()
        try:
            page, messages = await self.read_page(
                str(owner),
                with_jid=request.with_jid,
                start=request.start,
                end=request.end,
                after_id=request.after_id,
                before_id=request.before_id,
                ids=request.ids,
                text=request.text,
                after=request.after,
                before=request.before,
                index=request.index,
                limit=request.limit,
                count_limit=COUNT_LIMIT,
            )
        except UnknownArchiveId as exc:
            raise ItemNotFound(str(exc)) from None
        queryid = query.get("queryid")
        results = zip(page.items, messages, strict=True)
        # Flipping changes only the order of sending; <first/> stays the oldest of the page.
        for item, stored in reversed(list(results)) if request.flip else results:
            session.deliver(self._result(iq, queryid, item, stored))
        session.deliver(iq_result(iq, fin(page)))

    async def read_page(self, owner: str, **query: Any) -> tuple[ArchivePage, list[Element]]:
        """A page of ``owner``'s archive (``query`` as for ``Archive.query``) and its messages
        parsed. An unreadable row is set aside in the quarantine (which logs it once) and the
        page read again, so one bad row neither fails the page nor leaves it short."""
        archive, quarantine = self.host.storage.archive, self.host.storage.quarantine
        for _ in range(REREADS):
            page = await archive.query(owner, **query)
            parsed = parse_each([item.xml for item in page.items])
            bad = [(i, p) for i, p in zip(page.items, parsed, strict=True) if isinstance(p, str)]
            if not bad:
                return page, [p for p in parsed if not isinstance(p, str)]
            for item, reason in bad:
                try:
                    await quarantine.set_aside(owner, "archive", item.row_id, item.xml, reason)
                except (SQLAlchemyError, OSError):
                    log.exception("could not set aside archive row %d of %s", item.row_id, owner)
                    return _without(page, parsed)
        return _without(page, parsed)

    def _result(
        self, iq: Element, queryid: str | None, item: ArchiveItem, stored: Element
    ) -> Element:
        message = make("message", to=iq.get("from"), from_=iq.get("to"), id=new_id())
        attrs = {"id": item.stanza_id}
        if queryid is not None:
            attrs["queryid"] = queryid
        result = ET.SubElement(message, qn(NS_MAM, "result"), attrs)
        forwarded = ET.SubElement(result, qn(NS_FORWARD, "forwarded"))
        ET.SubElement(forwarded, qn(NS_DELAY, "delay"), {"stamp": format_datetime(item.timestamp)})
        forwarded.append(stored)
        return message

    async def on_metadata(self, origin: Session | None, iq: Element) -> None:
        session, owner = self._own(origin, iq)
        await self.answer_metadata(session, iq, owner)

    async def answer_metadata(self, session: Session, iq: Element, owner: JID) -> None:
        metadata = Element(qn(NS_MAM, "metadata"))
        await self._caught_up()
        bounds = await self.host.storage.archive.metadata(str(owner))
        if bounds is not None:  # an empty archive has an empty <metadata/>
            for tag, item in zip(("start", "end"), bounds, strict=True):
                attrs = {"id": item.stanza_id, "timestamp": format_datetime(item.timestamp)}
                ET.SubElement(metadata, qn(NS_MAM, tag), attrs)
        session.deliver(iq_result(iq, metadata))

    # -- preferences ------------------------------------------------------------------

    async def on_get_prefs(self, origin: Session | None, iq: Element) -> None:
        session, owner = self._own(origin, iq)
        session.deliver(iq_result(iq, prefs_element(await self.prefs(owner))))

    async def on_set_prefs(self, origin: Session | None, iq: Element) -> None:
        session, owner = self._own(origin, iq)
        if not self.options.allow_user_override:
            raise NotAllowed("archiving is set for the whole server")
        el = payload(iq)
        assert el is not None
        prefs = parse_prefs(el)
        await self.host.storage.archive.set_prefs(str(owner), prefs)
        if self._with_prefs is not None:
            self._with_prefs.add(owner)
        self._prefs.pop(str(owner), None)
        session.deliver(iq_result(iq, prefs_element(prefs)))
