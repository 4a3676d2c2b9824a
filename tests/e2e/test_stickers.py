"""XEP-0449 stickers: packs on PEP and on the domain, pinned uploads, sticker messages."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.e2e.harness import DOMAIN, TIMEOUT, Client, add_user, clients, next_matching
from tests.e2e.test_pep import options, result_items
from tests.e2e.test_upload import age, fetch, png, upload, upload_server
from xmpp_server.cli import ctl_main
from xmpp_server.modules.stickers import (
    NS_FILE,
    NS_HASHES,
    NS_SFS,
    NS_STICKERS,
    NS_URL_DATA,
    Sticker,
    build_pack,
    pack_hash,
    pack_id,
)
from xmpp_server.server import Server

NODE = NS_STICKERS
PURGE = ("uploads", "purge", "--older-than", "1")  # whatever is older than a day


async def login(server: Server, name: str) -> Client:
    client = Client(server, await add_user(server, name))
    for plugin in ("xep_0060", "xep_0313", "xep_0363"):
        client.register_plugin(plugin)
    await client.login()
    return client


def ctl(tmp_path: Path, db_url: str, base: str, *argv: str) -> int:
    """``natterctl`` with the running test server's data directory, database and HTTP URL."""
    config = tmp_path / "natterd.toml"
    config.write_text(
        f'[server]\ndomain = "{DOMAIN}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[storage]\nurl = "{db_url}"\n[http]\npublic_url = "{base}"\n'
    )
    return ctl_main(["--config", str(config), *argv])


def stickers_of(pack: ET.Element) -> list[tuple[str, str, str]]:
    """(url, base64 sha-256, desc) of each sticker of a pack."""
    out = []
    for item in pack.findall(f"{{{NS_STICKERS}}}item"):
        url = item.find(f"{{{NS_SFS}}}sources/{{{NS_URL_DATA}}}url-data")
        digest = item.find(f"{{{NS_FILE}}}file/{{{NS_HASHES}}}hash[@algo='sha-256']")
        assert url is not None and digest is not None and digest.text
        out.append(
            (
                url.get("target", ""),
                digest.text,
                item.findtext(f"{{{NS_FILE}}}file/{{{NS_FILE}}}desc", ""),
            )
        )
    return out


async def download_checked(pack: ET.Element) -> list[bytes]:
    """Every sticker's bytes, checked against the pack's hash of it."""
    out = []
    for url, digest, _desc in stickers_of(pack):
        status, _headers, data = await fetch(url)
        assert status == 200
        assert base64.b64encode(hashlib.sha256(data).digest()).decode() == digest
        out.append(data)
    return out


def sticker(url: str, data: bytes, desc: str) -> Sticker:
    return Sticker(url, "image/png", len(data), hashlib.sha256(data).digest(), desc, 64, 64)


def test_pack_hash_and_id() -> None:
    one = sticker("https://x.example/1/a.png", b"a", "👍")
    two = sticker("https://x.example/2/b.png", b"b", "😘")
    pack = build_pack("Cats", "CC-BY", [one, two])
    digest = pack.find(f"{{{NS_HASHES}}}hash")
    assert digest is not None and digest.get("algo") == "sha-256"
    assert digest.text == pack_hash(pack) and len(pack_id(digest.text)) == 24
    # The hash does not depend on the order of stickers, but on their descriptions.
    assert pack_hash(build_pack("Cats", "CC-BY", [two, one])) == digest.text
    assert pack_hash(build_pack("Cats", "CC-BY", [one, sticker(two.url, b"b", "x")])) != (
        digest.text
    )
    assert pack_hash(build_pack("Dogs", "CC-BY", [one, two])) != digest.text


