"""XEP-0357 push through ``natterd push``: a client enables push with the app server's JID,
natterd notifies the app server (an XEP-0114 component) when the account is offline or its
sessions sleep, and the app server posts to FCM (a local fake here)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa

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
from tests.test_push_auth import (
    EMAIL,
    FakeClock,
    pem,
    rsa_key,
    service_account_json,
    verify_jwt,
)
from xmpp_server.cli import main
from xmpp_server.component import ComponentAuthenticated, ComponentStream, handshake_digest
from xmpp_server.config import PushGatewayConfig
from xmpp_server.jid import JID
from xmpp_server.push_auth import FCM_SCOPE, JWT_BEARER_GRANT
from xmpp_server.pushgate import Credentials, Forwarder, Notification, PushFailed, PushGateway
from xmpp_server.server import Server

PUSH = f"push.{DOMAIN}"
SECRET = "component secret"
TOKEN = "device-token-1"


@contextlib.asynccontextmanager
async def fake_fcm(
    answers: list[tuple[int, dict[str, Any]]] | None = None,
) -> AsyncIterator[tuple[str, Mailbox]]:
    """A local stand-in for FCM HTTP v1 (and APNs): records every request, answers 200,
    or the next of ``answers`` (status, JSON body) while there are some."""
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
        if answers:
            status, body = answers.pop(0)
            return web.json_response(body, status=status)
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


def apns_key_file(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    """A fresh APNs auth key, written as the .p8 file Apple's developer portal hands out."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "AuthKey_ABC123DEFG.p8"
    path.write_text(pem(key))
    return key, path


async def test_apns_messages_are_alerts_and_calls_voip_pushes(tmp_path: Path) -> None:
    key, key_file = apns_key_file(tmp_path)
    clock = FakeClock(time.time())
    async with fake_fcm() as (url, received):
        config = PushGatewayConfig(
            apns_endpoint=url,
            apns_key_file=str(key_file),
            apns_key_id="ABC123DEFG",
            apns_team_id="TEAM4567",
            apns_topic="org.natter",
        )
        forwarder = Forwarder(config, Credentials.load(config, clock))
        try:
            message = {"message-count": "3", "last-message-sender": "alice@localhost"}
            await forwarder.send(Notification("tok1", "apns", message, {}))
            clock.now += 49 * 60  # still within the 50 minutes a provider token is reused
            call = {**message, "last-message-priority": "high", "call-id": "c1"}
            await forwarder.send(Notification("tok1", "apns", call, {}))
            clock.now += 60
            await forwarder.send(Notification("tok1", "apns", message, {}))
        finally:
            await forwarder.close()
        alert, voip, later = received.items
        assert alert["path"] == voip["path"] == "/3/device/tok1"
        assert alert["headers"]["apns-push-type"] == "alert"
        assert alert["headers"]["apns-topic"] == "org.natter"
        assert alert["json"]["aps"]["alert"] == {"title": "alice@localhost", "body": "New message"}
        assert alert["json"]["aps"]["badge"] == 3
        assert voip["headers"]["apns-push-type"] == "voip"
        assert voip["headers"]["apns-topic"] == "org.natter.voip"
        assert voip["json"]["type"] == "call" and voip["json"]["call_id"] == "c1"

        # The provider token: an ES256 JWT from the .p8 key, reused, then signed again.
        scheme, jwt = alert["auth"].split(" ")
        assert scheme == "bearer" and voip["auth"] == alert["auth"]
        header, claims = verify_jwt(jwt, key.public_key())
        assert header == {"alg": "ES256", "kid": "ABC123DEFG"}
        assert claims == {"iss": "TEAM4567", "iat": int(clock.now) - 50 * 60}
        assert later["auth"] != alert["auth"]
        _, claims = verify_jwt(later["auth"].removeprefix("bearer "), key.public_key())
        assert claims["iat"] == int(clock.now)


