"""Start and stop the HTTP server on ``[http] port`` (plain) and ``tls_port`` (HTTPS)."""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from aiohttp import web

from xmpp_server import tls
from xmpp_server.http.app import build_app

if TYPE_CHECKING:
    from xmpp_server.server import Host

log = logging.getLogger("natterd.http")

SHUTDOWN_TIMEOUT = 5.0  # seconds running requests get on shutdown (an upload is cut off then)


def http_context(host: Host) -> ssl.SSLContext:
    """The [tls] certificate, with HTTP/1.1 as the ALPN protocol instead of xmpp-client."""
    config = host.config
    context = tls.server_context(config.cert_path, config.key_path, config.tls.min_version)
    context.set_alpn_protocols(["http/1.1"])
    return context


class HttpServer:
    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner

    @classmethod
    async def start(cls, host: Host) -> HttpServer:
        config = host.config.http
        runner = web.AppRunner(build_app(host), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            sites: list[web.TCPSite] = []
            if config.port:
                sites += [web.TCPSite(runner, h, config.port) for h in config.host]
            if config.tls_port:
                context = http_context(host)
                sites += [
                    web.TCPSite(runner, h, config.tls_port, ssl_context=context)
                    for h in config.host
                ]
            for site in sites:
                await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        for address in runner.addresses:
            log.info("HTTP listening on %s", address[:2])
        return cls(runner)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(str(a[0]), int(a[1])) for a in self.runner.addresses]

    async def stop(self) -> None:
        await self.runner.cleanup()
