"""The explicit registry of feature modules and their option validation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xmpp_server.config import Config, ConfigError, parse_options
from xmpp_server.modules.addressing import Addressing
from xmpp_server.modules.announce import Announce
from xmpp_server.modules.base import Module
from xmpp_server.modules.blocking import Blocking
from xmpp_server.modules.carbons import Carbons
from xmpp_server.modules.conference import Conferences
from xmpp_server.modules.csi import Csi
from xmpp_server.modules.disco import Disco
from xmpp_server.modules.extdisco import ExtDisco
from xmpp_server.modules.jingle import Jingle
from xmpp_server.modules.last import LastActivity
from xmpp_server.modules.mam import Mam
from xmpp_server.modules.muc import Muc
from xmpp_server.modules.offline import Offline
from xmpp_server.modules.pep import Pep
from xmpp_server.modules.ping import Ping
from xmpp_server.modules.presence import Presence
from xmpp_server.modules.push import Push
from xmpp_server.modules.register import Register
from xmpp_server.modules.roster import Roster
from xmpp_server.modules.session import LegacySession
from xmpp_server.modules.stanza_id import StanzaId
from xmpp_server.modules.stickers import Stickers
from xmpp_server.modules.upload import HttpUpload
from xmpp_server.modules.vcard import VCard
from xmpp_server.modules.version import Version

if TYPE_CHECKING:
    from xmpp_server.server import Host

MODULES: dict[str, type[Module]] = {
    module.name: module
    for module in (
        LegacySession,
        Roster,
        Presence,
        StanzaId,
        Jingle,  # before Offline: a call ringing reaches new resources before the flush
        Offline,
        Mam,
        Disco,
        Ping,
        Version,
        VCard,
        LastActivity,
        Blocking,
        Register,
        Carbons,
        Addressing,
        Announce,
        Muc,
        ExtDisco,
        Pep,
        HttpUpload,
        Stickers,  # after Pep: listens to its sticker nodes
        Csi,
        Push,
        Conferences,
    )
}


def _module_options(name: str, raw: dict[str, Any]) -> tuple[bool, Any]:
    cls = MODULES.get(name)
    if cls is None:
        known = ", ".join(sorted(MODULES))
        raise ConfigError(f"unknown module (known modules: {known})", f"modules.{name}")
    raw = dict(raw)
    enabled = raw.pop("enabled", cls.enabled_by_default)
    if not isinstance(enabled, bool):
        raise ConfigError(f"expected true or false, got {enabled!r}", f"modules.{name}.enabled")
    return enabled, parse_options(cls.options_class, raw, f"modules.{name}")


def validate_module_options(config: Config) -> None:
    """Raise ConfigError for an unknown module or a bad option (``natterctl check-config``)."""
    for name, raw in config.modules.items():
        _module_options(name, raw)


def build_modules(host: Host) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for name, cls in MODULES.items():
        enabled, options = _module_options(name, host.config.modules.get(name, {}))
        if enabled:
            modules[name] = cls(host, options)
    return modules
