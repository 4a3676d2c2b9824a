"""JID parsing and normalisation (RFC 7622)."""

from __future__ import annotations

import re

import pytest

from xmpp_server.jid import JID


def test_parts_and_normalisation() -> None:
    jid = JID.parse("Juliet@Example.COM./Balcony")
    assert (jid.local, jid.domain, jid.resource) == ("juliet", "example.com", "Balcony")
    assert str(jid) == "juliet@example.com/Balcony"
    assert jid.bare == JID.parse("juliet@example.com")
    assert JID.parse("example.com").is_domain
    assert JID.parse("example.com/res").resource == "res"
    # Resources may contain '@' and '/'.
    assert JID.parse("a@b/c@d/e").resource == "c@d/e"


def test_equal_jids_hash_equal() -> None:
    assert {JID.parse("A@B"), JID.parse("a@b")} == {JID.parse("a@b")}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "JID is empty"),
        ("@example.com", "JID localpart is empty"),
        ("juliet@", "JID domainpart is empty"),
        ("juliet@example.com/", "JID resourcepart is empty"),
        ("jul'iet@example.com", "JID localpart contains one of"),
        ("juliet@exa mple.com", "JID domainpart contains a forbidden character"),
        ("juliet@example..com", "JID domainpart has an empty label"),
        ("juliet@example.com/\x07", "JID resourcepart contains a forbidden character U+0007"),
        ("x" * 1024 + "@example.com", "JID localpart is longer than 1023 bytes"),
    ],
)
def test_invalid_jids_say_which_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        JID.parse(text)
