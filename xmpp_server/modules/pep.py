"""XEP-0163 Personal Eventing Protocol: a publish-subscribe service on every account's bare JID.

Enough of XEP-0060 for what clients keep in PEP: OMEMO device lists and bundles (XEP-0384),
avatars (XEP-0084), nicknames (XEP-0172), bookmarks (XEP-0402) and 24-hour status updates
(``urn:natter:status:0``, ours). Nodes are created by publishing, configured with
publish-options (XEP-0223, checked as preconditions) or the owner's configuration form.

Who may read a node is its access model: ``presence`` (the owner and contacts with a
subscription to the owner's presence), ``open`` (anyone) or ``whitelist`` (the owner and the
JIDs it affiliated as member or publisher). Notifications follow XEP-0163's "filtered
notifications": a resource gets a node's events only if its entity capabilities (XEP-0115)
list ``<node>+notify``. The server asks each new capabilities hash what it means with one
disco#info query, verifies the hash and caches the answer by hash. When a resource's interest
becomes known (it came online), it is sent the last item of each node it wants (§6.2).

Items of the status node expire ``status_ttl`` seconds after they were published: they are
never returned or sent after that and are purged from storage periodically.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from xmpp_server.errors import (
    BadRequest,
    Conflict,
    FeatureNotImplemented,
    Forbidden,
    ItemNotFound,
    NotAcceptable,
    NotAllowed,
    NotAuthorized,
    StanzaError,
    StreamError,
)
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.modules.presence import HAS_FROM, HAS_TO, may_see_presence
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_addresses, iq_result, make, new_id, qn
from xmpp_server.storage import StoredPepItem, StoredPepNode
from xmpp_server.xml import XML_LANG, Element, fromstring, tostring

if TYPE_CHECKING:
    from xmpp_server.server import Host

log = logging.getLogger("natterd.pep")

NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_OWNER = f"{NS_PUBSUB}#owner"
NS_EVENT = f"{NS_PUBSUB}#event"
NS_ERRORS = f"{NS_PUBSUB}#errors"
NS_DATA = "jabber:x:data"
NS_CAPS = "http://jabber.org/protocol/caps"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NODE_CONFIG = f"{NS_PUBSUB}#node_config"
PUBLISH_OPTIONS = f"{NS_PUBSUB}#publish-options"
STATUS_NODE = "urn:natter:status:0"
"""Status updates (text, image or video, like WhatsApp's): items expire after ``status_ttl``."""
STICKERS_NODE = "urn:xmpp:stickers:0"
"""XEP-0449 sticker packs, one per item: open to anyone and keeping many items by default."""

NOTIFY_SUFFIX = "+notify"
ACCESS_MODELS = ("presence", "open", "whitelist")
SEND_LAST = ("never", "on_sub", "on_sub_and_presence")
AFFILIATIONS = ("owner", "publisher", "member", "none", "outcast")
READERS = frozenset({"owner", "publisher", "member"})
PURGE_INTERVAL_MAX = 600.0
CAPS_CACHE_SIZE = 4096

FEATURES = (NS_PUBSUB,) + tuple(
    f"{NS_PUBSUB}#{feature}"
    for feature in (
        "access-open",
        "access-presence",
        "access-whitelist",
        "auto-create",
        "auto-subscribe",
        "config-node",
        "create-and-configure",
        "create-nodes",
        "delete-items",
        "delete-nodes",
        "filtered-notifications",
        "item-ids",
        "last-published",
        "modify-affiliations",
        "multi-items",
        "persistent-items",
        "presence-access",
        "presence-notifications",
        "publish",
        "publish-options",
        "purge-nodes",
        "retract-items",
        "retrieve-affiliations",
        "retrieve-default",
        "retrieve-items",
    )
)

_HASHES = {
    "sha-1": "sha1",
    "sha-224": "sha224",
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
}


@dataclass(frozen=True)
class PepOptions:
    max_items_per_node: int = field(default=256, metadata={"min": 1})
    """Most items one node keeps; what ``pubsub#max_items = max`` means."""
    default_max_items: int = field(default=1, metadata={"min": 1})
    """Items a node keeps unless configured otherwise (the status node keeps the maximum)."""
    max_nodes_per_user: int = field(default=128, metadata={"min": 1})
    """Most nodes one account may have (OMEMO makes one bundle node per device)."""
    max_item_size: int = field(default=131072, metadata={"min": 256})
    """Largest item payload accepted, in bytes of serialised XML (avatar data is largest)."""
    status_ttl: float = field(default=86400.0, metadata={"gt": 0})
    """Seconds after which an item of the status node (urn:natter:status:0) expires."""
    caps_timeout: float = field(default=10.0, metadata={"gt": 0})
    """Seconds to wait for a client's answer to the disco#info query about its capabilities."""


class PreconditionNotMet(StanzaError):
    condition = "conflict"

    def __init__(self, text: str) -> None:
        super().__init__(text, extra=[Element(qn(NS_ERRORS, "precondition-not-met"))])


def _pubsub_error(
    cls: type[StanzaError], pubsub_condition: str, text: str | None = None, **attrs: str
) -> StanzaError:
    return cls(text, extra=[Element(qn(NS_ERRORS, pubsub_condition), attrs)])


# -- node configuration -------------------------------------------------------------------


def _bool(value: str) -> bool:
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def form_fields(form: Element | None) -> dict[str, list[str]]:
    """The fields of a data form (XEP-0004) by var, FORM_TYPE included."""
    if form is None:
        return {}
    return {
        f.get("var", ""): [v.text or "" for v in f.findall(qn(NS_DATA, "value"))]
        for f in form.findall(qn(NS_DATA, "field"))
        if f.get("var")
    }


class NodeConfig:
    """Parses and renders the ``pubsub#*`` options this service knows."""

    def __init__(self, options: PepOptions) -> None:
        self.options = options

    def default(self, node: str) -> dict[str, Any]:
        return {
            # XEP-0449 §4.1: packs SHOULD be open so that other users can fetch them.
            "access_model": "open" if node == STICKERS_NODE else "presence",
            "max_items": (
                self.options.max_items_per_node
                if node in (STATUS_NODE, STICKERS_NODE)
                else min(self.options.default_max_items, self.options.max_items_per_node)
            ),
            "persist_items": True,
            "notify_retract": True,
            "notify_delete": True,
            "send_last_published_item": "on_sub_and_presence",
            "deliver_notifications": True,
            "deliver_payloads": True,
            "title": "",
        }

    def parse(self, var: str, values: list[str]) -> tuple[str, Any]:
        """(config key, value) of one form field; ValueError for an unknown or bad field."""
        if not var.startswith("pubsub#"):
            raise ValueError(f"unknown option {var!r}")
        key = var.removeprefix("pubsub#")
        value = values[0] if values else ""
        if key == "access_model":
            if value not in ACCESS_MODELS:
                raise ValueError(f"unsupported access model {value!r}")
            return key, value
        if key == "max_items":
            if value == "max":
                return key, self.options.max_items_per_node
            number = int(value)
            if not 1 <= number <= self.options.max_items_per_node:
                raise ValueError(f"max_items must be 1 to {self.options.max_items_per_node}")
            return key, number
        if key in (
            "persist_items",
            "notify_retract",
            "notify_delete",
            "deliver_notifications",
            "deliver_payloads",
        ):
            return key, _bool(value)
        if key == "send_last_published_item":
            if value not in SEND_LAST:
                raise ValueError(f"unsupported send_last_published_item {value!r}")
            return key, value
        if key == "title":
            return key, value
        raise ValueError(f"unknown option {var!r}")

    def apply(self, config: dict[str, Any], form: Element | None) -> dict[str, Any]:
        """A submitted configuration form applied to ``config``; unknown fields are ignored."""
        out = dict(config)
        for var, values in form_fields(form).items():
            if var == "FORM_TYPE" or not var.startswith("pubsub#"):
                continue
            try:
                key, value = self.parse(var, values)
            except ValueError as exc:
                if str(exc).startswith("unknown option"):
                    continue
                raise NotAcceptable(str(exc)) from None
            out[key] = value
        return out

    def preconditions(self, form: Element | None) -> dict[str, Any]:
        """XEP-0223 publish-options as config values; an unknown or bad one fails them."""
        wanted: dict[str, Any] = {}
        fields = form_fields(form)
        if fields.get("FORM_TYPE", [PUBLISH_OPTIONS])[:1] != [PUBLISH_OPTIONS]:
            raise BadRequest("publish-options need FORM_TYPE " + PUBLISH_OPTIONS)
        for var, values in fields.items():
            if var == "FORM_TYPE":
                continue
            try:
                key, value = self.parse(var, values)
            except ValueError as exc:
                raise PreconditionNotMet(str(exc)) from None
            wanted[key] = value
        return wanted

    def form(self, config: dict[str, Any], *, node: str | None, type_: str = "form") -> Element:
        form = Element(qn(NS_DATA, "x"), {"type": type_})
        self._field(form, "FORM_TYPE", "hidden", [NODE_CONFIG])
        self._field(form, "pubsub#title", "text-single", [config["title"]], "A short name")
        self._field(
            form,
            "pubsub#access_model",
            "list-single",
            [config["access_model"]],
            "Who may subscribe and retrieve items",
            ACCESS_MODELS,
        )
        self._field(
            form,
            "pubsub#max_items",
            "text-single",
            [str(config["max_items"])],
            f"Items to keep (1 to {self.options.max_items_per_node}, or max)",
        )
        for key, label in (
            ("persist_items", "Persist items"),
            ("notify_retract", "Notify subscribers when items are removed"),
            ("notify_delete", "Notify subscribers when the node is deleted"),
            ("deliver_notifications", "Deliver event notifications"),
            ("deliver_payloads", "Deliver payloads with event notifications"),
        ):
            self._field(form, f"pubsub#{key}", "boolean", ["1" if config[key] else "0"], label)
        self._field(
            form,
            "pubsub#send_last_published_item",
            "list-single",
            [config["send_last_published_item"]],
            "When to send the last published item",
            SEND_LAST,
        )
        return form

    @staticmethod
    def _field(
        form: Element,
        var: str,
        type_: str,
        values: list[str],
        label: str | None = None,
        options: Iterable[str] = (),
    ) -> None:
        f = Element(qn(NS_DATA, "field"), {"var": var, "type": type_})
        if label:
            f.set("label", label)
        for option in options:
            opt = Element(qn(NS_DATA, "option"))
            value = Element(qn(NS_DATA, "value"))
            value.text = option
            opt.append(value)
            f.append(opt)
        for text in values:
            value = Element(qn(NS_DATA, "value"))
            value.text = text
            f.append(value)
        form.append(f)


# -- entity capabilities (XEP-0115) -----------------------------------------------------


def caps_verification_string(query: Element) -> str:
    """XEP-0115 §5.1: the string a disco#info result's ``ver`` hash is computed over."""
    identities = sorted(
        (
            i.get("category", ""),
            i.get("type", ""),
            i.get(XML_LANG, ""),
            i.get("name", ""),
        )
        for i in query.findall(qn(NS_DISCO_INFO, "identity"))
    )
    out = "".join("/".join(identity) + "<" for identity in identities)
    features = sorted(f.get("var", "") for f in query.findall(qn(NS_DISCO_INFO, "feature")))
    out += "".join(feature + "<" for feature in features)
    forms: list[tuple[str, str]] = []
    for form in query.findall(qn(NS_DATA, "x")):
        fields = form_fields(form)
        form_type = fields.pop("FORM_TYPE", [""])
        text = form_type[0] + "<" if form_type else ""
        for var in sorted(fields):
            text += var + "<" + "".join(v + "<" for v in sorted(fields[var]))
        forms.append((form_type[0] if form_type else "", text))
    out += "".join(text for _, text in sorted(forms))
    return out


def caps_hash(query: Element, algo: str) -> str | None:
    name = _HASHES.get(algo)
    if name is None:
        return None
    digest = hashlib.new(name, caps_verification_string(query).encode()).digest()
    return base64.b64encode(digest).decode()


@dataclass
class _Interest:
    """What one resource's current capabilities say it wants: ``nodes`` once known."""

    key: tuple[str, str, str]  # (caps node, ver, hash)
    nodes: frozenset[str] | None = None


# -- the module ---------------------------------------------------------------------------


class Pep(Module):
    name = "pep"
    options_class = PepOptions
    account_features = FEATURES
    account_identities = ({"category": "pubsub", "type": "pep"},)

    def __init__(self, host: Host, options: PepOptions) -> None:
        super().__init__(host, options)
        self.options: PepOptions = options
        self.config = NodeConfig(options)
        self._interest: dict[JID, _Interest] = {}  # full JID → interest of its presence
        self._caps: dict[tuple[str, str], frozenset[str]] = {}  # verified (hash, ver) → nodes
        self._tasks: set[asyncio.Task[None]] = set()
        self._purger: asyncio.Task[None] | None = None
        self.node_listeners: list[Callable[[JID, str], Awaitable[None]]] = []
        """Called with (owner, node) after a node's items changed or the node went (stickers
        pin the uploads their packs reference)."""

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "bare", NS_PUBSUB, "pubsub"), self.on_get)
        router.add_iq(IqKey("set", "bare", NS_PUBSUB, "pubsub"), self.on_set)
        router.add_iq(IqKey("get", "bare", NS_OWNER, "pubsub"), self.on_owner_get)
        router.add_iq(IqKey("set", "bare", NS_OWNER, "pubsub"), self.on_owner_set)
        # Before the presence module, which ends the stanza's journey.
        router.add_hook("presence/self", self.on_presence, priority=10)
        router.on_unbound(self.on_session_closed)

    async def start(self) -> None:
        self._purger = asyncio.create_task(self._purge_forever(), name="pep-status-expiry")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._purger] if self._purger is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._purger = None

    # -- helpers ------------------------------------------------------------------------

    async def _changed(self, owner: JID, node: str) -> None:
        for listener in self.node_listeners:
            try:
                await listener(owner, node)
            except SQLAlchemyError:
                log.exception("a listener of %s's node %s failed", owner, node)

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expiry_cutoff(self, node: str) -> datetime | None:
        if node != STATUS_NODE:
            return None
        return datetime.now(UTC) - timedelta(seconds=self.options.status_ttl)

    async def _items(
        self,
        owner: JID,
        node: str,
        *,
        max_items: int | None = None,
        item_ids: list[str] | None = None,
    ) -> list[StoredPepItem]:
        return await self.host.storage.pep.items(
            str(owner),
            node,
            max_items=max_items,
            item_ids=item_ids,
            published_after=self._expiry_cutoff(node),
        )

    async def _node(self, owner: JID, name: str) -> tuple[StoredPepNode, dict[str, Any]]:
        node = await self.host.storage.pep.get_node(str(owner), name)
        if node is None:
            raise ItemNotFound("no such node")
        return node, self._config_of(node)

    def _config_of(self, node: StoredPepNode) -> dict[str, Any]:
        return {**self.config.default(node.node), **node.config}

    async def _may_read(
        self, owner: JID, node: StoredPepNode, requester: JID
    ) -> StanzaError | None:
        """None if ``requester`` may read ``node``, else the error to answer (XEP-0060 §6.5.9)."""
        if requester.bare == owner.bare:
            return None
        affiliation = node.affiliations.get(str(requester.bare), "none")
        if affiliation == "outcast":
            return Forbidden("you are banned from this node")
        model = self._config_of(node)["access_model"]
        if model == "open" or affiliation in READERS:
            return None
        if model == "presence":
            if await may_see_presence(self.host, owner, requester):
                return None
            return _pubsub_error(
                NotAuthorized, "presence-subscription-required", "only contacts may read this node"
            )
        return _pubsub_error(NotAllowed, "closed-node", "this node is on a whitelist")

    def _reply(self, origin: Session | None, iq: Element, *payloads: Element) -> None:
        if origin is not None:
            origin.deliver(iq_result(iq, *payloads))

    @staticmethod
    def _node_attr(el: Element) -> str:
        node = el.get("node")
        if not node:
            raise _pubsub_error(BadRequest, "nodeid-required", "a node is required")
        return node

    @staticmethod
    def _owner_only(requester: JID, account: JID) -> None:
        if requester.bare != account:
            raise Forbidden("only the account owner may do this")

    # -- items retrieval ----------------------------------------------------------------

    async def on_get(self, origin: Session | None, iq: Element) -> None:
        requester, account = iq_addresses(iq)
        pubsub = iq.find(qn(NS_PUBSUB, "pubsub"))
        assert pubsub is not None
        items_el = pubsub.find(qn(NS_PUBSUB, "items"))
        if items_el is None:
            if pubsub.find(qn(NS_PUBSUB, "subscriptions")) is not None:
                # Subscriptions to PEP nodes are implicit (presence and +notify): none to list.
                self._owner_only(requester, account)
                out = Element(qn(NS_PUBSUB, "pubsub"))
                out.append(Element(qn(NS_PUBSUB, "subscriptions")))
                self._reply(origin, iq, out)
                return
            raise self._unsupported(pubsub)
        name = self._node_attr(items_el)
        node, _config = await self._node(account, name)
        if (error := await self._may_read(account, node, requester)) is not None:
            raise error
        ids = [i.get("id", "") for i in items_el.findall(qn(NS_PUBSUB, "item"))]
        max_items: int | None = None
        if ids:
            if not all(ids):
                raise _pubsub_error(BadRequest, "item-required", "items need ids")
            found = await self._items(account, name, item_ids=ids)
            if not found:
                raise ItemNotFound("no such item")
        else:
            if (raw := items_el.get("max_items")) is not None:
                try:
                    max_items = int(raw)
                except ValueError:
                    raise BadRequest("max_items must be an integer") from None
                if max_items < 1:
                    raise BadRequest("max_items must be at least 1")
            found = await self._items(account, name, max_items=max_items)
        out = Element(qn(NS_PUBSUB, "pubsub"))
        result = Element(qn(NS_PUBSUB, "items"), {"node": name})
        for item in found:
            result.append(self._item_element(NS_PUBSUB, item))
        out.append(result)
        self._reply(origin, iq, out)

    @staticmethod
    def _item_element(ns: str, item: StoredPepItem) -> Element:
        el = Element(qn(ns, "item"), {"id": item.item_id})
        try:
            el.append(fromstring(item.payload))
        except (ValueError, StreamError):
            log.error("stored PEP item %s has damaged XML", item.item_id)
        return el

    @staticmethod
    def _unsupported(pubsub: Element) -> StanzaError:
        first = next(iter(pubsub), None)
        feature = first.tag.rpartition("}")[2] if first is not None else "publish"
        return _pubsub_error(
            FeatureNotImplemented,
            "unsupported",
            f"{feature} is not supported on PEP nodes",
            feature=feature,
        )

    # -- publish, retract, create ----------------------------------------------------

    async def on_set(self, origin: Session | None, iq: Element) -> None:
        requester, account = iq_addresses(iq)
        pubsub = iq.find(qn(NS_PUBSUB, "pubsub"))
        assert pubsub is not None
        if (publish := pubsub.find(qn(NS_PUBSUB, "publish"))) is not None:
            self._owner_only(requester, account)
            options = pubsub.find(qn(NS_PUBSUB, "publish-options"))
            form = options.find(qn(NS_DATA, "x")) if options is not None else None
            await self._publish(origin, iq, requester, publish, form)
        elif (retract := pubsub.find(qn(NS_PUBSUB, "retract"))) is not None:
            self._owner_only(requester, account)
            await self._retract(origin, iq, requester, retract)
        elif (create := pubsub.find(qn(NS_PUBSUB, "create"))) is not None:
            self._owner_only(requester, account)
            configure = pubsub.find(qn(NS_PUBSUB, "configure"))
            form = configure.find(qn(NS_DATA, "x")) if configure is not None else None
            await self._create(origin, iq, requester, create, form)
        else:
            raise self._unsupported(pubsub)

    async def _new_node(self, owner: JID, name: str, config: dict[str, Any]) -> bool:
        pep = self.host.storage.pep
        if len(await pep.nodes(str(owner))) >= self.options.max_nodes_per_user:
            raise NotAllowed(f"an account may have at most {self.options.max_nodes_per_user} nodes")
        return await pep.create_node(str(owner), name, config)

    async def _create(
        self,
        origin: Session | None,
        iq: Element,
        requester: JID,
        create: Element,
        form: Element | None,
    ) -> None:
        owner = requester.bare
        name = create.get("node") or f"natter-{uuid.uuid4().hex}"
        config = self.config.apply(self.config.default(name), form)
        if not await self._new_node(owner, name, config):
            raise Conflict("the node exists")
        out = Element(qn(NS_PUBSUB, "pubsub"))
        out.append(Element(qn(NS_PUBSUB, "create"), {"node": name}))
        self._reply(origin, iq, out)

    async def _publish(
        self,
        origin: Session | None,
        iq: Element,
        requester: JID,
        publish: Element,
        form: Element | None,
    ) -> None:
        owner = requester.bare
        name = self._node_attr(publish)
        items = publish.findall(qn(NS_PUBSUB, "item"))
        if not items:
            raise _pubsub_error(BadRequest, "item-required", "publish an item")
        if len(items) > 1:
            raise _pubsub_error(BadRequest, "invalid-payload", "publish one item at a time")
        item = items[0]
        payloads = list(item)
        if not payloads:
            raise _pubsub_error(BadRequest, "payload-required", "the item needs a payload")
        if len(payloads) > 1:
            raise _pubsub_error(BadRequest, "invalid-payload", "one payload element per item")
        text = tostring(payloads[0], parent_ns="")
        if len(text.encode()) > self.options.max_item_size:
            raise _pubsub_error(
                NotAcceptable,
                "payload-too-big",
                f"items are limited to {self.options.max_item_size} bytes",
            )
        wanted = self.config.preconditions(form) if form is not None else {}
        pep = self.host.storage.pep
        node = await pep.get_node(str(owner), name)
        if node is None:
            config = {**self.config.default(name), **wanted}
            if not await self._new_node(owner, name, config):
                node = await pep.get_node(str(owner), name)  # a racing publish created it
        if node is not None:
            config = self._config_of(node)
            for key, value in wanted.items():
                if config.get(key) != value:
                    raise PreconditionNotMet(
                        f"the node's pubsub#{key} is {config.get(key)!r}, not {value!r}"
                    )
        else:
            node = StoredPepNode(name, config, {}, datetime.now(UTC))
        item_id = item.get("id") or uuid.uuid4().hex
        keep = config["max_items"] if config["persist_items"] else 1
        await pep.publish(str(owner), name, item_id, text, str(requester), max_items=keep)
        await self._changed(owner, name)
        out = Element(qn(NS_PUBSUB, "pubsub"))
        published = Element(qn(NS_PUBSUB, "publish"), {"node": name})
        published.append(Element(qn(NS_PUBSUB, "item"), {"id": item_id}))
        out.append(published)
        self._reply(origin, iq, out)
        if config["deliver_notifications"]:
            stored = StoredPepItem(item_id, text, str(requester), datetime.now(UTC))
            items_el = Element(qn(NS_EVENT, "items"), {"node": name})
            entry = self._item_element(NS_EVENT, stored)
            if not config["deliver_payloads"]:
                entry = Element(qn(NS_EVENT, "item"), {"id": item_id})
            items_el.append(entry)
            await self._notify(owner, node, items_el)

    async def _retract(
        self, origin: Session | None, iq: Element, requester: JID, retract: Element
    ) -> None:
        owner = requester.bare
        name = self._node_attr(retract)
        node, config = await self._node(owner, name)
        ids = [i.get("id", "") for i in retract.findall(qn(NS_PUBSUB, "item"))]
        if not ids or not all(ids):
            raise _pubsub_error(BadRequest, "item-required", "name the items to retract")
        removed = await self.host.storage.pep.retract(str(owner), name, ids)
        if not removed:
            raise ItemNotFound("no such item")
        await self._changed(owner, name)
        self._reply(origin, iq)
        notify = retract.get("notify")
        if notify in ("1", "true") or (notify is None and config["notify_retract"]):
            items_el = Element(qn(NS_EVENT, "items"), {"node": name})
            for item_id in removed:
                items_el.append(Element(qn(NS_EVENT, "retract"), {"id": item_id}))
            await self._notify(owner, node, items_el)

    # -- owner operations -------------------------------------------------------------

    async def on_owner_get(self, origin: Session | None, iq: Element) -> None:
        requester, account = iq_addresses(iq)
        self._owner_only(requester, account)
        pubsub = iq.find(qn(NS_OWNER, "pubsub"))
        assert pubsub is not None
        out = Element(qn(NS_OWNER, "pubsub"))
        if (configure := pubsub.find(qn(NS_OWNER, "configure"))) is not None:
            name = self._node_attr(configure)
            _node, config = await self._node(account, name)
            el = Element(qn(NS_OWNER, "configure"), {"node": name})
            el.append(self.config.form(config, node=name))
            out.append(el)
        elif pubsub.find(qn(NS_OWNER, "default")) is not None:
            el = Element(qn(NS_OWNER, "default"))
            el.append(self.config.form(self.config.default(""), node=None))
            out.append(el)
        elif (affiliations := pubsub.find(qn(NS_OWNER, "affiliations"))) is not None:
            name = self._node_attr(affiliations)
            node, _config = await self._node(account, name)
            el = Element(qn(NS_OWNER, "affiliations"), {"node": name})
            el.append(
                Element(qn(NS_OWNER, "affiliation"), {"jid": str(account), "affiliation": "owner"})
            )
            for jid, affiliation in sorted(node.affiliations.items()):
                el.append(
                    Element(qn(NS_OWNER, "affiliation"), {"jid": jid, "affiliation": affiliation})
                )
            out.append(el)
        else:
            raise self._unsupported(pubsub)
        self._reply(origin, iq, out)

    async def on_owner_set(self, origin: Session | None, iq: Element) -> None:
        requester, account = iq_addresses(iq)
        self._owner_only(requester, account)
        pubsub = iq.find(qn(NS_OWNER, "pubsub"))
        assert pubsub is not None
        pep = self.host.storage.pep
        if (configure := pubsub.find(qn(NS_OWNER, "configure"))) is not None:
            name = self._node_attr(configure)
            _node, config = await self._node(account, name)
            form = configure.find(qn(NS_DATA, "x"))
            if form is not None and form.get("type") != "cancel":
                new = self.config.apply(config, form)
                keep = new["max_items"] if new["persist_items"] else 1
                await pep.configure(str(account), name, new, max_items=keep)
                await self._changed(account, name)
        elif (delete := pubsub.find(qn(NS_OWNER, "delete"))) is not None:
            name = self._node_attr(delete)
            node, config = await self._node(account, name)
            recipients = await self._recipients(account, node)
            await pep.delete_node(str(account), name)
            await self._changed(account, name)
            self._reply(origin, iq)
            if config["notify_delete"]:
                await self._send_event(
                    account, recipients, Element(qn(NS_EVENT, "delete"), {"node": name})
                )
            return
        elif (purge := pubsub.find(qn(NS_OWNER, "purge"))) is not None:
            name = self._node_attr(purge)
            node, config = await self._node(account, name)
            await pep.purge(str(account), name)
            await self._changed(account, name)
            self._reply(origin, iq)
            if config["notify_retract"]:
                await self._notify(account, node, Element(qn(NS_EVENT, "purge"), {"node": name}))
            return
        elif (affiliations := pubsub.find(qn(NS_OWNER, "affiliations"))) is not None:
            name = self._node_attr(affiliations)
            node, _config = await self._node(account, name)
            table = dict(node.affiliations)
            for el in affiliations.findall(qn(NS_OWNER, "affiliation")):
                affiliation = el.get("affiliation", "")
                try:
                    jid = JID.parse(el.get("jid", "")).bare
                except ValueError:
                    raise BadRequest("bad JID in an affiliation") from None
                if affiliation not in AFFILIATIONS or affiliation == "owner" or jid == account:
                    raise NotAcceptable(f"cannot make {jid} {affiliation!r}")
                if affiliation == "none":
                    table.pop(str(jid), None)
                else:
                    table[str(jid)] = affiliation
            await pep.set_affiliations(str(account), name, table)
        else:
            raise self._unsupported(pubsub)
        self._reply(origin, iq)

    # -- disco --------------------------------------------------------------------------

    async def account_disco_items(self, account: JID, requester: JID) -> list[dict[str, str]]:
        """The account's nodes that ``requester`` may read, for disco#items."""
        out = []
        for node in await self.host.storage.pep.nodes(str(account)):
            if await self._may_read(account, node, requester) is None:
                out.append({"jid": str(account), "node": node.node})
        return out

    # -- notifications ------------------------------------------------------------------

    def interest_of(self, full: JID) -> frozenset[str] | None:
        """The nodes a resource's capabilities ask notifications for; None while unknown."""
        interest = self._interest.get(full)
        return None if interest is None else interest.nodes

    def _wants(self, session: Session, node: str) -> bool:
        interest = self._interest.get(session.jid)
        return interest is not None and interest.nodes is not None and node in interest.nodes

    async def _recipients(self, owner: JID, node: StoredPepNode) -> list[Session]:
        """The available resources entitled to ``node``'s events that asked for them."""
        router = self.host.router
        out = [s for s in router.available(owner) if self._wants(s, node.node)]
        candidates = {jid for jid, aff in node.affiliations.items() if aff in READERS}
        if self._config_of(node)["access_model"] != "whitelist":
            for item in await self.host.storage.rosters.items(str(owner)):
                if item.subscription in HAS_FROM:
                    candidates.add(item.jid)
        for candidate in sorted(candidates):
            try:
                contact = JID.parse(candidate)
            except ValueError:
                continue
            if contact.domain != self.host.router.domain or contact.bare == owner:
                continue
            sessions = [s for s in router.available(contact) if self._wants(s, node.node)]
            if sessions and await self._may_read(owner, node, contact) is None:
                out.extend(sessions)
        return out

    async def _notify(self, owner: JID, node: StoredPepNode, event_child: Element) -> None:
        await self._send_event(owner, await self._recipients(owner, node), event_child)

    async def _send_event(
        self, owner: JID, sessions: Iterable[Session], event_child: Element
    ) -> None:
        for session in sessions:
            message = make("message", from_=owner, to=session.jid, type="headline", id=new_id())
            event = Element(qn(NS_EVENT, "event"))
            event.append(event_child)
            message.append(event)
            await self.host.router.deliver(message)

    # -- interest: entity capabilities --------------------------------------------------

    async def on_presence(self, origin: Session | None, stanza: Element, user: JID) -> bool:
        if origin is None:
            return False
        type_ = stanza.get("type")
        if type_ == "unavailable":
            self._interest.pop(origin.jid, None)
        elif type_ is None:
            caps = stanza.find(qn(NS_CAPS, "c"))
            if caps is None:
                self._interest[origin.jid] = _Interest(("", "", ""), frozenset())
                return False
            key = (caps.get("node", ""), caps.get("ver", ""), caps.get("hash", ""))
            current = self._interest.get(origin.jid)
            if current is not None and current.key == key:
                return False
            previous = current.nodes if current is not None else None
            self._interest[origin.jid] = _Interest(key)
            self._spawn(self._learn(origin, key, previous or frozenset()), "pep-caps")
        return False

    async def on_session_closed(self, session: Session) -> None:
        self._interest.pop(session.jid, None)

    async def _learn(
        self, session: Session, key: tuple[str, str, str], previous: frozenset[str]
    ) -> None:
        """Find out what ``key`` means, record it, and send the last items of new interests."""
        try:
            nodes = await self._resolve(session, key)
        except Exception:
            log.exception("resolving the capabilities of %s failed", session.jid)
            nodes = frozenset()
        interest = self._interest.get(session.jid)
        if interest is None or interest.key != key:
            return  # went away, or changed its capabilities meanwhile
        interest.nodes = nodes
        if nodes - previous:
            try:
                await self._send_last_items(session, nodes - previous)
            except SQLAlchemyError:
                log.exception("sending the last PEP items to %s failed", session.jid)

    async def _resolve(self, session: Session, key: tuple[str, str, str]) -> frozenset[str]:
        caps_node, ver, algo = key
        known = self._caps.get((algo, ver))
        if known is not None:
            return known
        query = Element(qn(NS_DISCO_INFO, "query"), {"node": f"{caps_node}#{ver}"})
        iq = make("iq", to=session.jid, type="get")
        iq.append(query)
        try:
            answer = await self.host.router.request(iq, self.options.caps_timeout)
        except (TimeoutError, StanzaError):
            return frozenset()
        result = answer.find(qn(NS_DISCO_INFO, "query"))
        if answer.get("type") != "result" or result is None:
            return frozenset()
        nodes = frozenset(
            var.removesuffix(NOTIFY_SUFFIX)
            for f in result.findall(qn(NS_DISCO_INFO, "feature"))
            if (var := f.get("var", "")).endswith(NOTIFY_SUFFIX)
        )
        if algo and caps_hash(result, algo) == ver:
            # Verified: valid for every client with this hash. Few distinct hashes exist (one
            # per client version and configuration); the bound only guards against floods.
            if len(self._caps) >= CAPS_CACHE_SIZE:
                self._caps.pop(next(iter(self._caps)))
            self._caps[(algo, ver)] = nodes
        else:
            log.info("capabilities hash of %s does not verify; not cached", session.jid)
        return nodes

    async def _send_last_items(self, session: Session, nodes: frozenset[str]) -> None:
        """XEP-0163 §6.2: the last item of each wanted node of the user and its contacts."""
        user = session.jid.bare
        owners = [user]
        for item in await self.host.storage.rosters.items(str(user)):
            if item.subscription in HAS_TO:
                with contextlib.suppress(ValueError):
                    contact = JID.parse(item.jid)
                    if contact.domain == self.host.router.domain and contact.bare != user:
                        owners.append(contact.bare)
        pep = self.host.storage.pep
        for owner in owners:
            for node in await pep.nodes(str(owner)):
                if node.node not in nodes:
                    continue
                config = self._config_of(node)
                if config["send_last_published_item"] != "on_sub_and_presence":
                    continue
                if not config["deliver_notifications"]:
                    continue
                if await self._may_read(owner, node, session.jid) is not None:
                    continue
                # Every current status update, like a status feed; the last item otherwise.
                last = await self._items(
                    owner, node.node, max_items=None if node.node == STATUS_NODE else 1
                )
                if not last:
                    continue
                items_el = Element(qn(NS_EVENT, "items"), {"node": node.node})
                for stored in last:
                    items_el.append(self._item_element(NS_EVENT, stored))
                if self._interest.get(session.jid) is None:
                    return  # the session went away
                await self._send_event(owner, [session], items_el)

    # -- status expiry ------------------------------------------------------------------

    async def _purge_forever(self) -> None:
        interval = min(max(self.options.status_ttl / 4, 1.0), PURGE_INTERVAL_MAX)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.purge_expired()
            except (SQLAlchemyError, OSError):
                log.exception("status expiry purge failed; trying again later")

    async def purge_expired(self) -> int:
        """Delete expired status updates of every account; returns how many."""
        cutoff = self._expiry_cutoff(STATUS_NODE)
        assert cutoff is not None
        return await self.host.storage.pep.expire(STATUS_NODE, cutoff)
