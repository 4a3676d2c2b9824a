"""XEP-0092 Software Version of the server.

The operating system is left out unless ``show_os`` is set: it tells an attacker
which exploits to try and tells a user nothing they need.
"""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import xmpp_server
from xmpp_server.modules.base import Module
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_result, qn
from xmpp_server.xml import Element

NS_VERSION = "jabber:iq:version"


@dataclass(frozen=True)
class VersionOptions:
    show_os: bool = False


class Version(Module):
    name = "version"
    options_class = VersionOptions
    features = (NS_VERSION,)

    def setup(self) -> None:
        self.host.router.add_iq(IqKey("get", "host", NS_VERSION, "query"), self.on_query)

    async def on_query(self, origin: Session | None, iq: Element) -> None:
        query = Element(qn(NS_VERSION, "query"))
        ET.SubElement(query, qn(NS_VERSION, "name")).text = self.host.config.server.name
        ET.SubElement(query, qn(NS_VERSION, "version")).text = xmpp_server.__version__
        if self.options.show_os:
            os_name = f"{platform.system()} {platform.release()}".strip()
            ET.SubElement(query, qn(NS_VERSION, "os")).text = os_name
        if origin is not None:
            origin.deliver(iq_result(iq, query))