async def test_apns_expired_provider_token_is_signed_again_once(tmp_path: Path) -> None:
    key, key_file = apns_key_file(tmp_path)
    expired = (403, {"reason": "ExpiredProviderToken"})
    answers = [expired]
    async with fake_fcm(answers) as (url, received):
        config = PushGatewayConfig(
            apns_endpoint=url,
            apns_key_file=str(key_file),
            apns_key_id="K",
            apns_team_id="T",
            apns_topic="org.natter",
        )
        forwarder = Forwarder(config)
        try:
            note = Notification("tok1", "apns", {"message-count": "1"}, {})
            await forwarder.send(note)  # refused, signed again, accepted
            first, retried = received.items
            assert first["auth"] != retried["auth"]
            for post in (first, retried):
                verify_jwt(post["auth"].removeprefix("bearer "), key.public_key())
            await forwarder.send(note)
            assert received.items[2]["auth"] == retried["auth"]  # the new one is kept

            answers += [expired, expired]
            with pytest.raises(PushFailed, match="ExpiredProviderToken") as failed:
                await forwarder.send(note)  # refused twice in a row: no loop
            assert not failed.value.gone
            assert len(received.items) == 5
        finally:
            await forwarder.close()

    # A fixed token (apns_token) cannot be renewed: the refusal is final.
    async with fake_fcm([expired]) as (url, received):
        config = PushGatewayConfig(apns_endpoint=url, apns_token="jwt", apns_topic="org.natter")
        forwarder = Forwarder(config)
        try:
            with pytest.raises(PushFailed):
                await forwarder.send(note)
        finally:
            await forwarder.close()
        assert [post["auth"] for post in received.items] == ["bearer jwt"]


# ------------------------------------------------------------------ FCM with a service account

TOKEN_LIFETIME = 600  # seconds; Google's are an hour, a short one shows the refresh


