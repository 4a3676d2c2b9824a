"""What a feature module is: its options, its disco features and the handlers it registers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from xmpp_server.server import Host


@dataclass(frozen=True)
class NoOptions:
    """For modules without options (``enabled`` is handled by the registry)."""


class Module:
    """One feature or XEP. Subclasses register with the router in :meth:`setup`."""

    name: ClassVar[str]
    options_class: ClassVar[type[Any]] = NoOptions
    enabled_by_default: ClassVar[bool] = True
    # disco#info features on the server's JID and on account (bare) JIDs.
    features: ClassVar[tuple[str, ...]] = ()
    account_features: ClassVar[tuple[str, ...]] = ()

    def __init__(self, host: Host, options: Any) -> None:
        self.host = host
        self.options = options

    def setup(self) -> None:
        """Register handlers and hooks; called once, before listeners open."""

    async def start(self) -> None:
        """Start background work (timers, cleanups)."""

    async def stop(self) -> None:
        """Stop background work; called on graceful shutdown."""
