"""JIDs (RFC 7622): parse, normalise and compare addresses.

The PRECIS profiles are approximated with Unicode NFC plus case folding of the
localpart and domainpart; characters RFC 7622 forbids are rejected with a
sentence that names the part.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")
_MAX_PART = 1023


def _check_chars(value: str, part: str) -> None:
    for ch in value:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Co", "Cn") or (cat == "Zs" and part != "resourcepart"):
            raise ValueError(f"JID {part} contains a forbidden character U+{ord(ch):04X}")


def _prep_local(value: str) -> str:
    local = unicodedata.normalize("NFC", value.casefold())
    if not local:
        raise ValueError("JID localpart is empty")
    if any(ch in _LOCAL_FORBIDDEN for ch in local):
        raise ValueError("JID localpart contains one of \"&'/:<>@")
    _check_chars(local, "localpart")
    if len(local.encode()) > _MAX_PART:
        raise ValueError("JID localpart is longer than 1023 bytes")
    return local


def _prep_domain(value: str) -> str:
    domain = unicodedata.normalize("NFC", value.casefold()).rstrip(".")
    if not domain:
        raise ValueError("JID domainpart is empty")
    if domain.startswith("[") and domain.endswith("]"):
        return domain
    for label in domain.split("."):
        if not label:
            raise ValueError("JID domainpart has an empty label")
        if any(ch in " /@:<>\"'&\\" for ch in label):
            raise ValueError("JID domainpart contains a forbidden character")
    _check_chars(domain, "domainpart")
    if len(domain.encode()) > _MAX_PART:
        raise ValueError("JID domainpart is longer than 1023 bytes")
    return domain


def _prep_resource(value: str) -> str:
    resource = unicodedata.normalize("NFC", value)
    if not resource:
        raise ValueError("JID resourcepart is empty")
    _check_chars(resource, "resourcepart")
    if len(resource.encode()) > _MAX_PART:
        raise ValueError("JID resourcepart is longer than 1023 bytes")
    return resource


@dataclass(frozen=True, slots=True)
class JID:
    """A normalised JID; equal JIDs compare and hash equal."""

    local: str | None
    domain: str
    resource: str | None = None

    @classmethod
    def parse(cls, text: str) -> JID:
        """Parse and normalise ``text``; raise ``ValueError`` naming the bad part."""
        return _parse(text)

    @classmethod
    def make(cls, local: str | None, domain: str, resource: str | None = None) -> JID:
        return cls(
            _prep_local(local) if local is not None else None,
            _prep_domain(domain),
            _prep_resource(resource) if resource is not None else None,
        )

    @property
    def bare(self) -> JID:
        return self if self.resource is None else _bare(self.local, self.domain)

    @property
    def is_bare(self) -> bool:
        return self.resource is None

    @property
    def is_domain(self) -> bool:
        return self.local is None and self.resource is None

    def with_resource(self, resource: str) -> JID:
        return JID(self.local, self.domain, _prep_resource(resource))

    def __str__(self) -> str:
        text = self.domain
        if self.local is not None:
            text = f"{self.local}@{text}"
        if self.resource is not None:
            text = f"{text}/{self.resource}"
        return text


def parse_valid(texts: Iterable[str]) -> set[JID]:
    """The JIDs among ``texts``, skipping any that do not parse (rows a module loads at
    start must not stop the server)."""
    out: set[JID] = set()
    for text in texts:
        try:
            out.add(_parse(text))
        except ValueError:
            continue
    return out


@lru_cache(maxsize=16384)
def _bare(local: str | None, domain: str) -> JID:
    """Routing takes the bare JID of every stanza: a cache hit is cheaper than building a
    frozen dataclass."""
    return JID(local, domain)


@lru_cache(maxsize=16384)
def _parse(text: str) -> JID:
    if not text:
        raise ValueError("JID is empty")
    rest, slash, resource = text.partition("/")
    local: str | None
    if "@" in rest:
        local, _, domain = rest.partition("@")
    else:
        local, domain = None, rest
    return JID.make(local, domain, resource if slash else None)
