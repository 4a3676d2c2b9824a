"""The mobile-features issue's "done means", end to end with real clients: media sharing through
XEP-0363 with server thumbnails, and OMEMO (slixmpp-omemo) stored only as ciphertext."""

from __future__ import annotations

import hashlib
import io
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image
from slixmpp import JID
from sqlalchemy import inspect, text

from tests.e2e.befriend import befriend
from tests.e2e.harness import DOMAIN, TIMEOUT, Client, add_user, clients, next_matching
from tests.e2e.test_upload import (
    NS_FILE,
    NS_STANZAS,
    NS_THUMBS,
    NS_UPLOAD,
    error_of,
    fetch,
    preview,
    upload,
    upload_server,
    video,
)
from xmpp_server.server import Server

NS_OOB = "jabber:x:oob"
NS_REFERENCE = "urn:xmpp:reference:0"
NS_SIMS = "urn:xmpp:sims:1"
MB = 1024 * 1024
TWOMEMO_DEVICES = "urn:xmpp:omemo:2:devices"
OLDMEMO_DEVICES = "eu.siacs.conversations.axolotl.devicelist"


def noisy_png(side: int) -> bytes:
    """Random pixels barely compress: ``side`` 1340 gives a PNG of just over 5 MiB."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def sims(url: str, file: ET.Element) -> ET.Element:
    """A XEP-0385 media-sharing reference: the XEP-0234 file (with its XEP-0264 thumbnail)
    and the XEP-0363 GET URL as its source."""
    reference = ET.Element(f"{{{NS_REFERENCE}}}reference", {"type": "data", "uri": url})
    sharing = ET.SubElement(reference, f"{{{NS_SIMS}}}media-sharing")
    sharing.append(file)
    sources = ET.SubElement(sharing, f"{{{NS_SIMS}}}sources")
    ET.SubElement(sources, f"{{{NS_REFERENCE}}}reference", {"type": "data", "uri": url})
    return reference


async def share(sender: Client, recipient: str, url: str) -> None:
    """What a client does after the PUT: ask for the file's metadata, send the link."""
    answer = await preview(sender, url)
    file = answer.find(f"{{{NS_FILE}}}file")
    assert file is not None
    message = sender.make_message(mto=recipient, mtype="chat", mbody=url)
    oob = ET.Element(f"{{{NS_OOB}}}x")
    ET.SubElement(oob, f"{{{NS_OOB}}}url").text = url
    message.xml.append(oob)
    message.xml.append(sims(url, file))
    message.send()


async def receive_media(client: Client, url: str) -> tuple[ET.Element, ET.Element]:
    """The shared file's description and its thumbnail, as the recipient finds them."""
    message = await next_matching(client.messages, lambda m: m["body"] == url)
    assert message.xml.findtext(f"{{{NS_OOB}}}x/{{{NS_OOB}}}url") == url
    reference = message.xml.find(f"{{{NS_REFERENCE}}}reference")
    assert reference is not None and reference.get("uri") == url
    file = reference.find(f"{{{NS_SIMS}}}media-sharing/{{{NS_FILE}}}file")
    assert file is not None
    thumbnail = file.find(f"{{{NS_THUMBS}}}thumbnail")
    assert thumbnail is not None
    return file, thumbnail


async def check_thumbnail(thumbnail: ET.Element) -> None:
    status, headers, body = await fetch(thumbnail.get("uri", ""))
    assert status == 200
    assert headers["Content-Type"] == thumbnail.get("media-type")
    with Image.open(io.BytesIO(body)) as image:
        image.load()
        assert image.size == (int(thumbnail.get("width", 0)), int(thumbnail.get("height", 0)))
        assert max(image.size) <= 256


async def upload_client(server: Server, name: str) -> Client:
    client = Client(server, await add_user(server, name))
    client.register_plugin("xep_0363")
    await client.login()
    return client