class FakeGoogle:
    """Google's OAuth 2 token endpoint and FCM HTTP v1 on one local port. The token endpoint
    checks an assertion as Google does (signature with the service account's public key,
    issuer, scope, audience, lifetime) and hands out short-lived tokens; FCM accepts only a
    bearer token that was handed out and not revoked since."""

    def __init__(self, public_key: rsa.RSAPublicKey) -> None:
        self.public_key = public_key
        self.url = ""
        self.issued: list[str] = []  # access tokens, in order
        self.revoked: set[str] = set()
        self.refused_assertions = 0
        self.pushes = Mailbox()  # {"path", "token", "status", "json"}

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            assert request.content_type == "application/x-www-form-urlencoded"
            assert form["grant_type"] == JWT_BEARER_GRANT
            _, claims = verify_jwt(str(form["assertion"]), self.public_key)
            assert claims["iss"] == EMAIL and claims["scope"] == FCM_SCOPE
            assert claims["aud"] == f"{self.url}/token"
            assert claims["exp"] - claims["iat"] == 3600
        except (AssertionError, KeyError, ValueError, InvalidSignature):
            self.refused_assertions += 1
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.issued.append(f"ya29.fake-{len(self.issued) + 1}")
        return web.json_response(
            {"access_token": self.issued[-1], "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"}
        )

    async def send(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        valid = auth.startswith("Bearer ") and token in self.issued and token not in self.revoked
        status = 200 if valid else 401
        self.pushes.put_nowait(
            {"path": request.path, "token": token, "status": status, "json": await request.json()}
        )
        if not valid:
            return web.json_response({"error": {"status": "UNAUTHENTICATED"}}, status=401)
        return web.json_response({"name": "projects/natter-test/messages/1"})


@contextlib.asynccontextmanager
async def fake_google(public_key: rsa.RSAPublicKey) -> AsyncIterator[FakeGoogle]:
    google = FakeGoogle(public_key)
    app = web.Application()
    app.router.add_post("/token", google.token)
    app.router.add_post("/v1/projects/{project}/messages:send", google.send)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    google.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield google
    finally:
        await runner.cleanup()


def service_account_file(tmp_path: Path, key: rsa.RSAPrivateKey, google: FakeGoogle) -> Path:
    path = tmp_path / "service-account.json"
    path.write_text(service_account_json(key, f"{google.url}/token", "natter-test"))
    return path


async def test_fcm_token_comes_from_the_service_account_and_is_refreshed(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """natterd → component → FCM with an access token the gateway fetched itself: reused while
    fresh, fetched again once it expires and once when FCM refuses it."""
    key = rsa_key()
    clock = FakeClock(time.time())
    overrides = {
        "components": {"enabled": True, "port": 0, "services": [{"domain": PUSH, "secret": SECRET}]}
    }
    async with (
        fake_google(key.public_key()) as google,
        running_server(migrated_db_url, tmp_path, overrides) as server,
    ):
        assert server.components is not None
        config = PushGatewayConfig(
            domain=PUSH,
            server_port=server.components.port,
            secret=SECRET,
            fcm_endpoint=google.url,
            fcm_service_account=str(service_account_file(tmp_path, key, google)),
        )  # no fcm_project: the service account's project_id
        gateway = PushGateway(config, Forwarder(config, Credentials.load(config, clock)))
        await gateway.start()
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        try:
            async with clients(Client(server, a), Client(server, b)) as (alice, bob):
                await alice.login()
                await bob.login()
                await enable(bob)
                await bob.close()

                async def push(count: int) -> dict[str, Any]:
                    alice.send_message(mto=b, mbody=f"message {count}", mtype="chat")
                    post: dict[str, Any] = await next_matching(google.pushes, lambda _: True)
                    assert post["json"]["message"]["data"]["message_count"] == str(count)
                    return post

                # (a) The first push fetches a token and carries it; the next reuses it.
                post = await push(1)
                assert post["path"] == "/v1/projects/natter-test/messages:send"
                assert (post["token"], post["status"]) == ("ya29.fake-1", 200)
                post = await push(2)
                assert (post["token"], post["status"]) == ("ya29.fake-1", 200)

                # (b) Once it has (nearly) expired, the next push fetches a new one.
                clock.now += TOKEN_LIFETIME
                post = await push(3)
                assert (post["token"], post["status"]) == ("ya29.fake-2", 200)

                # (c) FCM refuses it: exactly one new token and one retry.
                google.revoked.add("ya29.fake-2")
                refused = await push(4)
                assert (refused["token"], refused["status"]) == ("ya29.fake-2", 401)
                retried = await next_matching(google.pushes, lambda _: True)
                assert (retried["token"], retried["status"]) == ("ya29.fake-3", 200)
                assert retried["json"] == refused["json"]
                await nothing_more(google.pushes, 5)
                assert google.issued == ["ya29.fake-1", "ya29.fake-2", "ya29.fake-3"]
                assert google.refused_assertions == 0
                assert gateway.sent == 4
        finally:
            await gateway.stop()


async def test_concurrent_fcm_pushes_share_one_token_fetch(tmp_path: Path) -> None:
    key = rsa_key()
    async with fake_google(key.public_key()) as google:
        config = PushGatewayConfig(
            fcm_endpoint=google.url,
            fcm_service_account=str(service_account_file(tmp_path, key, google)),
        )
        forwarder = Forwarder(config)
        notes = [Notification(f"tok{i}", "fcm", {"message-count": "1"}, {}) for i in range(6)]
        try:
            await asyncio.gather(*(forwarder.send(n) for n in notes))
            assert google.issued == ["ya29.fake-1"]
            google.revoked.add("ya29.fake-1")
            await asyncio.gather(*(forwarder.send(n) for n in notes))  # all refused at once
            assert google.issued == ["ya29.fake-1", "ya29.fake-2"]
        finally:
            await forwarder.close()
        tokens = [(p["token"], p["status"]) for p in google.pushes.items]
        assert tokens[:6] == [("ya29.fake-1", 200)] * 6
        assert sorted(tokens[6:]) == [("ya29.fake-1", 401)] * 6 + [("ya29.fake-2", 200)] * 6


async def test_fcm_token_endpoint_refusal_fails_the_push(tmp_path: Path) -> None:
    """A key Google does not know: the push fails (service-unavailable), FCM is not tried."""
    async with fake_google(rsa_key().public_key()) as google:
        config = PushGatewayConfig(
            fcm_endpoint=google.url,
            fcm_service_account=str(service_account_file(tmp_path, rsa_key(), google)),
        )
        forwarder = Forwarder(config)
        try:
            with pytest.raises(PushFailed, match="invalid_grant") as failed:
                await forwarder.send(Notification("tok1", "fcm", {}, {}))
        finally:
            await forwarder.close()
        assert not failed.value.gone
        assert google.refused_assertions == 1 and google.pushes.items == []


def test_natterd_push_is_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", "--help"]) == 0
    assert "push" in capsys.readouterr().out


def test_natterd_push_stops_on_a_bad_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The key files are read once at start; a wrong one is a configuration error (exit 2)."""
    (tmp_path / "google.json").write_text("{}")
    config = tmp_path / "natterd.toml"
    config.write_text('[pushgate]\nfcm_service_account = "google.json"\n')
    assert main(["push", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"pushgate.fcm_service_account: {tmp_path / 'google.json'}: no 'client_email'" in err
