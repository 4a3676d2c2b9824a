"""XEP-0163 PEP through slixmpp: OMEMO device lists, avatars, nicknames, bookmarks, statuses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from tests.e2e.befriend import befriend
from tests.e2e.harness import (
    TIMEOUT,
    Client,
    Mailbox,
    add_user,
    clients,
    next_matching,
    running_server,
)
from xmpp_server.jid import JID
from xmpp_server.modules.pep import Pep, caps_hash
from xmpp_server.server import Server
from xmpp_server.xml import fromstring

PUBSUB = "http://jabber.org/protocol/pubsub"
EVENT = f"{PUBSUB}#event"
ERRORS = f"{PUBSUB}#errors"
PUBLISH_OPTIONS = f"{PUBSUB}#publish-options"
AXOLOTL = "eu.siacs.conversations.axolotl"
DEVICELIST = f"{AXOLOTL}.devicelist"
OMEMO2 = "urn:xmpp:omemo:2"
OMEMO2_DEVICES = f"{OMEMO2}:devices"
AVATAR_METADATA = "urn:xmpp:avatar:metadata"
NICK = "http://jabber.org/protocol/nick"
BOOKMARKS = "urn:xmpp:bookmarks:1"
STATUS = "urn:natter:status:0"


def pep_client(server: Server, jid: str, *interests: str, resource: str | None = None) -> Client:
    """A client with the PEP plugins, asking (XEP-0115 +notify) for ``interests``."""
    client = Client(server, f"{jid}/{resource}" if resource else jid)
    for plugin in ("xep_0060", "xep_0163", "xep_0084", "xep_0172"):
        client.register_plugin(plugin)
    client.interests = interests  # type: ignore[attr-defined]
    client.events = Mailbox()  # type: ignore[attr-defined]
    client.add_event_handler("pubsub_publish", client.events.put_nowait)  # type: ignore[attr-defined]
    client.add_event_handler("pubsub_retract", client.events.put_nowait)  # type: ignore[attr-defined]
    return client


async def login(*items: Client) -> None:
    """Log in; the +notify interests go into the caps of the initial presence."""
    for client in items:
        await client.login(presence=False)
        for node in client.interests:  # type: ignore[attr-defined]
            client.plugin["xep_0163"].add_interest(node)
        await client.plugin["xep_0115"].update_caps(broadcast=False)
        client.send_presence()
        await client.get_roster()


def events(client: Client) -> Mailbox:
    box: Mailbox = client.events  # type: ignore[attr-defined]
    return box


async def interested(server: Server, client: Client, node: str) -> None:
    """Wait until the server learnt (via entity caps) that ``client`` wants ``node``."""
    pep = server.host.modules["pep"]
    assert isinstance(pep, Pep)
    full = JID.parse(str(client.boundjid))
    async with asyncio.timeout(TIMEOUT):
        while node not in (pep.interest_of(full) or ()):
            await asyncio.sleep(0.02)


def options(client: Client, **fields: str) -> Any:
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden", value=PUBLISH_OPTIONS)
    for var, value in fields.items():
        form.add_field(var=f"pubsub#{var}", value=value)
    return form


def xml(text: str) -> ET.Element:
    return ET.fromstring(text)


def device_list(*ids: int) -> ET.Element:
    devices = "".join(f"<device id='{i}'/>" for i in ids)
    return xml(f"<list xmlns='{AXOLOTL}'>{devices}</list>")


def event_items(message: Any) -> tuple[str, list[tuple[str, str, ET.Element | None]]]:
    """(node, [(kind, id, payload)]) of a pubsub event message; kind is item or retract."""
    items = message.xml.find(f"{{{EVENT}}}event/{{{EVENT}}}items")
    assert items is not None
    out = []
    for child in items:
        kind = child.tag.rpartition("}")[2]
        payload = next(iter(child), None)
        out.append((kind, child.get("id", ""), payload))
    return items.get("node", ""), out


def result_items(iq: Any) -> list[tuple[str, ET.Element | None]]:
    items = iq.xml.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}items")
    assert items is not None
    return [(item.get("id", ""), next(iter(item), None)) for item in items]


def is_event(node: str, kind: str = "item") -> Any:
    def check(message: Any) -> bool:
        got, items = event_items(message)
        return got == node and any(k == kind for k, _, _ in items)

    return check


def pubsub_condition(error: IqError) -> str | None:
    err = error.iq.xml.find("{jabber:client}error")
    assert err is not None
    for child in err:
        if child.tag.startswith(f"{{{ERRORS}}}"):
            return child.tag.rpartition("}")[2]
    return None


async def test_omemo_device_lists_open_and_notified(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b, c = [await add_user(server, name) for name in ("alice", "bob", "carol")]
        alice = pep_client(server, a)
        bob = pep_client(server, b, DEVICELIST, OMEMO2_DEVICES)
        carol = pep_client(server, c)
        async with clients(alice, bob, carol):
            await login(alice, bob, carol)
            await befriend(alice, bob)
            await interested(server, bob, DEVICELIST)
            pubsub = alice.plugin["xep_0060"]
            await pubsub.publish(
                None, DEVICELIST, id="current", payload=device_list(1),
                options=options(alice, access_model="open"),
            )  # fmt: skip
            omemo2 = xml(f"<devices xmlns='{OMEMO2}'><device id='7' label='phone'/></devices>")
            await pubsub.publish(
                None, OMEMO2_DEVICES, id="current", payload=omemo2,
                options=options(alice, access_model="open", max_items="max"),
            )  # fmt: skip

            # Bob, a contact whose caps say +notify, gets both notifications.
            got = await next_matching(events(bob), is_event(DEVICELIST))
            assert got["from"] == a and got["type"] == "headline"
            _, [(kind, item_id, payload)] = event_items(got)
            assert (kind, item_id) == ("item", "current")
            assert payload is not None and payload.tag == f"{{{AXOLOTL}}}list"
            assert [d.get("id") for d in payload] == ["1"]
            got = await next_matching(events(bob), is_event(OMEMO2_DEVICES))
            _, [(_, _, payload)] = event_items(got)
            assert payload is not None and payload[0].get("label") == "phone"

            # Carol is no contact, but the access model is open.
            fetched = await carol.plugin["xep_0060"].get_items(a, DEVICELIST)
            [(item_id, payload)] = result_items(fetched)
            assert item_id == "current" and payload is not None
            assert [d.get("id") for d in payload] == ["1"]
            fetched = await carol.plugin["xep_0060"].get_items(a, OMEMO2_DEVICES, max_items=1)
            assert [i for i, _ in result_items(fetched)] == ["current"]

            # A new device list replaces the item; Bob is told again.
            await pubsub.publish(None, DEVICELIST, id="current", payload=device_list(1, 2))
            got = await next_matching(events(bob), is_event(DEVICELIST))
            _, [(_, _, payload)] = event_items(got)
            assert payload is not None and [d.get("id") for d in payload] == ["1", "2"]

            # A second device of Bob's coming online gets the last items at once (§6.2).
            bob2 = pep_client(server, b, DEVICELIST, resource="tablet")
            async with clients(bob2):
                await login(bob2)
                got = await next_matching(events(bob2), is_event(DEVICELIST))
                assert got["from"] == a
                _, [(_, item_id, payload)] = event_items(got)
                assert payload is not None and [d.get("id") for d in payload] == ["1", "2"]

            # slixmpp's capabilities hash verified, so the server cached what it means.
            pep = server.host.modules["pep"]
            assert isinstance(pep, Pep)
            _node, ver, algo = pep._interest[JID.parse(str(bob.boundjid))].key
            assert algo == "sha-1" and DEVICELIST in pep._caps[(algo, ver)]

            # Carol subscribed to nothing: never notified.
            assert not [m for m in events(carol).items if event_items(m)[0] == DEVICELIST]


async def test_avatar_and_nick_need_a_presence_subscription(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b, c = [await add_user(server, name) for name in ("alice", "bob", "carol")]
        alice, bob, carol = pep_client(server, a), pep_client(server, b), pep_client(server, c)
        async with clients(alice, bob, carol):
            await login(alice, bob, carol)
            await befriend(alice, bob)
            await alice.plugin["xep_0084"].publish_avatar_metadata(
                [
                    {
                        "id": "abc123",
                        "type": "image/png",
                        "bytes": "1024",
                        "height": "64",
                        "width": "64",
                    }
                ]
            )
            await alice.plugin["xep_0172"].publish_nick("Alice L.")

            fetched = await bob.plugin["xep_0060"].get_items(a, AVATAR_METADATA)
            [(_, payload)] = result_items(fetched)
            assert payload is not None
            assert payload.find(f"{{{AVATAR_METADATA}}}info").get("id") == "abc123"  # type: ignore[union-attr]
            nick = await bob.plugin["xep_0060"].get_items(a, NICK)
            [(_, payload)] = result_items(nick)
            assert payload is not None and payload.text == "Alice L."

            with pytest.raises(IqError) as refused:
                await carol.plugin["xep_0060"].get_items(a, AVATAR_METADATA)
            # A stranger is answered as for an account that does not exist (issue 13,
            # defect 9), not with XEP-0060's presence-subscription-required.
            assert refused.value.iq["error"]["condition"] == "service-unavailable"
            assert pubsub_condition(refused.value) is None
            with pytest.raises(IqError) as missing:
                await bob.plugin["xep_0060"].get_items(a, "urn:example:nothing")
            assert missing.value.iq["error"]["condition"] == "item-not-found"
            with pytest.raises(IqError) as foreign:
                await bob.plugin["xep_0060"].publish(
                    a, NICK, payload=xml(f"<nick xmlns='{NICK}'>x</nick>")
                )
            assert foreign.value.iq["error"]["condition"] == "forbidden"

            # The account is a PEP service, and lists the nodes a contact may read.
            info = await alice.plugin["xep_0030"].get_info(jid=a)
            identities = {(i[0], i[1]) for i in info["disco_info"]["identities"]}
            assert ("pubsub", "pep") in identities
            features = set(info["disco_info"]["features"])
            for feature in ("publish", "publish-options", "access-whitelist", "last-published"):
                assert f"{PUBSUB}#{feature}" in features
            items = await bob.plugin["xep_0030"].get_items(jid=a)
            nodes = {node for _, node, _ in items["disco_items"]["items"]}
            assert nodes == {AVATAR_METADATA, NICK}


async def test_publish_options_preconditions_and_retention(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        alice = pep_client(server, a)
        async with clients(alice):
            await login(alice)
            pubsub = alice.plugin["xep_0060"]
            node = "urn:example:feed"
            for n in range(4):
                await pubsub.publish(
                    None, node, id=f"i{n}", payload=xml(f"<entry xmlns='urn:example'>{n}</entry>"),
                    options=options(alice, max_items="2", persist_items="true"),
                )  # fmt: skip
            fetched = await pubsub.get_items(a, node)
            assert [i for i, _ in result_items(fetched)] == ["i2", "i3"]
            fetched = await pubsub.get_items(a, node, max_items=1)
            assert [i for i, _ in result_items(fetched)] == ["i3"]
            fetched = await pubsub.get_items(a, node, item_ids=["i2"])
            [(item_id, payload)] = result_items(fetched)
            assert item_id == "i2" and payload is not None and payload.text == "2"

            with pytest.raises(IqError) as mismatch:
                await pubsub.publish(
                    None, node, payload=xml("<entry xmlns='urn:example'>x</entry>"),
                    options=options(alice, access_model="open"),
                )  # fmt: skip
            assert mismatch.value.iq["error"]["condition"] == "conflict"
            assert pubsub_condition(mismatch.value) == "precondition-not-met"
            fetched = await pubsub.get_items(a, node)
            assert [i for i, _ in result_items(fetched)] == ["i2", "i3"]

            # The owner reconfigures the node: fewer items kept, another access model.
            config = await pubsub.get_node_config(None, node)
            form = config["pubsub_owner"]["configure"]["form"]
            assert form.get_values()["pubsub#max_items"] == "2"
            assert form.get_values()["pubsub#access_model"] == "presence"
            form.set_type("submit")
            form.set_values(
                {**form.get_values(), "pubsub#max_items": "1", "pubsub#access_model": "open"}
            )
            await pubsub.set_node_config(None, node, form)
            fetched = await pubsub.get_items(a, node)
            assert [i for i, _ in result_items(fetched)] == ["i3"]
            await pubsub.publish(
                None, node, id="i4", payload=xml("<entry xmlns='urn:example'>4</entry>"),
                options=options(alice, access_model="open"),
            )  # fmt: skip

            # "max" means the server's limit.
            await pubsub.publish(
                None, "urn:example:many", payload=xml("<entry xmlns='urn:example'/>"),
                options=options(alice, max_items="max"),
            )  # fmt: skip
            config = await pubsub.get_node_config(None, "urn:example:many")
            values = config["pubsub_owner"]["configure"]["form"].get_values()
            assert values["pubsub#max_items"] == "256"

            # Deleting a node deletes its items.
            await pubsub.delete_node(None, node)
            with pytest.raises(IqError) as gone:
                await pubsub.get_items(a, node)
            assert gone.value.iq["error"]["condition"] == "item-not-found"


async def test_retract_notifies(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        alice, bob = pep_client(server, a), pep_client(server, b, NICK)
        async with clients(alice, bob):
            await login(alice, bob)
            await befriend(alice, bob)
            await interested(server, bob, NICK)
            await alice.plugin["xep_0172"].publish_nick("Alice")
            await next_matching(events(bob), is_event(NICK))
            await alice.plugin["xep_0060"].retract(None, NICK, "current", notify=True)
            got = await next_matching(events(bob), is_event(NICK, "retract"))
            assert event_items(got)[1] == [("retract", "current", None)]
            with pytest.raises(IqError) as missing:
                await alice.plugin["xep_0060"].retract(None, NICK, "current")
            assert missing.value.iq["error"]["condition"] == "item-not-found"


async def test_bookmarks_are_private(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        alice = pep_client(server, a, BOOKMARKS, resource="phone")
        bob = pep_client(server, b, BOOKMARKS, NICK)
        async with clients(alice, bob):
            await login(alice, bob)
            await befriend(alice, bob)
            await interested(server, bob, NICK)
            await interested(server, alice, BOOKMARKS)
            conference = xml(
                f"<conference xmlns='{BOOKMARKS}' name='Team' autojoin='true'><nick>al</nick>"
                "</conference>"
            )
            await alice.plugin["xep_0060"].publish(
                None, BOOKMARKS, id="team@conference.localhost", payload=conference,
                options=options(
                    alice, persist_items="true", max_items="max",
                    send_last_published_item="never", access_model="whitelist",
                ),
            )  # fmt: skip
            # The owner's own resource that asked for bookmarks is told.
            got = await next_matching(events(alice), is_event(BOOKMARKS))
            assert event_items(got)[1][0][1] == "team@conference.localhost"
            mine = await alice.plugin["xep_0060"].get_items(a, BOOKMARKS)
            [(item_id, payload)] = result_items(mine)
            assert item_id == "team@conference.localhost"
            assert payload is not None and payload.get("name") == "Team"

            with pytest.raises(IqError) as refused:
                await bob.plugin["xep_0060"].get_items(a, BOOKMARKS)
            assert refused.value.iq["error"]["condition"] == "not-allowed"
            assert pubsub_condition(refused.value) == "closed-node"
            items = await bob.plugin["xep_0030"].get_items(jid=a)
            assert BOOKMARKS not in {node for _, node, _ in items["disco_items"]["items"]}

            # Bob wants bookmarks too, but is only told about Alice's nick, published after.
            await alice.plugin["xep_0172"].publish_nick("Alice")
            await next_matching(events(bob), is_event(NICK))
            assert not [m for m in events(bob).items if event_items(m)[0] == BOOKMARKS]

            # Whitelisting Bob lets him read them.
            await alice.plugin["xep_0060"].modify_affiliations(
                None, BOOKMARKS, affiliations=[(b, "member")]
            )
            theirs = await bob.plugin["xep_0060"].get_items(a, BOOKMARKS)
            assert [i for i, _ in result_items(theirs)] == ["team@conference.localhost"]


async def test_status_updates_expire(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"modules": {"pep": {"status_ttl": 1.0}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        alice, bob = pep_client(server, a), pep_client(server, b, STATUS)
        async with clients(alice, bob):
            await login(alice, bob)
            await befriend(alice, bob)
            await interested(server, bob, STATUS)
            status = xml("<status xmlns='urn:natter:status:0' type='text'>At the beach</status>")
            await alice.plugin["xep_0060"].publish(None, STATUS, id="s1", payload=status)
            got = await next_matching(events(bob), is_event(STATUS))
            assert event_items(got)[1][0][1] == "s1"
            # Polled, not timed: the item is gone once its TTL passed, and purged from storage.
            async with asyncio.timeout(TIMEOUT):
                while True:
                    fetched = await bob.plugin["xep_0060"].get_items(a, STATUS)
                    if not result_items(fetched):
                        break
                    await asyncio.sleep(0.2)
                while await server.host.storage.pep.count(a, STATUS):
                    await asyncio.sleep(0.2)


def test_caps_hash_of_the_xep_0115_complex_example() -> None:
    """XEP-0115 §5.3: identities with xml:lang, and an extended form with a multi-value field."""
    query = fromstring(
        "<query xmlns='http://jabber.org/protocol/disco#info'>"
        "<identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>"
        "<identity xml:lang='el' category='client' name='Ψ 0.11' type='pc'/>"
        "<feature var='http://jabber.org/protocol/caps'/>"
        "<feature var='http://jabber.org/protocol/disco#info'/>"
        "<feature var='http://jabber.org/protocol/disco#items'/>"
        "<feature var='http://jabber.org/protocol/muc'/>"
        "<x xmlns='jabber:x:data' type='result'>"
        "<field var='FORM_TYPE' type='hidden'>"
        "<value>urn:xmpp:dataforms:softwareinfo</value></field>"
        "<field var='ip_version'><value>ipv4</value><value>ipv6</value></field>"
        "<field var='os'><value>Mac</value></field>"
        "<field var='os_version'><value>10.5.1</value></field>"
        "<field var='software'><value>Psi</value></field>"
        "<field var='software_version'><value>0.11</value></field>"
        "</x></query>"
    )
    assert caps_hash(query, "sha-1") == "q07IKJEyjvHSyhy//CH0CxmKi8w="
    assert caps_hash(query, "md5") is None
