"""The admin control socket: how ``natterctl`` asks a running natterd to act.

natterd listens on a unix socket, ``{data_dir}/natterd.ctl`` unless
``[modules.announce] control_socket`` names another path (relative: to the data directory).
The file is mode 0600, so only natterd's own user (and root) can connect: the socket needs no
authentication of its own. The protocol is JSON lines, one answer per request::

    {"command": "announce", ...}  ->  {"ok": true, ...}  or  {"ok": false, "error": "..."}

Modules offer commands by defining ``control_commands()`` (see :class:`Commands`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from xmpp_server.config import Config, ConfigError

if TYPE_CHECKING:
    from xmpp_server.server import Host

log = logging.getLogger("natterd.control")

DEFAULT_NAME = "natterd.ctl"
MAX_REQUEST = 1 << 20  # bytes in one request line
IDLE_TIMEOUT = 60.0  # seconds a connection may stay silent
_MAX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL (Linux)

CommandHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""Takes the request object, returns the answer's fields (``ok`` is added)."""


class ControlError(Exception):
    """A command's failure, answered as ``{"ok": false, "error": str(exc)}``."""


class NotRunning(Exception):
    """Nobody listens on the control socket (natterctl's side)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"natterd does not seem to be running: no control socket at {path}")
        self.path = path


@runtime_checkable
class Commands(Protocol):
    """A module that offers control commands."""

    def control_commands(self) -> Mapping[str, CommandHandler]: ...


def socket_path(config: Config) -> Path:
    """The control socket's path; natterd and natterctl both compute it from the config."""
    key = "modules.announce.control_socket"
    value = config.modules.get("announce", {}).get("control_socket", "")
    if not isinstance(value, str):
        raise config.explain(ConfigError(f"expected a string, got {value!r}", key))
    if not value:
        return config.data_dir / DEFAULT_NAME
    return Path(os.path.normpath(config.data_dir / Path(value).expanduser()))


def gather(modules: Iterable[object]) -> dict[str, CommandHandler]:
    commands: dict[str, CommandHandler] = {}
    for module in modules:
        if isinstance(module, Commands):
            for name, handler in module.control_commands().items():
                if name in commands:
                    raise ValueError(f"two handlers for the control command {name!r}")
                commands[name] = handler
    return commands


async def _answers(path: Path) -> bool:
    """Whether a server is listening on ``path`` (a stale file after a crash is not one)."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _bind(path: Path) -> socket.socket:
    """A listening socket at ``path`` that never exists with looser permissions than 0600:
    bound under a temporary name, restricted, then renamed over any stale file."""
    temporary = path.with_name(path.name + ".new")
    if len(os.fsencode(temporary)) > _MAX_PATH:
        raise OSError(
            errno.ENAMETOOLONG,
            f"control socket path {path} is too long for a unix socket; "
            "set [modules.announce] control_socket to a shorter path",
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        sock.bind(str(temporary))
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return sock


class ControlServer:
    """The listening side, owned by :class:`xmpp_server.server.Server`."""

    def __init__(self, path: Path, commands: Mapping[str, CommandHandler]) -> None:
        self.path = path
        self.commands = dict(commands)
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, path: Path, commands: Mapping[str, CommandHandler]) -> ControlServer:
        control = cls(path, commands)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            if await _answers(path):
                raise OSError(errno.EADDRINUSE, f"another natterd is listening on {path}")
        sock = _bind(path)
        control._inode = path.stat().st_ino
        control._server = await asyncio.start_unix_server(
            control._serve, sock=sock, limit=MAX_REQUEST
        )
        log.info("control socket at %s", path)
        return control

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None
        # Only our own file: another natterd may have replaced it since.
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    line = await reader.readline()
                if not line:
                    break
                answer = await self.answer(line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, ValueError, ConnectionError) as exc:
            # ValueError: a request line over MAX_REQUEST.
            log.info("control connection closed: %s", exc or type(exc).__name__)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "the request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'expected an object with a "command" string'}
        name = request["command"]
        handler = self.commands.get(name)
        if handler is None:
            known = ", ".join(sorted(self.commands)) or "none; is the module enabled?"
            return {"ok": False, "error": f"unknown command {name!r} (known: {known})"}
        try:
            result = await handler(request)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("control command %s failed", name)
            return {"ok": False, "error": "internal error; see the natterd log"}
        log.info("control command %s done", name)
        return {"ok": True, **result}


async def open_control(
    host: Host, extra: Mapping[str, CommandHandler] | None = None
) -> ControlServer:
    """Listen for natterctl with the commands of the enabled modules (and ``extra``)."""
    commands = gather(host.modules.values())
    for name, handler in (extra or {}).items():
        if name in commands:
            raise ValueError(f"two handlers for the control command {name!r}")
        commands[name] = handler
    return await ControlServer.start(socket_path(host.config), commands)


async def request(path: Path, message: Mapping[str, Any], timeout: float = 300.0) -> Any:
    """Send one request and return the decoded answer (natterctl's side)."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REQUEST)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(path) from None
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        async with asyncio.timeout(timeout):
            await writer.drain()
            line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line:
        raise ConnectionError(f"natterd closed the control socket {path} without answering")
    return json.loads(line)