async def test_user_pack_is_open_pinned_and_unpinned(migrated_db_url: str, tmp_path: Path) -> None:
    async with (
        upload_server(migrated_db_url, tmp_path, expire_days=30) as (server, base),
        clients(await login(server, "alice"), await login(server, "bob")) as (alice, bob),
    ):
        a, b = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
        images = {"thumbs_up.png": png(64, 64), "kiss.png": png(80, 80)}
        urls = {name: await upload(alice, name, data, "image/png") for name, data in images.items()}
        other = await upload(alice, "notes.txt", b"not a sticker", "text/plain")
        pack = build_pack(
            "Blue squares",
            "Public domain",
            [sticker(urls[name], data, name[:-4]) for name, data in images.items()],
        )
        digest = pack.find(f"{{{NS_HASHES}}}hash")
        assert digest is not None and digest.text
        pid = pack_id(digest.text)
        await alice.plugin["xep_0060"].publish(
            JID(a),
            NODE,
            id=pid,
            payload=pack,
            options=options(alice, access_model="open", max_items="max"),
        )

        # Bob is no contact of Alice's: the open node is his to read all the same.
        fetched = result_items(await bob.plugin["xep_0060"].get_items(JID(a), NODE))
        assert [item_id for item_id, _ in fetched] == [pid]
        got = fetched[0][1]
        assert got is not None and got.tag == f"{{{NS_STICKERS}}}pack"
        assert got.findtext(f"{{{NS_STICKERS}}}name") == "Blue squares"
        assert await download_checked(got) == list(images.values())

        # A sticker message without a body (slixmpp's "message" event wants one): delivered,
        # and in Bob's archive.
        bob.register_handler(
            Callback(
                "sticker",
                MatchXPath(f"{{jabber:client}}message/{{{NS_STICKERS}}}sticker"),
                bob.messages.put_nowait,
            )
        )
        first = got.find(f"{{{NS_STICKERS}}}item")
        assert first is not None
        message = alice.make_message(mto=b, mtype="chat")
        message.xml.append(ET.Element(f"{{{NS_STICKERS}}}sticker", {"pack": pid}))
        sharing = ET.SubElement(message.xml, f"{{{NS_SFS}}}file-sharing")
        for child in first:
            sharing.append(copy.deepcopy(child))
        message.send()

        def is_sticker(m: Any) -> bool:
            el = m.xml.find(f"{{{NS_STICKERS}}}sticker")
            return el is not None and el.get("pack") == pid

        received = await next_matching(bob.messages, is_sticker)
        assert received.xml.find(f"{{{NS_SFS}}}file-sharing/{{{NS_FILE}}}file") is not None
        archive = await bob.plugin["xep_0313"].retrieve(rsm={"max": 10})
        stanzas = [r["mam_result"]["forwarded"]["stanza"] for r in archive["mam"]["results"]]
        assert [is_sticker(s) for s in stanzas] == [True]

        # Long after the files expired, a purge keeps the stickers, not the other file.
        uploads = server.host.storage.uploads
        assert sorted(u.filename for u in await uploads.list(a) if u.pinned) == sorted(images)
        await age(server, 40)
        assert await asyncio.to_thread(ctl, tmp_path, migrated_db_url, base, *PURGE) == 0
        assert (await fetch(other))[0] == 404
        assert await download_checked(got) == list(images.values())
        # Pinned files still count against Alice's quota.
        since = datetime.now(UTC) - timedelta(days=1)
        assert await uploads.usage(a, since) == sum(len(d) for d in images.values())

        # Once the pack is retracted nothing holds them.
        await alice.plugin["xep_0060"].retract(JID(a), NODE, pid)
        assert not any(u.pinned for u in await uploads.list(a))
        assert await asyncio.to_thread(ctl, tmp_path, migrated_db_url, base, *PURGE) == 0
        for url in urls.values():
            assert (await fetch(url))[0] == 404
        assert await uploads.list(a) == []


