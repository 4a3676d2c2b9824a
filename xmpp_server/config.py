"""Configuration: one TOML file plus ``NATTERD_<SECTION>__<KEY>`` environment overrides.

Everything is validated up front, so a typo fails at start with a message that names the
dotted key (and the environment variable, when one set it) instead of surfacing later as a
wrong default. ``parse_options`` is the one validator; modules use it for their own tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from xmpp_server.jid import JID

T = TypeVar("T")

DEFAULT_CONFIG_PATH = Path("/etc/natterd/natterd.toml")
ENV_PREFIX = "NATTERD_"
ENV_CONFIG = "NATTERD_CONFIG"
STORAGE_SCHEMES = ("sqlite+aiosqlite://", "postgresql+asyncpg://")

Mechanism = Literal[
    "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-1", "PLAIN"
]
MECHANISMS: tuple[Mechanism, ...] = get_args(Mechanism)


class ConfigError(Exception):
    """A configuration problem; ``key`` is the dotted path it concerns, when there is one."""

    def __init__(self, message: str, key: str | None = None, env_var: str | None = None) -> None:
        self.key = key
        self.detail = message
        self.env_var = env_var
        where = f"{key} (from environment variable {env_var})" if key and env_var else key
        super().__init__(f"{where}: {message}" if where else message)


# ---------------------------------------------------------------------------------------------
# Validation of a table against a frozen dataclass


def parse_options(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    """Build the dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types.

    Field metadata may declare ``min``/``max`` (inclusive), ``gt`` (exclusive lower bound),
    ``min_items``, ``unique``, ``scalar`` (a single string is accepted for a string list) and
    ``check`` (a callable returning the normalised value or raising ``ValueError``).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table, got {_show(data)}", path)
    fields = _fields(cls)
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key (known keys: {known})", _join(path, key))
    values: dict[str, Any] = {}
    for name, (tp, f) in fields.items():
        key = _join(path, name)
        if name not in data:
            no_default = dataclasses.MISSING
            if f.default is no_default and f.default_factory is no_default:
                raise ConfigError("missing required key", key)
            continue
        value = _convert(tp, data[name], key, f.metadata)
        check: Callable[[Any], Any] | None = f.metadata.get("check")
        if check is not None:
            try:
                value = check(value)
            except ValueError as exc:
                raise ConfigError(str(exc), key) from None
        values[name] = value
    return cls(**values)


@cache
def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field[Any]]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    """Render a value the way it would look in TOML, for error messages."""
    if isinstance(value, Mapping):
        return "a table"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """The 'expected ...' phrase for a type with its bounds."""
    origin = get_origin(tp)
    if _is_union(tp):
        return " or ".join(_describe(a, meta) for a in get_args(tp) if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in get_args(tp))
    if tp is bool:
        return "true or false"
    if tp is int or tp is float:
        noun = "an integer" if tp is int else "a number"
        lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
        if lo is not None and hi is not None:
            return f"{noun} between {lo} and {hi}"
        bounds = [f"> {gt}" if gt is not None else "", f">= {lo}" if lo is not None else ""]
        bounds.append(f"<= {hi}" if hi is not None else "")
        return " ".join([noun, *(b for b in bounds if b)])
    if tp is str:
        return "a string"
    if origin in (list, tuple):
        item = (*get_args(tp), Any)[0]
        if get_origin(item) is Literal:
            phrase = "a list of values from " + ", ".join(_show(a) for a in get_args(item))
        else:
            phrase = "a list of " + _plural(item)
        if meta.get("min_items"):
            phrase = "a non-empty " + phrase.removeprefix("a ")
        if meta.get("scalar"):
            phrase = f"{_describe(item, {})} or {phrase}"
        return phrase
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(
        tp, _describe(tp, {})
    )