async def test_share_media_with_thumbnails(migrated_db_url: str, tmp_path: Path) -> None:
    image = noisy_png(1340)
    assert len(image) >= 5 * MB
    clip = video(tmp_path)
    options = {"max_file_size": 6 * MB, "quota_per_user": 8 * MB}
    async with upload_server(migrated_db_url, tmp_path, **options) as (server, base):
        alice, bob = await upload_client(server, "alice"), await upload_client(server, "bob")
        async with clients(alice, bob):
            # The image: slixmpp's XEP-0363 client (discovery, slot, PUT).
            url = await alice.plugin["xep_0363"].upload_file(
                "holiday.png",
                input_file=io.BytesIO(image),
                content_type="image/png",
                domain=JID(DOMAIN),
                timeout=60,
            )
            assert url.startswith(base + "/upload/")
            await share(alice, bob.boundjid.bare, url)
            file, thumbnail = await receive_media(bob, url)
            assert file.findtext(f"{{{NS_FILE}}}media-type") == "image/png"
            assert file.findtext(f"{{{NS_FILE}}}size") == str(len(image))
            assert (
                file.findtext(f"{{{NS_FILE}}}width"),
                file.findtext(f"{{{NS_FILE}}}height"),
            ) == (
                "1340",
                "1340",
            )
            assert thumbnail.get("uri") == url + "?thumb=1"
            await check_thumbnail(thumbnail)
            status, _, body = await fetch(url)
            assert status == 200
            assert hashlib.sha256(body).hexdigest() == hashlib.sha256(image).hexdigest()

            # A short video gets a thumbnail too (its first frame).
            clip_url = await upload(alice, "clip.mp4", clip, "video/mp4")
            await share(alice, bob.boundjid.bare, clip_url)
            file, thumbnail = await receive_media(bob, clip_url)
            assert file.findtext(f"{{{NS_FILE}}}media-type") == "video/mp4"
            assert thumbnail.get("media-type") == "image/jpeg"
            await check_thumbnail(thumbnail)
            status, _, body = await fetch(clip_url)
            assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(clip).digest()

            # Over the limits: too large for one file, then beyond the quota.
            error = await error_of(alice, "huge.png", 6 * MB + 1, "image/png")
            assert error.find(f"{{{NS_STANZAS}}}not-acceptable") is not None
            limit = error.findtext(f"{{{NS_UPLOAD}}}file-too-large/{{{NS_UPLOAD}}}max-file-size")
            assert limit == str(6 * MB)
            error = await error_of(alice, "more.png", 3 * MB, "image/png")
            assert error.get("type") == "wait"
            assert error.find(f"{{{NS_STANZAS}}}resource-constraint") is not None
            assert str(8 * MB) in (error.findtext(f"{{{NS_STANZAS}}}text") or "")


# -------------------------------------------------------------------------------- OMEMO


def omemo_plugin() -> None:
    """Register an in-memory slixmpp-omemo plugin as ``xep_0384`` (once)."""
    from slixmpp.plugins.base import PLUGIN_REGISTRY, register_plugin

    if getattr(PLUGIN_REGISTRY.get("xep_0384"), "natter_test", False):
        return
    register_plugin(_omemo_class())


def _omemo_class() -> type:
    from omemo.storage import Just, Maybe, Nothing, Storage
    from omemo.types import DeviceInformation, JSONType
    from slixmpp_omemo import XEP_0384, TrustLevel

    class MemoryStorage(Storage):
        def __init__(self) -> None:
            super().__init__()
            self.data: dict[str, JSONType] = {}

        async def _load(self, key: str) -> Maybe[JSONType]:
            return Just(self.data[key]) if key in self.data else Nothing()

        async def _store(self, key: str, value: JSONType) -> None:
            self.data[key] = value

        async def _delete(self, key: str) -> None:
            self.data.pop(key, None)

    class MemoryOmemo(XEP_0384):
        """Blind trust before verification; state lives as long as the client object."""

        natter_test = True
        name = "xep_0384"

        def plugin_init(self) -> None:
            self.memory = MemoryStorage()
            super().plugin_init()

        @property
        def storage(self) -> Storage:
            return self.memory

        @property
        def _btbv_enabled(self) -> bool:
            return True

        async def _prompt_manual_trust(
            self, manually_trusted: frozenset[DeviceInformation], identifier: str | None
        ) -> None:
            session_manager = await self.get_session_manager()
            for device in manually_trusted:
                await session_manager.set_trust(
                    device.bare_jid, device.identity_key, TrustLevel.TRUSTED.value
                )

    return MemoryOmemo


