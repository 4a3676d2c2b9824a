"""XEP-0449 Stickers on top of PEP and HTTP File Upload.

Users publish sticker packs to their PEP node ``urn:xmpp:stickers:0`` (open to anyone and
keeping many items by default: ``pep.py``). What a pack needs from the server is that its files
stay: after every change to a user's sticker node this module pins the user's uploads whose GET
URLs appear in the node's packs and unpins the others, so the expiry purge (``natterctl uploads
purge``) keeps exactly the files some pack references. Only the publisher's own uploads are
pinned: naming someone else's URL in a pack must not keep their file against their quota.

Server-wide packs (``natterctl stickers import``) are items of the node of the same name on
the domain JID, open to everyone and read-only for users; clients fetch them with an ordinary
pubsub items request to the domain. Their files are uploads owned by the bare domain. The node
is kept with the PEP nodes under the reserved owner ``&stickers@DOMAIN``: a JID localpart
cannot contain ``&``, so no account can collide with it. It is read from storage on every
request, so ``natterctl`` can change it while natterd runs.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xmpp_server.errors import (
    BadRequest,
    FeatureNotImplemented,
    Forbidden,
    ItemNotFound,
    StreamError,
)
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.modules.pep import NS_PUBSUB, STICKERS_NODE, Pep
from xmpp_server.modules.upload import clean_filename, download_url, slot_of_url
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_result, qn
from xmpp_server.storage.pep import StoredPepItem
from xmpp_server.storage.uploads import Completion
from xmpp_server.xml import XML_LANG, Element, fromstring, tostring

if TYPE_CHECKING:
    from xmpp_server.blobs import BlobStore
    from xmpp_server.storage import Storage

log = logging.getLogger("natterd.stickers")

NS_STICKERS = STICKERS_NODE  # the node is named after the namespace
NS_FILE = "urn:xmpp:file:metadata:0"  # XEP-0446
NS_SFS = "urn:xmpp:sfs:0"  # XEP-0447
NS_URL_DATA = "http://jabber.org/protocol/url-data"  # XEP-0103
NS_HASHES = "urn:xmpp:hashes:2"  # XEP-0300
SERVER_OWNER = "&stickers"
"""Localpart under which the domain's own sticker node is stored (not a valid JID localpart)."""

_HASHES = {"sha-256": "sha256", "sha-384": "sha384", "sha-512": "sha512"}
# XEP-0449 §4.1.2 separators: unit, record, group and file separator.
_US, _RS, _GS, _FS = b"\x1f", b"\x1e", b"\x1d", b"\x1c"


def server_node_owner(domain: str) -> str:
    """The storage owner of the domain's sticker node."""
    return f"{SERVER_OWNER}@{domain}"


# -- packs: pure -------------------------------------------------------------------------


def pack_hash(pack: Element, algo: str = "sha-256") -> str:
    """XEP-0449 §4.1.2: the base64 hash over the pack's names, summaries, descs and hashes."""
    name = _HASHES.get(algo)
    if name is None:
        raise ValueError(f"unsupported hash algorithm {algo!r}")
    meta = []
    for child in pack:
        if child.tag in (qn(NS_STICKERS, "name"), qn(NS_STICKERS, "summary")):
            local = child.tag.rpartition("}")[2]
            parts = (local, child.get(XML_LANG, ""), child.text or "")
            meta.append(b"".join(part.encode() + _US for part in parts) + _RS)
    stickers = []
    for item in pack.findall(qn(NS_STICKERS, "item")):
        file = item.find(qn(NS_FILE, "file"))
        if file is None:
            raise ValueError("a sticker without <file/>")
        descs = [d for d in file.findall(qn(NS_FILE, "desc")) if d.get(XML_LANG) is None]
        if len(descs) != 1:
            raise ValueError("a sticker needs one <desc/> without xml:lang")
        hashes = sorted(
            (h.get("algo", "").encode() + _US + (h.text or "").encode() + _US + _RS)
            for h in file.findall(qn(NS_HASHES, "hash"))
        )
        stickers.append((descs[0].text or "").encode() + _RS + b"".join(hashes) + _GS)
    data = b"".join(sorted(meta)) + _FS + b"".join(sorted(stickers)) + _FS
    return base64.b64encode(hashlib.new(name, data).digest()).decode()


