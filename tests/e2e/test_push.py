"""XEP-0357 push through ``natterd push``: a client enables push with the app server's JID,
natterd notifies the app server (an XEP-0114 component) when the account is offline or its
sessions sleep, and the app server posts to FCM (a local fake here)."""

from __future__ import annotations

import asyncio
import contextlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.e2e.harness import (
    DOMAIN,
    Client,
    Mailbox,
    add_user,
    clients,
    next_matching,
    running_server,
)
from tests.e2e.test_stream_management import cut, detached
from xmpp_server.cli import main
from xmpp_server.component import ComponentAuthenticated, ComponentStream, handshake_digest
from xmpp_server.config import PushGatewayConfig
from xmpp_server.jid import JID
from xmpp_server.pushgate import Forwarder, Notification, PushGateway
from xmpp_server.server import Server

PUSH = f"push.{DOMAIN}"
SECRET = "component secret"
TOKEN = "device-token-1"


@contextlib.asynccontextmanager
async def fake_fcm() -> AsyncIterator[tuple[str, Mailbox]]:
    """A local stand-in for FCM HTTP v1: records every request, answers 200."""
    received = Mailbox()

    async def send(request: web.Request) -> web.Response:
        received.put_nowait(
            {
                "path": request.path,
                "auth": request.headers.get("Authorization"),
                "headers": dict(request.headers),
                "json": await request.json(),
            }
        )
        return web.json_response({"name": "projects/natter-test/messages/1"})

    app = web.Application()
    app.router.add_post("/v1/projects/{project}/messages:send", send)
    app.router.add_post("/3/device/{token}", send)  # APNs
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def push_setup(
    db_url: str, tmp_path: Path, extra: dict[str, dict[str, Any]] | None = None
) -> AsyncIterator[tuple[Server, Mailbox]]:
    overrides: dict[str, dict[str, Any]] = {
        "components": {
            "enabled": True,
            "port": 0,
            "services": [{"domain": PUSH, "secret": SECRET}],
        },
        **(extra or {}),
    }
    async with running_server(db_url, tmp_path, overrides) as server, fake_fcm() as (url, fcm):
        assert server.components is not None
        gateway = PushGateway(
            PushGatewayConfig(
                domain=PUSH,
                server_port=server.components.port,
                secret=SECRET,
                fcm_endpoint=url,
                fcm_project="natter-test",
                fcm_token="static-token",
            )
        )
        await gateway.start()
        try:
            yield server, fcm
        finally:
            await gateway.stop()


async def push_iq(client: Client, xml: str) -> Any:
    iq = client.make_iq_set()
    iq.append(ET.fromstring(xml))
    return await iq.send(timeout=10)


async def enable(client: Client, node: str = TOKEN) -> None:
    await push_iq(
        client,
        f"<enable xmlns='urn:xmpp:push:0' jid='{PUSH}' node='{node}'>"
        "<x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value>"
        "</field><field var='device_type'><value>fcm</value></field>"
        "<field var='secret'><value>app secret</value></field></x></enable>",
    )


async def nothing_more(box: Mailbox, seen: int, wait: float = 0.5) -> None:
    await asyncio.sleep(wait)
    assert len(box.items) == seen, box.items[seen:]