def _convert(tp: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    def fail() -> ConfigError:
        return ConfigError(f"expected {_describe(tp, meta)}, got {_show(value)}", key)

    origin = get_origin(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:  # X | None: TOML has no null, so this is just X
            return _convert(members[0], value, key, meta)
        deeper: ConfigError | None = None
        for member in members:
            try:
                return _convert(member, value, key, meta)
            except ConfigError as exc:
                if exc.key != key and deeper is None:
                    deeper = exc  # the value had the right shape; report what was inside
        raise deeper or fail()
    if origin is Literal:
        for choice in get_args(tp):
            if type(choice) is type(value) and choice == value:
                return value
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int or tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail()
        if tp is int and not isinstance(value, int):
            raise fail()
        if isinstance(value, float) and not math.isfinite(value):
            raise fail()
        lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise fail()
        if gt is not None and value <= gt:
            raise fail()
        return float(value) if tp is float else value
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if origin in (list, tuple):
        item = (*get_args(tp), Any)[0]
        if isinstance(value, str) and meta.get("scalar"):
            value = [value]
        if not isinstance(value, list):
            raise fail()
        if len(value) < meta.get("min_items", 0):
            raise fail()
        items = [_convert(item, v, f"{key}[{i}]", {}) for i, v in enumerate(value)]
        if meta.get("unique"):
            seen: set[Any] = set()
            for i, v in enumerate(items):
                if v in seen:
                    raise ConfigError(f"duplicate value {_show(v)}", f"{key}[{i}]")
                seen.add(v)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail()
        _, item = get_args(tp)
        return {k: _convert(item, v, _join(key, k), {}) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse_options(tp, value, key)
    raise TypeError(f"{key}: unsupported option type {tp!r}")


# ---------------------------------------------------------------------------------------------
# Sections


def _check_domain(value: str) -> str:
    try:
        jid = JID.parse(value)
    except ValueError as exc:
        raise ValueError(f"invalid domain {_show(value)}: {exc}") from None
    if not jid.is_domain:
        raise ValueError(f'expected a bare domain such as "example.org", got {_show(value)}')
    return jid.domain


def _check_storage_url(value: str) -> str:
    if not value.startswith(STORAGE_SCHEMES):
        raise ValueError("expected a URL starting with " + " or ".join(STORAGE_SCHEMES))
    try:
        make_url(value)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"not a valid database URL: {exc}") from None
    return value


@dataclass(frozen=True)
class ServerConfig:
    domain: str = field(default="localhost", metadata={"check": _check_domain})
    """The XMPP domain served (the part after @); normalised to lower case."""
    data_dir: str = "data"
    """After loading: the absolute data directory (also ``Config.data_dir`` as a Path)."""
    name: str = "natterd"
    """Software name reported by XEP-0092."""
    event_loop: Literal["asyncio", "uvloop"] = "uvloop"
    """uvloop (libuv; the standard library's loop if it is not installed) or asyncio's own.
    uvloop measured +11 % chat msgs/s, +25 % logins/s and less memory per idle session;
    across login/logout cycles both loops now keep the same high-water RSS
    (docs/benchmarks.md)."""


@dataclass(frozen=True)
class StorageConfig:
    url: str = field(
        default="sqlite+aiosqlite:///{data_dir}/natterd.sqlite3",
        metadata={"check": _check_storage_url},
    )
    """SQLAlchemy URL; ``{data_dir}`` is replaced by the absolute data directory."""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""
    """PEM certificate chain; empty means ``{data_dir}/tls/<domain>.crt``, made on first start."""
    key_file: str = ""
    min_version: Literal["1.2", "1.3"] = "1.2"


@dataclass(frozen=True)
class C2SConfig:
    host: tuple[str, ...] = field(default=("0.0.0.0",), metadata={"scalar": True})
    port: int = field(default=5222, metadata={"min": 0, "max": 65535})
    """0 binds an ephemeral port (tests)."""
    direct_tls: bool = True
    """Also listen for XEP-0368 direct TLS on ``direct_tls_port``."""
    direct_tls_port: int = field(default=5223, metadata={"min": 0, "max": 65535})
    require_tls: bool = True
    idle_timeout: float = field(default=300.0, metadata={"gt": 0})
    """Seconds without traffic before a stream is closed."""
    auth_timeout: float = field(default=60.0, metadata={"gt": 0})
    """Seconds from connect to an established session (authenticated and bound or resumed),
    however much the client trickles meanwhile; then stream error ``policy-violation``."""
    read_rate: int = field(default=65536, metadata={"min": 0})
    """Bytes per second per connection; 0 means unlimited."""
    read_burst: int = field(default=262144, metadata={"min": 1})
    max_connections_per_ip: int = field(default=100, metadata={"min": 0})
    """Simultaneous client connections from one address (IPv6: its /64); 0 means unlimited.
    One more is answered with a ``policy-violation`` stream error and closed."""
    stream_management: bool = True
    """Offer XEP-0198 stream management (acks, resumption)."""
    resume_timeout: float = field(default=300.0, metadata={"min": 0})
    """Seconds a session whose connection dropped waits to be resumed; 0 disables resumption."""


@dataclass(frozen=True)
class LimitsConfig:
    max_stanza_size: int = field(default=262144, metadata={"min": 10000})
    """Bytes the XML parser may hold for one authenticated stream: the stanza being read,
    or a half-read start tag or stream header (docs/limits.md)."""
    max_stanza_size_before_auth: int = field(default=16384, metadata={"min": 4096})
    """The same before SASL succeeds: stream headers, STARTTLS, SASL and registration."""
    max_depth: int = field(default=32, metadata={"min": 2})
    max_attributes: int = field(default=64, metadata={"min": 8})
    """Attributes plus namespace declarations on one element."""
    max_attribute_value: int = field(default=4096, metadata={"min": 1024})
    max_output_buffer: int = field(default=4 * 1024 * 1024, metadata={"min": 65536})
    """Bytes of unread output a client may pile up before it is dropped as a slow reader."""


@dataclass(frozen=True)
class AuthConfig:
    mechanisms: tuple[Mechanism, ...] = field(
        default=MECHANISMS, metadata={"min_items": 1, "unique": True}
    )
    """Offered in this order; -PLUS variants are only offered over TLS."""
    scram_iterations: int = field(default=4096, metadata={"min": 4096})
    max_failures: int = field(default=5, metadata={"min": 0})
    """Failed logins from one address to one account within ``failure_window`` before that
    address is locked out of that account; 0 turns every login lockout off."""
    max_failures_per_address: int = field(default=20, metadata={"min": 0})
    """Failed logins from one address (IPv6: its /64) to any accounts before it is locked
    out of accounts it has not logged in to before; 0 = no such limit."""
    max_failures_per_account: int = field(default=20, metadata={"min": 0})
    """Failed logins to one account from any addresses before addresses that have not logged
    in to it before are locked out of it; 0 = no such limit. Known addresses never are."""
    failure_window: float = field(default=60.0, metadata={"gt": 0})
    lockout: float = field(default=60.0, metadata={"min": 0})


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class StunConfig:
    """The STUN/TURN server (``stun/``), run inside natterd or alone with ``natterd stun``."""

    enabled: bool = False
    host: tuple[str, ...] = field(default=("0.0.0.0",), metadata={"scalar": True})
    udp_port: int = field(default=3478, metadata={"min": 0, "max": 65535})
    tcp_port: int = field(default=3478, metadata={"min": 0, "max": 65535})
    tls_port: int = field(default=5349, metadata={"min": 0, "max": 65535})
    alternate_host: str = ""
    alternate_port: int = field(default=3479, metadata={"min": 0, "max": 65535})
    public_host: str = ""
    turn: bool = True
    realm: str = ""
    secret: str = ""
    credential_ttl: int = field(default=86400, metadata={"min": 60})
    relay_host: str = ""
    relay_min_port: int = field(default=49152, metadata={"min": 1024, "max": 65535})
    relay_max_port: int = field(default=65535, metadata={"min": 1024, "max": 65535})
    max_allocations: int = field(default=1000, metadata={"min": 0})
    max_allocations_per_user: int = field(default=10, metadata={"min": 0})
    allowed_peers: tuple[str, ...] = ()
    rate: float = field(default=100.0, metadata={"min": 0})
    burst: int = field(default=200, metadata={"min": 1})
    workers: int = field(default=1, metadata={"min": 1, "max": 64})
    """Processes answering on the same ports (SO_REUSEPORT): the kernel spreads clients by
    address, and each client (with its TURN allocations) stays with one process."""


def _check_public_url(value: str) -> str:
    if value and not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", value):
        example = '"https://example.org"'
        raise ValueError(f'expected "" or an http(s) URL such as {example}, got {_show(value)}')
    return value.rstrip("/")


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP server (``xmpp_server/http/``): uploads, later WebSocket; modules add routes."""

    enabled: bool = True
    host: tuple[str, ...] = field(default=("0.0.0.0",), metadata={"scalar": True})
    port: int = field(default=5280, metadata={"min": 0, "max": 65535})
    """Plain HTTP, for loopback and reverse proxies; 0 = off."""
    tls_port: int = field(default=5281, metadata={"min": 0, "max": 65535})
    """HTTPS with the [tls] certificate; 0 = off."""
    public_url: str = field(default="", metadata={"check": _check_public_url})
    """The base URL clients are given; "" = ``https://<domain>:<tls_port>``."""


@dataclass(frozen=True)
class ComponentEntry:
    """One external component (XEP-0114): its domain and the secret of its handshake."""

    domain: str = field(default="", metadata={"check": _check_domain})
    secret: str = ""


@dataclass(frozen=True)
class ComponentsConfig:
    """XEP-0114 listener for external components (the push app server, gateways)."""

    enabled: bool = False
    host: tuple[str, ...] = field(default=("127.0.0.1",), metadata={"scalar": True})
    port: int = field(default=5347, metadata={"min": 0, "max": 65535})
    services: tuple[ComponentEntry, ...] = ()


@dataclass(frozen=True)
class PushGatewayConfig:
    """``natterd push``: the XEP-0357 app server, a component forwarding to FCM and APNs."""

    domain: str = "push.localhost"
    server_host: str = "127.0.0.1"
    server_port: int = field(default=5347, metadata={"min": 1, "max": 65535})
    secret: str = ""
    fcm_endpoint: str = "https://fcm.googleapis.com"
    fcm_project: str = ""
    """Firebase project id; "" = the ``project_id`` of the service account."""
    fcm_service_account: str = ""
    """Google service-account key file (JSON); the gateway gets OAuth 2 tokens with it."""
    fcm_token: str = ""
    """A fixed bearer token, used only without ``fcm_service_account`` (tests, legacy)."""
    apns_endpoint: str = "https://api.push.apple.com"
    apns_key_file: str = ""
    """APNs auth key (``AuthKey_<id>.p8``); the gateway signs its provider tokens with it."""
    apns_key_id: str = ""
    apns_team_id: str = ""
    apns_token: str = ""
    """A fixed provider token, used only without ``apns_key_file`` (tests, legacy)."""
    apns_topic: str = ""
    timeout: float = field(default=10.0, metadata={"gt": 0})


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "tls": TlsConfig,
    "c2s": C2SConfig,
    "limits": LimitsConfig,
    "auth": AuthConfig,
    "logging": LoggingConfig,
    "stun": StunConfig,
    "http": HttpConfig,
    "components": ComponentsConfig,
    "pushgate": PushGatewayConfig,
}


def _default_tls_paths(data_dir: Path, domain: str) -> tuple[Path, Path]:
    return data_dir / "tls" / f"{domain}.crt", data_dir / "tls" / f"{domain}.key"


@dataclass(frozen=True)
class Config:
    """The whole validated configuration, with every path made absolute."""

    server: ServerConfig
    storage: StorageConfig
    tls: TlsConfig
    c2s: C2SConfig
    limits: LimitsConfig
    auth: AuthConfig
    logging: LoggingConfig
    stun: StunConfig
    http: HttpConfig
    modules: dict[str, dict[str, Any]]
    """Raw ``[modules.<name>]`` tables; the module registry validates them."""
    path: Path | None
    data_dir: Path
    cert_path: Path
    key_path: Path
    env_keys: Mapping[str, str] = field(default_factory=dict)
    """Dotted key → the environment variable that set it, to name it in later errors."""
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    pushgate: PushGatewayConfig = field(default_factory=PushGatewayConfig)

    @property
    def domain(self) -> str:
        return self.server.domain

    @property
    def tls_configured(self) -> bool:
        """Whether the certificate files were given explicitly (never generated then)."""
        return bool(self.tls.cert_file or self.tls.key_file)

    def default_tls_paths(self) -> tuple[Path, Path]:
        """Where a generated certificate and key live: ``{data_dir}/tls/<domain>.crt/.key``."""
        return _default_tls_paths(self.data_dir, self.server.domain)

    @property
    def http_public_url(self) -> str:
        """Where clients reach the HTTP server: ``[http] public_url`` or one made of the
        domain and the TLS port (the plain port when TLS is off), without a trailing slash."""
        http = self.http
        if http.public_url:
            return http.public_url
        if http.tls_port or not http.port:
            return f"https://{self.server.domain}:{http.tls_port}"
        return f"http://{self.server.domain}:{http.port}"

    def explain(self, error: ConfigError) -> ConfigError:
        """Add the environment variable to an error about a key that one set."""
        return _name_env_var(error, self.env_keys)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, env: Mapping[str, str] = os.environ) -> Config:
    """Read ``path`` (or ``$NATTERD_CONFIG``, or the standard path if it exists), then the
    environment overrides, and validate everything."""
    if path is None or path == "":
        if env.get(ENV_CONFIG):
            path = env[ENV_CONFIG]
        elif DEFAULT_CONFIG_PATH.exists():
            path = DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    file: Path | None = None
    if path is not None and path != "":
        file = Path(path).expanduser().absolute()
        data = _read_toml(file)
    env_keys = _apply_env(data, env)
    base = file.parent if file is not None else Path.cwd()
    try:
        return build_config(data, base_dir=base, path=file, env_keys=env_keys)
    except ConfigError as exc:
        raise _name_env_var(exc, env_keys) from None


