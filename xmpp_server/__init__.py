"""Natter: an XMPP server with a built-in VoIP relay."""

__version__ = "0.1.0"