async def omemo_client(server: Server, name: str) -> Client:
    client = Client(server, await add_user(server, name))
    for plugin in ("xep_0060", "xep_0163", "xep_0280", "xep_0334"):
        client.register_plugin(plugin)
    client.register_plugin("xep_0384")
    initialized = client.wait_until("omemo_initialized", TIMEOUT * 2)
    await client.login(presence=False)
    # The device-list +notify interests go into the caps of the initial presence (XEP-0163).
    # The plugin declared them before resource binding, under the JID without the resource
    # that slixmpp's disco does not answer for; declare them again now that it is bound.
    for node in (TWOMEMO_DEVICES, OLDMEMO_DEVICES):
        client.plugin["xep_0163"].add_interest(node)
    await client.plugin["xep_0115"].update_caps(broadcast=False)
    client.send_presence()
    await client.get_roster()
    await initialized
    return client


async def knows_devices(client: Client, contact: Client) -> None:
    """Fetch the contact's device lists (PEP items of an open node), as clients do before the
    first message of a chat. natterd sends a contact's last items on its own only when a
    session's +notify caps are learnt, not when a subscription comes into effect later on."""
    omemo = client.plugin["xep_0384"]
    await omemo.refresh_device_lists({JID(contact.boundjid.bare)}, force_download=True)
    manager = await omemo.get_session_manager()
    assert await manager.get_device_information(contact.boundjid.bare)


async def every_stored_text(server: Server) -> list[str]:
    """Every text and blob value of every table, as strings."""
    values: list[str] = []
    async with server.host.storage.sessions() as session:
        names = await session.run_sync(lambda sync: inspect(sync.connection()).get_table_names())
        for name in names:
            rows = await session.execute(text(f'SELECT * FROM "{name}"'))
            for row in rows:
                for value in row:
                    if isinstance(value, str):
                        values.append(value)
                    elif isinstance(value, bytes | memoryview):
                        values.append(bytes(value).decode("utf-8", "replace"))
    return values


async def test_omemo_message_is_stored_as_ciphertext_only(
    migrated_db_url: str, tmp_path: Path
) -> None:
    pytest.importorskip("slixmpp_omemo")
    omemo_plugin()
    secret = "the eagle lands at dawn 7f3a9c"
    later = "bring the blue folder 51d0e2"
    control = "not a secret at all 0c4e88"
    async with upload_server(migrated_db_url, tmp_path) as (server, _):
        alice, bob = await omemo_client(server, "alice"), await omemo_client(server, "bob")
        async with clients(alice, bob):
            await befriend(alice, bob)
            # Now contacts: each learns the other's devices.
            await knows_devices(alice, bob)
            await knows_devices(bob, alice)
            message = alice.make_message(mto=bob.boundjid.bare, mtype="chat", mbody=secret)
            encrypted, errors = await alice.plugin["xep_0384"].encrypt_message(
                message, JID(bob.boundjid.bare)
            )
            assert encrypted is not None and not errors
            encrypted.send()
            received = await next_matching(
                bob.messages, lambda m: bool(bob.plugin["xep_0384"].is_encrypted(m))
            )
            assert secret not in str(received)
            decrypted, sender = await bob.plugin["xep_0384"].decrypt_message(received)
            assert decrypted["body"] == secret
            assert sender.bare_jid == alice.boundjid.bare

            # A control: an unencrypted message, which the scan below must find.
            alice.send_message(mto=JID(bob.boundjid.bare), mbody=control, mtype="chat")
            await next_matching(bob.messages, lambda m: m["body"] == control)

            # One more while Bob is offline: it waits in offline storage, encrypted too.
            await bob.close()
            message = alice.make_message(mto=bob.boundjid.bare, mtype="chat", mbody=later)
            encrypted, errors = await alice.plugin["xep_0384"].encrypt_message(
                message, JID(bob.boundjid.bare)
            )
            assert encrypted is not None and not errors
            encrypted.send()
            await alice.plugin["xep_0199"].ping(JID(DOMAIN), timeout=10)  # processed

        stored = await every_stored_text(server)
        assert [value for value in stored if control in value]
        for plaintext in (secret, later):
            assert not [value for value in stored if plaintext in value]
        async with server.host.storage.sessions() as session:
            archived = (await session.execute(text("SELECT xml FROM archive"))).scalars().all()
            offline = (
                (await session.execute(text("SELECT xml FROM offline_messages"))).scalars().all()
            )
        # Both encrypted messages in both archives (sent and received), the later one offline;
        # Bob's answer to the key exchange (an empty OMEMO message) is archived too.
        assert len([row for row in archived if "<encrypted" in row]) >= 4
        assert all("<encrypted" in row or control in row for row in archived)
        assert offline and all("<encrypted" in row for row in offline)