def pack_id(digest: str) -> str:
    """The pack's id (its pubsub item id): the first 144 bits of the hash, in base64."""
    return digest[:24]


def pack_urls(pack: Element) -> list[str]:
    """The url-data targets of every sticker's sources."""
    return [
        url
        for item in pack.findall(qn(NS_STICKERS, "item"))
        for sources in item.findall(qn(NS_SFS, "sources"))
        for data in sources.findall(qn(NS_URL_DATA, "url-data"))
        if (url := data.get("target"))
    ]


@dataclass(frozen=True)
class Sticker:
    """One image of a pack, as it is stored and advertised."""

    url: str
    media_type: str
    size: int
    sha256: bytes
    desc: str
    width: int | None = None
    height: int | None = None


def _text(ns: str, tag: str, text: str) -> Element:
    el = Element(qn(ns, tag))
    el.text = text
    return el


def build_pack(name: str, summary: str | None, stickers: Iterable[Sticker]) -> Element:
    """A ``<pack/>`` with its ``<hash/>``; its id is ``pack_id`` of that hash."""
    pack = Element(qn(NS_STICKERS, "pack"))
    pack.append(_text(NS_STICKERS, "name", name))
    if summary:
        pack.append(_text(NS_STICKERS, "summary", summary))
    for sticker in stickers:
        item = Element(qn(NS_STICKERS, "item"))
        file = Element(qn(NS_FILE, "file"))
        file.append(_text(NS_FILE, "media-type", sticker.media_type))
        file.append(_text(NS_FILE, "desc", sticker.desc))
        file.append(_text(NS_FILE, "size", str(sticker.size)))
        if sticker.width and sticker.height:
            file.append(_text(NS_FILE, "dimension", f"{sticker.width}x{sticker.height}"))
        digest = _text(NS_HASHES, "hash", base64.b64encode(sticker.sha256).decode())
        digest.set("algo", "sha-256")
        file.append(digest)
        item.append(file)
        sources = Element(qn(NS_SFS, "sources"))
        sources.append(Element(qn(NS_URL_DATA, "url-data"), {"target": sticker.url}))
        item.append(sources)
        pack.append(item)
    digest = _text(NS_HASHES, "hash", pack_hash(pack))
    digest.set("algo", "sha-256")
    pack.append(digest)
    return pack


def _payload(item: StoredPepItem) -> Element | None:
    try:
        return fromstring(item.payload)
    except (ValueError, StreamError):
        log.error("stored sticker pack %s has damaged XML", item.item_id)
        return None


# -- storage operations (the module and natterctl) ----------------------------------------


async def repin(storage: Storage, owner: str, node_owner: str, base_url: str) -> int:
    """Pin ``owner``'s uploads referenced by the packs on ``node_owner``'s sticker node and
    unpin the rest; returns how many are pinned."""
    slots = set()
    for item in await storage.pep.items(node_owner, NS_STICKERS):
        pack = _payload(item)
        for url in pack_urls(pack) if pack is not None else ():
            if (found := slot_of_url(base_url, url)) is not None:
                slots.add(found[0])
    return await storage.uploads.set_pinned(owner, slots)


async def import_pack(
    storage: Storage,
    blobs: BlobStore,
    domain: str,
    base_url: str,
    files: Iterable[Path],
    name: str,
    summary: str | None = None,
) -> tuple[str, int]:
    """Store each image as an upload of the domain and publish a pack of them on the domain's
    sticker node; returns (pack id, stickers). ValueError if there is no image. The files are
    pinned once the pack is published: those of an import that failed half-way expire."""
    from PIL import Image, UnidentifiedImageError

    stickers = []
    for path in files:
        media_type = mimetypes.guess_type(path.name)[0] or ""
        if not media_type.startswith("image/"):
            continue
        data = path.read_bytes()
        width = height = None
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError):
            pass  # an image Pillow does not know: served without dimensions
        filename = clean_filename(path.name)
        slot = secrets.token_urlsafe(24)
        key = f"{slot[:2]}/{slot}"
        digest = hashlib.sha256(data)
        await blobs.put(key, data, media_type)
        await storage.uploads.create(
            domain,
            slot,
            filename,
            len(data),
            media_type,
            key,
            completed=Completion(digest.hexdigest(), width, height),
        )
        desc = path.stem.replace("_", " ").replace("-", " ")
        url = download_url(base_url, slot, filename)
        stickers.append(Sticker(url, media_type, len(data), digest.digest(), desc, width, height))
    if not stickers:
        raise ValueError("no image files (by extension: .png, .webp, .gif, ...)")
    pack = build_pack(name, summary, stickers)
    digest_el = pack.find(qn(NS_HASHES, "hash"))
    assert digest_el is not None and digest_el.text
    item_id = pack_id(digest_el.text)
    owner = server_node_owner(domain)
    await storage.pep.create_node(owner, NS_STICKERS, {"access_model": "open"})
    await storage.pep.publish(owner, NS_STICKERS, item_id, tostring(pack, parent_ns=""), domain)
    await repin(storage, domain, owner, base_url)
    return item_id, len(stickers)


