"""The aiohttp application: ``/health`` and whatever routes the modules offer.

A module serves HTTP by defining ``http_routes() -> Iterable[web.AbstractRouteDef]`` (the same
duck-typed pattern as ``disco_items()``); the routes are collected once, after every module's
``setup()``. Handlers reach the server through ``request.app[HOST]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from xmpp_server.server import Host

log = logging.getLogger("natterd.http")

HOST: web.AppKey[Any] = web.AppKey("natterd.host")
"""The :class:`~xmpp_server.server.Host` the application serves."""

# The security headers every response gets: nothing served here is meant to be framed, and
# uploaded files must never be sniffed into something executable.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def health(request: web.Request) -> web.Response:
    """200 while the server runs and its database answers, 503 otherwise (for probes)."""
    host: Host = request.app[HOST]
    try:
        async with host.storage.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as exc:
        log.warning("health check: database unavailable: %s", exc)
        return web.json_response({"status": "unavailable", "database": "down"}, status=503)
    return web.json_response({"status": "ok", "domain": host.domain})


def build_app(host: Host) -> web.Application:
    app = web.Application()
    app.on_response_prepare.append(_security_headers)
    app[HOST] = host
    app.router.add_get("/health", health)
    for module in host.modules.values():
        routes: Any = getattr(module, "http_routes", None)
        if routes is not None:
            found: Iterable[web.AbstractRouteDef] = routes()
            app.router.add_routes(found)
    return app
