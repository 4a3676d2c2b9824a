"""Stream and stanza errors that carry their wire condition (RFC 6120 §4.9, §8.3).

Raise them anywhere in the server; ``stream.py`` is the one place that turns a
:class:`StreamError` into ``<stream:error/>`` and ``router.py`` the one place that
turns a :class:`StanzaError` into an error reply.
"""

from __future__ import annotations

from typing import Any

NS_STREAMS = "http://etherx.jabber.org/streams"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"

STREAM_CONDITIONS = frozenset(
    {
        "bad-format",
        "bad-namespace-prefix",
        "conflict",
        "connection-timeout",
        "host-gone",
        "host-unknown",
        "improper-addressing",
        "internal-server-error",
        "invalid-from",
        "invalid-namespace",
        "invalid-xml",
        "not-authorized",
        "not-well-formed",
        "policy-violation",
        "remote-connection-failed",
        "reset",
        "resource-constraint",
        "restricted-xml",
        "see-other-host",
        "system-shutdown",
        "undefined-condition",
        "unsupported-encoding",
        "unsupported-feature",
        "unsupported-stanza-type",
        "unsupported-version",
    }
)

# Default error type per condition (RFC 6120 §8.3.3).
STANZA_CONDITIONS: dict[str, str] = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


class StreamError(Exception):
    """A fatal error: the stream is closed with ``<stream:error>`` carrying ``condition``."""

    def __init__(
        self, condition: str, text: str | None = None, *, extra: list[Any] | None = None
    ) -> None:
        if condition not in STREAM_CONDITIONS:
            raise ValueError(f"unknown stream error condition {condition!r}")
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text
        # Application-specific condition elements (RFC 6120 §4.9.4), after the defined one.
        self.extra: list[Any] = extra or []


class StanzaError(Exception):
    """A per-stanza error: the offending stanza is answered with ``type='error'``."""

    condition = "undefined-condition"

    def __init__(
        self,
        text: str | None = None,
        *,
        condition: str | None = None,
        type: str | None = None,
        extra: list[Any] | None = None,
    ) -> None:
        if condition is not None:
            self.condition = condition
        if self.condition not in STANZA_CONDITIONS:
            raise ValueError(f"unknown stanza error condition {self.condition!r}")
        self.type = type or STANZA_CONDITIONS[self.condition]
        self.text = text
        # Application-specific condition elements, appended after the defined condition.
        self.extra: list[Any] = extra or []
        super().__init__(f"{self.condition}: {text}" if text else self.condition)


def _stanza_error(condition: str) -> type[StanzaError]:
    name = "".join(part.capitalize() for part in condition.split("-"))
    return type(name, (StanzaError,), {"condition": condition, "__doc__": f"``<{condition}/>``"})


BadRequest = _stanza_error("bad-request")
Conflict = _stanza_error("conflict")
FeatureNotImplemented = _stanza_error("feature-not-implemented")
Forbidden = _stanza_error("forbidden")
InternalServerError = _stanza_error("internal-server-error")
ItemNotFound = _stanza_error("item-not-found")
JidMalformed = _stanza_error("jid-malformed")
NotAcceptable = _stanza_error("not-acceptable")
NotAllowed = _stanza_error("not-allowed")
NotAuthorized = _stanza_error("not-authorized")
PolicyViolation = _stanza_error("policy-violation")
RecipientUnavailable = _stanza_error("recipient-unavailable")
RegistrationRequired = _stanza_error("registration-required")
RemoteServerNotFound = _stanza_error("remote-server-not-found")
ResourceConstraint = _stanza_error("resource-constraint")
ServiceUnavailable = _stanza_error("service-unavailable")
SubscriptionRequired = _stanza_error("subscription-required")
UnexpectedRequest = _stanza_error("unexpected-request")