def build_config(
    data: Mapping[str, Any],
    *,
    base_dir: Path,
    path: Path | None = None,
    env_keys: Mapping[str, str] | None = None,
) -> Config:
    """Validate a parsed TOML document; relative paths are taken relative to ``base_dir``.

    Tests build configurations with this instead of writing a file.
    """
    for name, value in data.items():
        if name not in SECTIONS and name != "modules":
            known = ", ".join(sorted([*SECTIONS, "modules"]))
            raise ConfigError(f"unknown section (known sections: {known})", name)
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a table, got {_show(value)}", name)
    sections: dict[str, Any] = {
        name: parse_options(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()
    }
    modules: dict[str, dict[str, Any]] = {}
    for name, table in data.get("modules", {}).items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"expected a table, got {_show(table)}", f"modules.{name}")
        modules[name] = dict(table)

    def resolve(value: str) -> Path:
        # normpath, not resolve(): "../data" should read well without following symlinks.
        return Path(os.path.normpath((base_dir / Path(value).expanduser()).absolute()))

    server: ServerConfig = sections["server"]
    if not server.data_dir:
        raise ConfigError('expected a directory path, got ""', "server.data_dir")
    data_dir = resolve(server.data_dir)
    server = dataclasses.replace(server, data_dir=str(data_dir))
    storage: StorageConfig = sections["storage"]
    storage = dataclasses.replace(storage, url=storage.url.replace("{data_dir}", str(data_dir)))

    tls: TlsConfig = sections["tls"]
    if bool(tls.cert_file) != bool(tls.key_file):
        missing = "tls.key_file" if tls.cert_file else "tls.cert_file"
        other = "tls.cert_file" if tls.cert_file else "tls.key_file"
        raise ConfigError(f"must be set when {other} is set", missing)
    if tls.cert_file:
        cert_path, key_path = resolve(tls.cert_file), resolve(tls.key_file)
    else:
        cert_path, key_path = _default_tls_paths(data_dir, server.domain)
    pushgate: PushGatewayConfig = sections["pushgate"]
    if pushgate.apns_key_file:
        for name in ("apns_key_id", "apns_team_id"):
            if not getattr(pushgate, name):
                raise ConfigError(
                    "must be set when pushgate.apns_key_file is set", f"pushgate.{name}"
                )
    pushgate = dataclasses.replace(
        pushgate,
        fcm_service_account=pushgate.fcm_service_account
        and str(resolve(pushgate.fcm_service_account)),
        apns_key_file=pushgate.apns_key_file and str(resolve(pushgate.apns_key_file)),
    )
    return Config(
        server=server,
        storage=storage,
        tls=tls,
        c2s=sections["c2s"],
        limits=sections["limits"],
        auth=sections["auth"],
        logging=sections["logging"],
        stun=sections["stun"],
        http=sections["http"],
        modules=modules,
        path=path,
        data_dir=data_dir,
        cert_path=cert_path,
        key_path=key_path,
        env_keys=dict(env_keys or {}),
        components=sections["components"],
        pushgate=pushgate,
    )


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {file}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.search(message)
        if match:
            where = f"{file}:{match[1]}:{match[2]}"
            message = message[: match.start()]
            raise ConfigError(f"{where}: invalid TOML: {message}") from None
        raise ConfigError(f"{file}: invalid TOML: {message}") from None


