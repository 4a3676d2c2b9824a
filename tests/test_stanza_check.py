"""RFC 6120 §8.2.3 iq shape, checked once for every stanza a client sends (issue 13, defect 8)."""

from __future__ import annotations

import pytest

from xmpp_server.stanza import check_client_stanza
from xmpp_server.xml import Element, ElementReceived, XmlStreamParser


def stanza(xml: str) -> Element:
    header = (
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
    event = XmlStreamParser().feed((header + xml).encode())[-1]
    assert isinstance(event, ElementReceived)
    return event.element


GOOD = [
    "<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
    "<iq type='set' id='1'><query xmlns='jabber:iq:roster'/></iq>",
    "<iq type='result' id='1'/>",
    "<iq type='result' id='1'><query xmlns='jabber:iq:roster'/></iq>",
    "<iq type='error' id='1'><error type='cancel'/></iq>",
    "<iq type='error' id='1'><ping xmlns='urn:xmpp:ping'/><error type='cancel'/></iq>",
    "<message/>",
    "<presence/>",
]
BAD = [
    "<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
    "<iq type='get' id=''><ping xmlns='urn:xmpp:ping'/></iq>",
    "<iq id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
    "<iq type='fetch' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
    "<iq type='get' id='1'/>",
    "<iq type='set' id='1'>text only</iq>",
    "<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/></iq>",
    "<iq type='result' id='1'><a xmlns='urn:a'/><b xmlns='urn:b'/></iq>",
    "<iq type='error' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
    "<iq type='result'/>",
]


@pytest.mark.parametrize("xml", GOOD)
def test_well_formed_stanzas_pass(xml: str) -> None:
    assert check_client_stanza(stanza(xml)) is None


@pytest.mark.parametrize("xml", BAD)
def test_malformed_iq_is_bad_request(xml: str) -> None:
    error = check_client_stanza(stanza(xml))
    assert error is not None and error.condition == "bad-request"
