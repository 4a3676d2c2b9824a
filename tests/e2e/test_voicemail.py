"""Voicemail through a real server: a call nobody takes is answered by the server, the caller's
440 Hz tone is recorded as Ogg/Opus, stored as the callee's upload and announced in a message
whose URL downloads a file FFmpeg decodes back to the tone; every leg, socket and task is gone
afterwards.

The caller is the softphone (slixmpp + aiortc); the callee is a client that keeps every message
as XML (from test_jingle_signalling).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import DOMAIN, TIMEOUT, Client, add_user, clients, running_server
from tests.e2e.test_jingle_signalling import (
    NS_CARBONS,
    NS_FORWARD,
    NS_MISSED,
    CallClient,
    Xml,
    carbon,
    jmi,
)
from tests.e2e.test_mam import mam_query
from tests.e2e.test_upload import fetch, http_on
from tests.ports import on_free_port
from tests.voip.test_ogg import decode_ogg
from tests.voip.test_softphone import open_peer_connections
from voip.softphone import Call, Softphone, ToneTrack, dominant_frequency
from voip.voicemail import Voicemail, VoicemailSession
from xmpp_server.modules.jingle import Jingle
from xmpp_server.server import Server

C = "{jabber:client}"
NS_OOB = "jabber:x:oob"
NS_REFERENCE = "urn:xmpp:reference:0"
NS_SIMS = "urn:xmpp:sims:1"
NS_FILE = "urn:xmpp:jingle:apps:file-transfer:5"
NS_HASHES = "urn:xmpp:hashes:2"
NS_DELAY = "urn:xmpp:delay"
DEADLINE = 30.0
BOX = f"bob@{DOMAIN}/voicemail"


@contextlib.asynccontextmanager
async def voicemail_server(
    db_url: str, tmp_path: Path, **jingle: Any
) -> AsyncIterator[tuple[Server, Voicemail]]:
    def start(port: int) -> contextlib.AbstractAsyncContextManager[Server]:
        overrides = {"http": http_on(port), "modules": {"jingle": {"voicemail": True, **jingle}}}
        return running_server(db_url, tmp_path, overrides)

    async with on_free_port(start) as server:
        module = server.host.modules["jingle"]
        assert isinstance(module, Jingle) and module.voicemail is not None
        yield server, module.voicemail


@contextlib.asynccontextmanager
async def alice_and_bob(
    server: Server, caller: type[Client] = Client
) -> AsyncIterator[tuple[str, str, Any, CallClient]]:
    """Accounts and clients for Alice (the caller: a softphone's client, or ``CallClient``
    to send JMI herself) and Bob (the callee); neither logged in yet."""
    alice_jid = await add_user(server, "alice")
    bob_jid = await add_user(server, "bob")
    async with clients(caller(server, alice_jid), CallClient(server, bob_jid)) as (alice, bob):
        assert isinstance(bob, CallClient)
        yield alice_jid, bob_jid, alice, bob


def voicemail_message(el: Xml) -> bool:
    return el.find(f"{{{NS_OOB}}}x") is not None


async def until(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


async def record_tone(
    phone: Softphone, voicemail: Voicemail, callee: str, seconds: float
) -> tuple[Call, VoicemailSession]:
    """Call ``callee``, which voicemail answers, and wait until it recorded ``seconds``."""
    async with asyncio.timeout(DEADLINE):
        call = await phone.call(callee)
    assert call.peer == BOX
    session = voicemail.sessions[(phone.jid, call.sid)]
    await until(lambda: call.pc.connectionState == "connected")
    await until(lambda: session.seconds >= seconds or session.reason is not None)
    return call, session


async def check_recording(message: Xml, frequency: float) -> tuple[bytes, float]:
    """The announced file: downloaded over HTTP, as described, decoding to ``frequency``.
    Returns the file and its length in seconds (as FFmpeg decodes it)."""
    url = message.findtext(f"{{{NS_OOB}}}x/{{{NS_OOB}}}url")
    assert url is not None and url.endswith(".ogg")
    reference = message.find(f"{{{NS_REFERENCE}}}reference")
    assert reference is not None and reference.get("uri") == url
    sims = reference.find(f"{{{NS_SIMS}}}media-sharing")
    assert sims is not None
    assert sims.find(f"{{{NS_SIMS}}}sources/{{{NS_REFERENCE}}}reference").get("uri") == url
    file = sims.find(f"{{{NS_FILE}}}file")
    assert file is not None
    status, headers, data = await fetch(url)
    assert status == 200
    assert headers["Content-Type"] == "audio/ogg"
    assert file.findtext(f"{{{NS_FILE}}}media-type") == "audio/ogg"
    assert int(file.findtext(f"{{{NS_FILE}}}size") or 0) == len(data)
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert file.findtext(f"{{{NS_HASHES}}}hash") == digest
    samples, rate = decode_ogg(data)
    seconds = len(samples) / rate
    length_ms = int(file.findtext(f"{{{NS_FILE}}}length") or 0)
    assert length_ms / 1000 == pytest.approx(seconds, abs=0.05)
    # Skip the first half second (the caller's jitter buffer and encoder settling).
    assert dominant_frequency(samples[rate // 2 :], rate) == pytest.approx(frequency, abs=5)
    return data, seconds


async def released(voicemail: Voicemail, session: VoicemailSession) -> None:
    """Every session, task, peer connection and UDP socket of voicemail is gone."""
    await until(lambda: not voicemail.sessions and not voicemail.tasks)
    assert session.ended.is_set() and session.pc is not None
    assert session.pc.connectionState == "closed"
    assert session.sockets and all(sock.fileno() == -1 for sock in session.sockets)
    # aiortc's decoder thread, which the recording bypasses, was still told to stop.
    await until(lambda: not [t for t in threading.enumerate() if t.name.endswith("-decoder")])


async def test_offline_callee_finds_a_voicemail_with_the_tone(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with voicemail_server(migrated_db_url, tmp_path) as (server, voicemail):
        async with alice_and_bob(server) as (alice_jid, bob_jid, alice, bob):
            await alice.login()
            phone = Softphone(alice, source=lambda: ToneTrack(440.0), ice_servers=[])
            try:
                call, session = await record_tone(phone, voicemail, bob_jid, 3.0)
                await phone.hangup(call)
                await released(voicemail, session)
            finally:
                await phone.close()
            assert open_peer_connections() == []
            assert session.reason == "success"

            # Bob comes online: the propose, voicemail's accept, then the voicemail itself.
            await bob.login_for_calls()
            message = await bob.wait(voicemail_message)
            assert message.get("from") == DOMAIN and message.get("type") == "chat"
            assert message.find(f"{{{NS_DELAY}}}delay") is not None  # from the offline queue
            body = message.findtext(f"{C}body") or ""
            assert body.startswith(f"Voicemail from {alice_jid}, ")
            assert 2 <= int(body.rsplit(" ", 2)[1]) <= 4
            missed = message.find(f"{{{NS_MISSED}}}x")
            assert missed is not None
            assert (missed.get("from"), missed.get("sid"), missed.get("reason")) == (
                alice_jid,
                call.sid,
                "voicemail",
            )
            _, seconds = await check_recording(message, 440.0)
            assert 2.5 <= seconds <= 4.0
            kinds = [
                next(c.tag.partition("}")[2] for c in el if c.tag.startswith("{urn:xmpp:jingle"))
                for el in bob.stanzas.items
                if any(c.tag.startswith("{urn:xmpp:jingle-message") for c in el)
            ]
            assert kinds == ["propose", "accept"]
            accept = next(el for el in bob.stanzas.items if jmi("accept", call.sid)(el))
            assert accept.get("from") == BOX
            # One record of the call, not a missed call and a voicemail.
            assert bob.count(lambda el: el.find(f"{{{NS_MISSED}}}x") is not None) == 1

            uploads = await server.host.storage.uploads.list(bob_jid)
            assert [(u.content_type, u.completed_at is not None) for u in uploads] == [
                ("audio/ogg", True)
            ]
            answer = await mam_query(bob, fields={"with": DOMAIN})
            assert [r["mam_result"]["forwarded"]["stanza"]["body"] for r in answer.results] == [
                body
            ]


async def test_unanswered_call_rings_then_voicemail_takes_it(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with voicemail_server(migrated_db_url, tmp_path, voicemail_after=1) as (
        server,
        voicemail,
    ):
        alice_jid = await add_user(server, "alice")
        bob_jid = await add_user(server, "bob")
        bob_phone_client = CallClient(server, bob_jid)
        async with clients(
            Client(server, alice_jid), CallClient(server, bob_jid), bob_phone_client
        ) as (alice, bob, bob_phone_client):
            await alice.login()
            await bob.login_for_calls()
            await bob_phone_client.login_for_calls()
            bob_phone = Softphone(bob_phone_client, ice_servers=[])
            phone = Softphone(alice, source=lambda: ToneTrack(440.0), ice_servers=[])
            try:
                placing = asyncio.create_task(phone.call(bob_jid))
                async with asyncio.timeout(DEADLINE):
                    incoming = await bob_phone.incoming.get()
                # Nobody answers: after voicemail_after, voicemail takes the call and every
                # ringing device is told, as when another device of Bob's answers.
                async with asyncio.timeout(DEADLINE):
                    call = await placing
                assert call.peer == BOX
                await until(lambda: incoming.withdrawn == "accept")
                sid = call.sid
                accept = await bob.wait(jmi("accept", sid))
                assert accept.get("from") == BOX
                sent = await bob.wait(carbon("sent", "proceed", sid))
                assert sent.get("from") == bob_jid
                inner = sent.find(f"{{{NS_CARBONS}}}sent/{{{NS_FORWARD}}}forwarded/{C}message")
                assert inner is not None
                assert (inner.get("from"), inner.get("to")) == (BOX, alice.boundjid.full)

                session = voicemail.sessions[(phone.jid, sid)]
                await until(lambda: call.pc.connectionState == "connected")
                await until(lambda: session.seconds >= 2.0)
                await phone.hangup(call)
                await released(voicemail, session)
            finally:
                await phone.close()
                await bob_phone.close()
            assert open_peer_connections() == []

            message = await bob.wait(voicemail_message)
            assert message.find(f"{{{NS_DELAY}}}delay") is None  # delivered live
            await check_recording(message, 440.0)
            await bob_phone_client.wait(voicemail_message)  # every device gets it
            assert bob.count(lambda el: el.find(f"{{{NS_MISSED}}}x") is not None) == 1


async def test_recording_is_cut_at_voicemail_max_seconds(
    migrated_db_url: str, tmp_path: Path
) -> None:
    # The relay's port range binds voicemail's legs too.
    first = random.randint(20000, 60000)
    ports = f"{first}-{first + 200}"
    async with voicemail_server(
        migrated_db_url, tmp_path, voicemail_max_seconds=1.5, relay_port_range=ports
    ) as (server, voicemail):
        async with alice_and_bob(server) as (alice_jid, bob_jid, alice, bob):
            await alice.login()
            phone = Softphone(alice, source=lambda: ToneTrack(440.0), ice_servers=[])
            try:
                call, session = await record_tone(phone, voicemail, bob_jid, 0.5)
                assert session.sockets
                assert all(
                    first <= sock.getsockname()[1] <= first + 200 for sock in session.sockets
                )
                # The caller keeps talking; voicemail hangs up at the limit.
                async with asyncio.timeout(DEADLINE):
                    await call.ended.wait()
                assert call.reason == "success"
                await released(voicemail, session)
            finally:
                await phone.close()
            assert session.writer.full and session.seconds <= 1.5

            await bob.login_for_calls()
            message = await bob.wait(voicemail_message)
            assert re.fullmatch(f"Voicemail from {alice_jid}, [12] s", message.findtext(f"{C}body"))
            _, seconds = await check_recording(message, 440.0)
            assert 1.0 <= seconds <= 1.5 + 0.03


async def test_caller_giving_up_before_the_session_leaves_a_missed_call(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with voicemail_server(migrated_db_url, tmp_path) as (server, voicemail):
        async with alice_and_bob(server, CallClient) as (alice_jid, bob_jid, alice, bob):
            await alice.login_for_calls()
            sid = secrets.token_hex(8)
            alice.jmi(bob_jid, "propose", sid)
            proceed = await alice.wait(jmi("proceed", sid))
            assert proceed.get("from") == BOX
            assert voicemail.sessions.keys() == {(alice.boundjid.full, sid)}
            alice.jmi(bob_jid, "retract", sid)
            await until(lambda: not voicemail.sessions and not voicemail.tasks, TIMEOUT)

            await bob.login_for_calls()
            record = await bob.wait(lambda el: el.find(f"{{{NS_MISSED}}}x") is not None)
            assert (record.findtext(f"{C}body") or "").startswith(f"Missed call from {alice_jid}")
            assert record.find(f"{{{NS_MISSED}}}x").get("reason") == "voicemail"
            assert record.find(f"{{{NS_OOB}}}x") is None
            await bob.settle()
            assert bob.count(lambda el: el.find(f"{{{NS_MISSED}}}x") is not None) == 1
            assert await server.host.storage.uploads.list(bob_jid) == []


async def test_voicemail_in_relay_mode_is_not_anchored(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with voicemail_server(migrated_db_url, tmp_path, media="relay") as (server, voicemail):
        module = server.host.modules["jingle"]
        assert isinstance(module, Jingle) and module.anchor is not None
        async with alice_and_bob(server) as (alice_jid, bob_jid, alice, bob):
            await alice.login()
            phone = Softphone(alice, source=lambda: ToneTrack(440.0), ice_servers=[])
            try:
                call, session = await record_tone(phone, voicemail, bob_jid, 1.5)
                assert module.anchor.sessions == {} and module.anchor.relay.calls == {}
                await phone.hangup(call)
                await released(voicemail, session)
            finally:
                await phone.close()
            await bob.login_for_calls()
            await check_recording(await bob.wait(voicemail_message), 440.0)


async def test_voicemail_needs_http_uploads(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"modules": {"jingle": {"voicemail": True, "ring_timeout": 1}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        module = server.host.modules["jingle"]
        assert isinstance(module, Jingle) and module.voicemail is None
        async with alice_and_bob(server, CallClient) as (alice_jid, bob_jid, alice, bob):
            await alice.login_for_calls()
            await bob.login_for_calls()
            sid = secrets.token_hex(8)
            alice.jmi(bob_jid, "propose", sid)
            # An ordinary missed call after ring_timeout: nobody answers for Bob.
            record = await bob.wait(lambda el: el.find(f"{{{NS_MISSED}}}x") is not None)
            assert record.find(f"{{{NS_MISSED}}}x").get("reason") == "timeout"
            assert alice.count(jmi("proceed", sid)) == 0