async def test_pin_follows_replacement_and_node_deletion(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with (
        upload_server(migrated_db_url, tmp_path) as (server, _base),
        clients(await login(server, "alice"), await login(server, "mallory")) as (alice, mallory),
    ):
        a = f"alice@{DOMAIN}"
        first = await upload(alice, "one.png", png(10, 10), "image/png")
        second = await upload(alice, "two.png", png(20, 20), "image/png")
        uploads = server.host.storage.uploads

        async def pinned() -> list[str]:
            return sorted(u.filename for u in await uploads.list(a) if u.pinned)

        pubsub = alice.plugin["xep_0060"]
        form = options(alice, access_model="open")
        v1 = build_pack("P", None, [sticker(first, png(10, 10), "one")])
        await pubsub.publish(JID(a), NODE, id="pack", payload=v1, options=form)
        assert await pinned() == ["one.png"]
        # The same item replaced: the file it no longer names is unpinned.
        v2 = build_pack("P", None, [sticker(second, png(20, 20), "two")])
        await pubsub.publish(JID(a), NODE, id="pack", payload=v2, options=form)
        assert await pinned() == ["two.png"]
        # Naming Alice's file in Mallory's pack does not pin it for him or her.
        m = f"mallory@{DOMAIN}"
        await mallory.plugin["xep_0060"].publish(JID(m), NODE, id="copy", payload=v1)
        assert await pinned() == ["two.png"]
        # Published without publish-options: the node's defaults make it open all the same.
        fetched = result_items(await pubsub.get_items(JID(m), NODE))
        assert [item_id for item_id, _ in fetched] == ["copy"]
        await pubsub.delete_node(JID(a), NODE)
        assert await pinned() == []


async def test_server_pack_import(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "pack"
    source.mkdir()
    images = {"wave.png": png(32, 32), "heart_eyes.png": png(48, 48)}
    for name, data in images.items():
        (source / name).write_bytes(data)
    (source / "LICENSE.txt").write_text("CC0")
    async with (
        upload_server(migrated_db_url, tmp_path) as (server, base),
        clients(await login(server, "bob")) as (bob,),
    ):
        argv = ("stickers", "import", str(source), "--name", "Natter", "--summary", "CC0")
        assert await asyncio.to_thread(ctl, tmp_path, migrated_db_url, base, *argv) == 0
        out = capsys.readouterr().out
        assert "(2 stickers)" in out
        empty = tmp_path / "empty"
        empty.mkdir()
        argv = ("stickers", "import", str(empty), "--name", "Nothing")
        assert await asyncio.to_thread(ctl, tmp_path, migrated_db_url, base, *argv) == 2

        # Any user finds the node in the domain's disco#items and fetches it from there with
        # an ordinary items request.
        listed = await bob.plugin["xep_0030"].get_items(jid=DOMAIN, timeout=TIMEOUT)
        assert (DOMAIN, NODE, "Sticker packs") in listed["disco_items"]["items"]
        fetched = result_items(await bob.plugin["xep_0060"].get_items(JID(DOMAIN), NODE))
        assert len(fetched) == 1
        pid, pack = fetched[0]
        assert pack is not None and pid in out
        assert pack.findtext(f"{{{NS_STICKERS}}}name") == "Natter"
        assert pack_id(pack_hash(pack)) == pid
        assert sorted(desc for _, _, desc in stickers_of(pack)) == ["heart eyes", "wave"]
        downloaded = await download_checked(pack)
        assert sorted(downloaded) == sorted(images.values())
        by_id = await bob.plugin["xep_0060"].get_items(JID(DOMAIN), NODE, item_ids=[pid])
        assert [i for i, _ in result_items(by_id)] == [pid]

        # Read-only for users; unknown nodes are not there.
        with pytest.raises(IqError) as info:
            await bob.plugin["xep_0060"].publish(JID(DOMAIN), NODE, id="x", payload=pack)
        assert info.value.iq["error"]["condition"] == "forbidden"
        with pytest.raises(IqError) as info:
            await bob.plugin["xep_0060"].get_items(JID(DOMAIN), "urn:example:other")
        assert info.value.iq["error"]["condition"] == "item-not-found"

        # Pinned: an expiry purge keeps the files.
        await age(server, 400)
        assert await asyncio.to_thread(ctl, tmp_path, migrated_db_url, base, *PURGE) == 0
        assert sorted(await download_checked(pack)) == sorted(images.values())

        capsys.readouterr()
        assert (
            await asyncio.to_thread(ctl, tmp_path, migrated_db_url, base, "stickers", "list") == 0
        )
        assert capsys.readouterr().out.split("\t") == [pid, "2 stickers", "Natter\n"]
        remove = ("stickers", "remove", pid)
        assert await asyncio.to_thread(ctl, tmp_path, migrated_db_url, base, *remove) == 0
        assert result_items(await bob.plugin["xep_0060"].get_items(JID(DOMAIN), NODE)) == []
        for url, _, _ in stickers_of(pack):
            assert (await fetch(url))[0] == 404
        assert await server.host.storage.uploads.list(DOMAIN) == []
        assert await asyncio.to_thread(ctl, tmp_path, migrated_db_url, base, *remove) == 1
