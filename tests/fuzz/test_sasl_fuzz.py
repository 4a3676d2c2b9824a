"""SASL (RFC 4422, RFC 5802 SCRAM, RFC 4616 PLAIN), server side: whatever a client sends in
whatever order, each mechanism ends cleanly (a challenge, success or ``SaslFailure``) and
never raises anything else. Messages are arbitrary bytes or legal SCRAM/PLAIN messages with
their fields replaced, so the fuzzer reaches the proof check and not only the first parse."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from xmpp_server import sasl
from xmpp_server.sasl import ChannelBindings, make_credentials

CREDS = {c.mechanism: c for c in make_credentials("pencil", 4096)}
BINDINGS = ChannelBindings({"tls-server-end-point": b"\x01" * 32})
NAMES = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-1", "PLAIN"]

FIELD = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["user", "=2C", "=3D", "=", ",", "\0", "n", "y", "p=tls-server-end-point"]),
    st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode()),
)


@st.composite
def scram_first(draw: st.DrawFn) -> bytes:
    gs2 = draw(st.sampled_from(["n,,", "y,,", "p=tls-server-end-point,,", "n,a=user,", ""]))
    gs2 = draw(st.one_of(st.just(gs2), FIELD))
    user = draw(st.one_of(st.just("user"), FIELD))
    nonce = draw(st.one_of(st.just("rOprNGfwEbeRWgbNEkqO"), FIELD))
    extra = draw(st.sampled_from(["", ",m=x", ",x=y", ","]))
    return f"{gs2}n={user},r={nonce}{extra}".encode()


@st.composite
def scram_final(draw: st.DrawFn, server_nonce: str) -> bytes:
    cbind = draw(st.one_of(st.just(base64.b64encode(b"n,,").decode()), FIELD))
    nonce = draw(st.one_of(st.just(server_nonce), FIELD))
    proof = draw(st.one_of(st.binary(min_size=20, max_size=32), st.binary(max_size=40)))
    extra = draw(st.sampled_from(["", ",x=y", ","]))
    return f"c={cbind},r={nonce}{extra},p={base64.b64encode(proof).decode()}".encode()


def plain_message() -> st.SearchStrategy[bytes]:
    part = st.one_of(st.just("user"), st.just("pencil"), st.text(max_size=10))
    return st.tuples(part, part, part).map(lambda p: "\0".join(p).encode())


MESSAGE = st.one_of(st.binary(max_size=80), plain_message(), scram_first())


@given(
    name=st.sampled_from(NAMES + ["DIGEST-MD5", ""]),
    tls=st.booleans(),
    initial=st.one_of(st.none(), MESSAGE),
    known=st.booleans(),
    data=st.data(),
)
def test_mechanisms_only_fail_cleanly(
    name: str, tls: bool, initial: bytes | None, known: bool, data: st.DataObject
) -> None:
    try:
        mech = sasl.create_mechanism(
            name, tls=tls, bindings=BINDINGS if tls else ChannelBindings({}), offered=NAMES
        )
        step = mech.start(initial)
        for _ in range(4):
            if isinstance(step, sasl.Success):
                break
            if isinstance(step, sasl.NeedCredentials):
                step = mech.provide_credentials(
                    CREDS[mech.credentials_mechanism] if known else None
                )
                continue
            if step.data.startswith(b"r="):  # a SCRAM server-first: answer it, or not
                server_nonce = step.data.split(b",")[0][2:].decode()
                message = data.draw(st.one_of(scram_final(server_nonce), MESSAGE))
            else:
                message = data.draw(MESSAGE)
            step = mech.respond(message)
    except sasl.SaslFailure as failure:
        assert failure.condition in sasl.CONDITIONS
