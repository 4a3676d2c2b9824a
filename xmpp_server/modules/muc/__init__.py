"""XEP-0045 Multi-User Chat: :mod:`.room` holds the rules, :mod:`.service` the shell."""

from xmpp_server.modules.muc.service import Muc, MucOptions

__all__ = ["Muc", "MucOptions"]