async def test_offline_message_is_pushed_without_its_body_until_disabled(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with push_setup(migrated_db_url, tmp_path) as (server, fcm):
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            await enable(bob)
            assert [r.node for r in await server.host.storage.push.list(b)] == [TOKEN]
            await bob.close()

            alice.send_message(mto=b, mbody="a secret text", mtype="chat")
            post = await next_matching(fcm, lambda _: True)
            assert post["path"] == "/v1/projects/natter-test/messages:send"
            assert post["auth"] == "Bearer static-token"
            message = post["json"]["message"]
            assert message["token"] == TOKEN
            assert message["data"] == {"type": "message", "message_count": "1", "sender": a}
            assert "a secret text" not in str(post["json"])

            alice.send_message(mto=b, mbody="another", mtype="chat")
            post = await next_matching(fcm, lambda _: True)
            assert post["json"]["message"]["data"]["message_count"] == "2"

            # Server-originated messages (announcements, missed calls) are pushed too.
            notice = ET.Element("{jabber:client}message", {"from": DOMAIN, "to": b})
            ET.SubElement(notice, "{jabber:client}body").text = "maintenance tonight"
            await server.host.router.deliver(notice)
            post = await next_matching(fcm, lambda _: True)
            assert post["json"]["message"]["data"]["sender"] == DOMAIN

            # Back online: the count starts again; disabling stops the pushes.
            bob2 = Client(server, b)
            async with clients(bob2):
                await bob2.login()
                await next_matching(bob2.messages, lambda m: m["body"] == "another")
                await push_iq(bob2, f"<disable xmlns='urn:xmpp:push:0' jid='{PUSH}'/>")
            assert await server.host.storage.push.list(b) == []
            seen = len(fcm.items)
            alice.send_message(mto=b, mbody="not pushed", mtype="chat")
            await nothing_more(fcm, seen)


async def test_inactive_session_gets_a_push_for_a_message(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with push_setup(migrated_db_url, tmp_path) as (server, fcm):
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        bob = Client(server, b)
        bob.register_plugin("xep_0352")
        async with clients(Client(server, a), bob) as (alice, _):
            await alice.login()
            await bob.login()
            await enable(bob)
            alice.send_message(mto=b, mbody="while awake", mtype="chat")
            await next_matching(bob.messages, lambda m: m["body"] == "while awake")
            await nothing_more(fcm, 0, wait=0.2)

            bob.plugin["xep_0352"].send_inactive()
            await bob.plugin["xep_0199"].ping(DOMAIN, timeout=10)
            alice.send_message(mto=b, mbody="while asleep", mtype="chat")
            await next_matching(bob.messages, lambda m: m["body"] == "while asleep")
            post = await next_matching(fcm, lambda _: True)
            assert post["json"]["message"]["data"]["sender"] == a


async def test_detached_session_gets_one_push_per_message(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """Written to a session waiting for resumption (XEP-0198): pushed once, not again when
    the session expires and the message moves to offline storage."""
    overrides = {"c2s": {"resume_timeout": 1.0}}
    async with push_setup(migrated_db_url, tmp_path, overrides) as (server, fcm):
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        bob = Client(server, b, stream_management=True)
        async with clients(Client(server, a), bob) as (alice, _):
            await alice.login()
            await bob.login()
            await enable(bob)
            full = JID.parse(str(bob.boundjid))
            cut(bob)
            await detached(server, full)
            alice.send_message(mto=str(full), mbody="are you there?", mtype="chat")
            post = await next_matching(fcm, lambda _: True)
            assert post["json"]["message"]["data"]["sender"] == a
            async with asyncio.timeout(10):
                while await server.host.storage.offline.count(b) == 0:
                    await asyncio.sleep(0.05)
            await nothing_more(fcm, 1)


async def test_call_to_offline_user_is_a_high_priority_push(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with push_setup(migrated_db_url, tmp_path) as (server, fcm):
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            await enable(bob)
            await bob.close()

            propose = alice.make_message(mto=b, mtype="chat")
            propose.append(
                ET.fromstring(
                    "<propose xmlns='urn:xmpp:jingle-message:0' id='call-1'>"
                    "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
                )
            )
            propose.send()
            post = await next_matching(fcm, lambda _: True)
            message = post["json"]["message"]
            assert message["android"] == {"priority": "high", "ttl": "30s"}
            assert message["data"] == {
                "type": "call",
                "message_count": "1",
                "sender": a,
                "call_id": "call-1",
                "call_media": "audio",
            }
            await nothing_more(fcm, 1)  # the propose, kept offline, is not pushed again


def test_component_handshake_needs_the_secret() -> None:
    stream = ComponentStream({PUSH: SECRET})
    header = (
        "<stream:stream xmlns='jabber:component:accept' "
        f"xmlns:stream='http://etherx.jabber.org/streams' to='{PUSH}'>"
    )
    assert stream.receive_data(header.encode()) == []
    assert f"id='{stream.stream_id}'" in stream.data_to_send().decode()
    events = stream.receive_data(b"<handshake>0000</handshake>")
    assert stream.closed and events[0].error is not None  # type: ignore[union-attr]
    assert b"not-authorized" in stream.data_to_send()

    stream = ComponentStream({PUSH: SECRET})
    stream.receive_data(header.encode())
    digest = handshake_digest(stream.stream_id, SECRET)
    events = stream.receive_data(f"<handshake>{digest}</handshake>".encode())
    assert events == [ComponentAuthenticated(PUSH)]
    assert stream.data_to_send().endswith(b"<handshake xmlns='jabber:component:accept'/>")


@pytest.mark.parametrize("to", ["elsewhere.localhost", "localhost"])
def test_component_for_an_unknown_domain_is_refused(to: str) -> None:
    stream = ComponentStream({PUSH: SECRET})
    stream.receive_data(
        "<stream:stream xmlns='jabber:component:accept' "
        f"xmlns:stream='http://etherx.jabber.org/streams' to='{to}'>".encode()
    )
    assert stream.closed and b"host-unknown" in stream.data_to_send()


async def test_apns_messages_are_alerts_and_calls_voip_pushes() -> None:
    async with fake_fcm() as (url, received):
        config = PushGatewayConfig(apns_endpoint=url, apns_token="jwt", apns_topic="org.natter")
        forwarder = Forwarder(config)
        try:
            message = {"message-count": "3", "last-message-sender": "alice@localhost"}
            await forwarder.send(Notification("tok1", "apns", message, {}))
            call = {**message, "last-message-priority": "high", "call-id": "c1"}
            await forwarder.send(Notification("tok1", "apns", call, {}))
        finally:
            await forwarder.close()
        alert, voip = received.items
        assert alert["path"] == voip["path"] == "/3/device/tok1"
        assert alert["auth"] == "bearer jwt"
        assert alert["headers"]["apns-push-type"] == "alert"
        assert alert["headers"]["apns-topic"] == "org.natter"
        assert alert["json"]["aps"]["alert"] == {"title": "alice@localhost", "body": "New message"}
        assert alert["json"]["aps"]["badge"] == 3
        assert voip["headers"]["apns-push-type"] == "voip"
        assert voip["headers"]["apns-topic"] == "org.natter.voip"
        assert voip["json"]["type"] == "call" and voip["json"]["call_id"] == "c1"


def test_natterd_push_is_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", "--help"]) == 0
    assert "push" in capsys.readouterr().out