async def server_packs(storage: Storage, domain: str) -> list[tuple[str, Element | None]]:
    """(pack id, pack) of the domain's packs, oldest first."""
    items = await storage.pep.items(server_node_owner(domain), NS_STICKERS)
    return [(item.item_id, _payload(item)) for item in items]


async def remove_pack(
    storage: Storage, blobs: BlobStore, domain: str, base_url: str, item_id: str
) -> bool:
    """Retract a server pack and delete the domain's files no pack references any more;
    False if there is no such pack."""
    owner = server_node_owner(domain)
    if not await storage.pep.retract(owner, NS_STICKERS, [item_id]):
        return False
    await repin(storage, domain, owner, base_url)
    unused = [u for u in await storage.uploads.list(domain) if not u.pinned]
    for upload in unused:
        for key in (upload.path, upload.thumbnail):
            if key:
                await blobs.delete(key)
    await storage.uploads.delete([u.slot for u in unused])
    return True


# -- the module ----------------------------------------------------------------------------


class Stickers(Module):
    name = "stickers"

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "host", NS_PUBSUB, "pubsub"), self.on_server_get)
        router.add_iq(IqKey("set", "host", NS_PUBSUB, "pubsub"), self.on_server_set)
        pep = self.host.modules.get("pep")
        if isinstance(pep, Pep):
            pep.node_listeners.append(self.on_node_changed)

    def disco_nodes(self) -> list[dict[str, str]]:
        """The domain's sticker node, for disco#items on the server's JID (XEP-0060 §5.2)."""
        return [{"jid": self.host.domain, "node": NS_STICKERS, "name": "Sticker packs"}]

    async def on_node_changed(self, owner: JID, node: str) -> None:
        if node == NS_STICKERS:
            user = str(owner.bare)
            await repin(self.host.storage, user, user, self.host.config.http_public_url)

    async def on_server_get(self, origin: Session | None, iq: Element) -> None:
        """Items of the domain's sticker node (XEP-0060 §6.5), open to anyone."""
        pubsub = iq.find(qn(NS_PUBSUB, "pubsub"))
        assert pubsub is not None
        items_el = pubsub.find(qn(NS_PUBSUB, "items"))
        if items_el is None:
            raise FeatureNotImplemented("only items retrieval is offered on this JID")
        if items_el.get("node") != NS_STICKERS:
            raise ItemNotFound("no such node")
        ids = [i.get("id", "") for i in items_el.findall(qn(NS_PUBSUB, "item"))]
        max_items: int | None = None
        if (raw := items_el.get("max_items")) is not None:
            try:
                max_items = max(0, int(raw))
            except ValueError:
                raise BadRequest("max_items must be an integer") from None
        found = await self.host.storage.pep.items(
            server_node_owner(self.host.domain),
            NS_STICKERS,
            max_items=None if ids else max_items,
            item_ids=ids or None,
        )
        if ids and not found:
            raise ItemNotFound("no such item")
        out = Element(qn(NS_PUBSUB, "pubsub"))
        result = Element(qn(NS_PUBSUB, "items"), {"node": NS_STICKERS})
        for item in found:
            entry = Element(qn(NS_PUBSUB, "item"), {"id": item.item_id})
            if (pack := _payload(item)) is not None:
                entry.append(pack)
            result.append(entry)
        out.append(result)
        if origin is not None:
            origin.deliver(iq_result(iq, out))

    async def on_server_set(self, origin: Session | None, iq: Element) -> None:
        raise Forbidden("the server's sticker packs are managed with natterctl stickers")