def _env_value(raw: str, wants_string: bool) -> Any:
    """A TOML value if ``raw`` parses as one, else the raw text."""
    try:
        value = tomllib.loads("v = " + raw)["v"]
    except tomllib.TOMLDecodeError:
        return raw
    if wants_string and not isinstance(value, str):
        return raw  # e.g. NATTERD_TLS__MIN_VERSION=1.3 is the string "1.3", not a float
    return value


def _wants_string(section: str, key: str) -> bool:
    cls = SECTIONS.get(section)
    if cls is None:
        return False
    entry = _fields(cls).get(key)
    return entry is not None and _accepts_string(entry[0])


def _accepts_string(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    if _is_union(tp):
        return any(_accepts_string(a) for a in get_args(tp))
    return False


def _env_overrides(env: Mapping[str, str]) -> Iterator[tuple[str, list[str], str]]:
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue  # NATTERD_CONFIG and friends are not overrides
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if not all(parts):
            raise ConfigError(
                "expected NATTERD_<SECTION>__<KEY> or NATTERD_MODULES__<NAME>__<KEY>", name
            )
        yield name, parts, env[name]


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Merge overrides into the parsed file; return dotted key → variable name."""
    env_keys: dict[str, str] = {}
    for name, parts, raw in _env_overrides(env):
        section = parts[0]
        if section in SECTIONS and len(parts) != 2:
            raise ConfigError(f"expected NATTERD_{section.upper()}__<KEY>", name)
        if section not in SECTIONS and section != "modules":
            known = ", ".join(sorted([*SECTIONS, "modules"]))
            raise ConfigError(f"unknown section {section!r} (known sections: {known})", name)
        value = _env_value(raw, len(parts) == 2 and _wants_string(section, parts[1]))
        table = data
        for i, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"cannot set {'.'.join(parts)}: {where} is not a table", name)
        table[parts[-1]] = value
        env_keys[".".join(parts)] = name
    return env_keys


def _name_env_var(error: ConfigError, env_keys: Mapping[str, str]) -> ConfigError:
    key = error.key
    if key is None or error.env_var is not None:
        return error
    for dotted, var in env_keys.items():
        if key == dotted or key.startswith((dotted + ".", dotted + "[")):
            return ConfigError(error.detail, key, var)
    return error
