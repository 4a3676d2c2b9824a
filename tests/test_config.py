"""Configuration loading: defaults, validation messages that name the key, env overrides."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from xmpp_server import config as config_module
from xmpp_server.config import (
    SECTIONS,
    AuthConfig,
    C2SConfig,
    Config,
    ConfigError,
    ServerConfig,
    load_config,
    parse_options,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "natterd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env=env or {})


# ---------------------------------------------------------------------------------- defaults


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config(None, env={})
    assert config.path is None
    assert config.server == ServerConfig(domain="localhost", data_dir=str(tmp_path / "data"))
    assert config.data_dir == tmp_path / "data"
    assert config.storage.url == f"sqlite+aiosqlite:///{tmp_path}/data/natterd.sqlite3"
    assert config.cert_path == tmp_path / "data" / "tls" / "localhost.crt"
    assert config.key_path == tmp_path / "data" / "tls" / "localhost.key"
    assert not config.tls_configured
    assert config.c2s == C2SConfig()
    assert config.c2s.host == ("0.0.0.0",)
    assert config.c2s.port == 5222
    assert config.auth.mechanisms[0] == "SCRAM-SHA-256-PLUS"
    assert config.auth.scram_iterations == 4096
    assert config.limits.max_stanza_size == 262144
    assert config.logging.level == "info"
    assert config.modules == {}


def test_standard_path_is_used_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[server]\ndomain = "example.org"\n')
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", path)
    assert load_config(None, env={}).domain == "example.org"


def test_natterd_config_variable_wins_over_the_standard_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", write(tmp_path, ""))
    other = tmp_path / "other.toml"
    other.write_text('[server]\ndomain = "other.org"\n')
    config = load_config(None, env={"NATTERD_CONFIG": str(other)})
    assert config.domain == "other.org"
    assert config.path == other


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "natterd.toml"
    path.write_text(
        '[server]\ndata_dir = "../var"\n'
        '[tls]\ncert_file = "tls/cert.pem"\nkey_file = "/abs/key.pem"\n'
    )
    config = load_config(path, env={})
    assert config.data_dir == tmp_path / "var"
    assert config.server.data_dir == str(config.data_dir)
    assert config.cert_path == tmp_path / "etc" / "tls" / "cert.pem"
    assert config.key_path == Path("/abs/key.pem")
    assert config.tls_configured
    assert config.storage.url == f"sqlite+aiosqlite:///{config.data_dir}/natterd.sqlite3"


def test_values_are_normalised(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        '[server]\ndomain = "Example.ORG"\n'
        '[c2s]\nhost = ["127.0.0.1", "::1"]\nidle_timeout = 10\n'
        "[modules.register]\nenabled = true\n[modules.ping]\n",
    )
    assert config.domain == "example.org"
    assert config.default_tls_paths()[0].name == "example.org.crt"
    assert config.c2s.host == ("127.0.0.1", "::1")
    assert config.c2s.idle_timeout == 10.0 and isinstance(config.c2s.idle_timeout, float)
    assert config.modules == {"register": {"enabled": True}, "ping": {}}


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.c2s.port = 1  # type: ignore[misc]


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[c2s]\nport = "abc"',
            'c2s.port: expected an integer between 0 and 65535, got "abc"',
        ),
        ("[c2s]\nport = 70000", "c2s.port: expected an integer between 0 and 65535, got 70000"),
        ("[c2s]\nport = true", "c2s.port: expected an integer between 0 and 65535, got true"),
        ("[c2s]\nport = 5222.0", "c2s.port: expected an integer between 0 and 65535, got 5222.0"),
        ("[c2s]\nidle_timeout = 0", "c2s.idle_timeout: expected a number > 0, got 0"),
        ("[c2s]\nidle_timeout = nan", "c2s.idle_timeout: expected a number > 0, got NaN"),
        ('[c2s]\ndirect_tls = "yes"', 'c2s.direct_tls: expected true or false, got "yes"'),
        (
            "[c2s]\nhost = [1]",
            "c2s.host[0]: expected a string, got 1",
        ),
        (
            "[c2s]\nhost = 1",
            "c2s.host: expected a string or a list of strings, got 1",
        ),
        ("[c2s]\nread_rate = -1", "c2s.read_rate: expected an integer >= 0, got -1"),
        (
            "[server]\ncolour = 1",
            "server.colour: unknown key (known keys: data_dir, domain, event_loop, name)",
        ),
        (
            '[server]\ndomain = "alice@example.org"',
            'server.domain: expected a bare domain such as "example.org", got "alice@example.org"',
        ),
        (
            '[server]\ndomain = "exa mple.org"',
            'server.domain: invalid domain "exa mple.org": '
            "JID domainpart contains a forbidden character",
        ),
        ('[server]\ndata_dir = ""', 'server.data_dir: expected a directory path, got ""'),
        (
            '[storage]\nurl = "mysql://localhost/natter"',
            "storage.url: expected a URL starting with sqlite+aiosqlite:// or postgresql+asyncpg://",
        ),
        ("[tls]\nmin_version = 1.3", 'tls.min_version: expected one of "1.2", "1.3", got 1.3'),
        ('[tls]\ncert_file = "a.pem"', "tls.key_file: must be set when tls.cert_file is set"),
        (
            "[limits]\nmax_stanza_size = 9999",
            "limits.max_stanza_size: expected an integer >= 10000, got 9999",
        ),
        (
            '[auth]\nmechanisms = ["PLAIN", "DIGEST-MD5"]',
            'auth.mechanisms[1]: expected one of "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", '
            '"SCRAM-SHA-1-PLUS", "SCRAM-SHA-1", "PLAIN", got "DIGEST-MD5"',
        ),
        (
            '[auth]\nmechanisms = ["PLAIN", "PLAIN"]',
            'auth.mechanisms[1]: duplicate value "PLAIN"',
        ),
        ("[auth]\nmechanisms = []", "auth.mechanisms: expected a non-empty list of values from"),
        (
            "[auth]\nscram_iterations = 1000",
            "auth.scram_iterations: expected an integer >= 4096, got 1000",
        ),
        (
            '[logging]\nlevel = "verbose"',
            'logging.level: expected one of "debug", "info", "warning", "error", got "verbose"',
        ),
        (
            "colour = 1",
            "colour: unknown section (known sections: auth, c2s, components, http, limits, logging",
        ),
        ("c2s = 1", "c2s: expected a table, got 1"),
        ("[modules]\nregister = 1", "modules.register: expected a table, got 1"),
    ],
)
def test_validation_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, toml)
    assert str(info.value).startswith(message)


def test_error_carries_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "[c2s]\nport = -1")
    assert info.value.key == "c2s.port"
    assert info.value.env_var is None


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ndomain = "example.org"\nport = = 3\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}:3:")
    assert "invalid TOML" in str(info.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file .*absent.toml"):
        load_config(tmp_path / "absent.toml", env={})


# ---------------------------------------------------------------------- environment overrides


def test_env_overrides_the_file(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[c2s]\nport = 5222\n",
        env={
            "NATTERD_C2S__PORT": "5300",
            "NATTERD_C2S__HOST": "127.0.0.1",
            "NATTERD_C2S__REQUIRE_TLS": "false",
            "NATTERD_TLS__MIN_VERSION": "1.3",  # a TOML float, but the key wants a string
            "NATTERD_SERVER__DOMAIN": "example.net",
            "NATTERD_AUTH__MECHANISMS": '["SCRAM-SHA-256", "PLAIN"]',
            "NATTERD_MODULES__REGISTER__ENABLED": "true",
            "NATTERD_CONFIG": "ignored here: a path was given",
            "NATTERD_SOMETHING_ELSE": "ignored: not SECTION__KEY",
        },
    )
    assert config.c2s.port == 5300
    assert config.c2s.host == ("127.0.0.1",)
    assert config.c2s.require_tls is False
    assert config.tls.min_version == "1.3"
    assert config.domain == "example.net"
    assert config.auth.mechanisms == ("SCRAM-SHA-256", "PLAIN")
    assert config.modules == {"register": {"enabled": True}}
    assert config.env_keys["c2s.port"] == "NATTERD_C2S__PORT"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"NATTERD_C2S__PORT": "abc"},
            "c2s.port (from environment variable NATTERD_C2S__PORT): "
            'expected an integer between 0 and 65535, got "abc"',
        ),
        (
            {"NATTERD_C2S__PROT": "1"},
            "c2s.prot (from environment variable NATTERD_C2S__PROT): unknown key",
        ),
        (
            {"NATTERD_AUTH__MECHANISMS": '["X"]'},
            "auth.mechanisms[0] (from environment variable NATTERD_AUTH__MECHANISMS): expected",
        ),
        ({"NATTERD_COLOUR__X": "1"}, "NATTERD_COLOUR__X: unknown section 'colour'"),
        ({"NATTERD_C2S__PORT__X": "1"}, "NATTERD_C2S__PORT__X: expected NATTERD_C2S__<KEY>"),
        ({"NATTERD_C2S__": "1"}, "NATTERD_C2S__: expected NATTERD_<SECTION>__<KEY>"),
    ],
)
def test_env_errors_name_the_variable(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "", env=env)
    assert str(info.value).startswith(message)


def test_env_cannot_descend_into_a_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NATTERD_MODULES__PING__X: cannot set"):
        load_text(tmp_path, "[modules]\nping = 1\n", env={"NATTERD_MODULES__PING__X": "1"})


def test_explain_names_the_variable_for_later_errors(tmp_path: Path) -> None:
    config = load_text(tmp_path, "", env={"NATTERD_MODULES__PING__INTERVAL": "-5"})
    error = config.explain(ConfigError("expected an integer >= 1, got -5", "modules.ping.interval"))
    assert str(error) == (
        "modules.ping.interval (from environment variable NATTERD_MODULES__PING__INTERVAL): "
        "expected an integer >= 1, got -5"
    )


# ------------------------------------------------------------------------------ parse_options


@dataclass(frozen=True)
class Inner:
    name: str


@dataclass(frozen=True)
class SampleOptions:
    max_results: int = field(default=50, metadata={"min": 1, "max": 500})
    ratio: float = 0.5
    enabled: bool = True
    mode: Literal["always", "never", "roster"] = "roster"
    tags: list[str] = field(default_factory=list)
    servers: tuple[str, ...] = ()
    note: str | None = None
    inner: Inner | None = None
    limits: dict[str, int] = field(default_factory=dict)
    shout: str = field(default="", metadata={"check": lambda v: v.upper()})


def test_parse_options_builds_the_dataclass() -> None:
    options = parse_options(
        SampleOptions,
        {
            "max_results": 10,
            "ratio": 1,
            "enabled": False,
            "mode": "always",
            "tags": ["a", "b"],
            "servers": ["x"],
            "note": "hi",
            "inner": {"name": "n"},
            "limits": {"a": 1},
            "shout": "hey",
        },
        "modules.sample",
    )
    assert options == SampleOptions(
        10, 1.0, False, "always", ["a", "b"], ("x",), "hi", Inner("n"), {"a": 1}, "HEY"
    )
    assert isinstance(options.ratio, float)
    assert parse_options(SampleOptions, {}, "modules.sample") == SampleOptions()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_results": 0}, "modules.sample.max_results: expected an integer between 1 and 500"),
        ({"ratio": "1"}, 'modules.sample.ratio: expected a number, got "1"'),
        ({"mode": "sometimes"}, 'modules.sample.mode: expected one of "always", "never"'),
        ({"tags": "a"}, 'modules.sample.tags: expected a list of strings, got "a"'),
        ({"servers": ["x", 2]}, "modules.sample.servers[1]: expected a string, got 2"),
        ({"note": 3}, "modules.sample.note: expected a string, got 3"),
        ({"inner": {}}, "modules.sample.inner.name: missing required key"),
        (
            {"inner": {"name": "n", "x": 1}},
            "modules.sample.inner.x: unknown key (known keys: name)",
        ),
        ({"limits": {"a": "b"}}, 'modules.sample.limits.a: expected an integer, got "b"'),
        ({"colour": 1}, "modules.sample.colour: unknown key (known keys: enabled, inner, limits,"),
    ],
)
def test_parse_options_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_options(SampleOptions, data, "modules.sample")
    assert str(info.value).startswith(message)


def test_parse_options_rejects_a_non_table() -> None:
    with pytest.raises(ConfigError, match=r"^modules.sample: expected a table, got 5$"):
        parse_options(SampleOptions, 5, "modules.sample")  # type: ignore[arg-type]


def test_section_defaults_round_trip_through_parse_options() -> None:
    for name, cls in SECTIONS.items():
        defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
        assert parse_options(cls, plain, name) == cls()


# ------------------------------------------------------------------------- shipped TOML files


def test_example_file_documents_every_key_with_its_default() -> None:
    example = DEPLOY / "natterd.example.toml"
    load_config(example, env={})  # loads cleanly
    raw = tomllib.loads(example.read_text(encoding="utf-8"))
    assert set(raw) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        keys = {f.name for f in dataclasses.fields(cls)}
        assert set(raw[name]) == keys, name
        assert parse_options(cls, raw[name], name) == cls(), f"[{name}] values are not defaults"
    lines = [ln for ln in example.read_text().splitlines() if "=" in ln and not ln.startswith("#")]
    for line in lines:
        assert "#" in line.split("=", 1)[1], f"no comment on: {line}"


_COMMENTED_MODULE_LINE = re.compile(r"^# (\[modules\.[a-z_]+\]|[a-z_]+ = \S+)(\s+#.*)?$")


def test_example_file_documents_every_module_option() -> None:
    """The commented [modules.*] tables, uncommented, are valid and cover every option."""
    registry = pytest.importorskip("xmpp_server.modules")
    modules = getattr(registry, "MODULES", None)
    if modules is None:
        pytest.skip("no module registry yet")
    text = (DEPLOY / "natterd.example.toml").read_text(encoding="utf-8")
    lines = [m[1] for ln in text.splitlines() if (m := _COMMENTED_MODULE_LINE.match(ln))]
    documented = tomllib.loads("\n".join(lines))["modules"]
    assert set(documented) == set(modules)
    for name, cls in modules.items():
        options = {f.name for f in dataclasses.fields(cls.options_class)}
        assert set(documented[name]) == {"enabled", *options}, name
        assert documented[name]["enabled"] is cls.enabled_by_default, name
        defaults = dict(documented[name])
        del defaults["enabled"]
        parsed = parse_options(cls.options_class, defaults, f"modules.{name}")
        assert parsed == cls.options_class(), f"[modules.{name}] values are not defaults"


def test_demo_file_loads() -> None:
    config = load_config(DEPLOY / "natterd.demo.toml", env={})
    assert config.domain == "localhost"
    assert config.data_dir == DEPLOY.parent / "data"
    assert config.c2s.host == ("127.0.0.1",)
    assert (config.c2s.port, config.c2s.direct_tls_port) == (5222, 5223)


def test_auth_defaults_list_every_mechanism() -> None:
    assert set(AuthConfig().mechanisms) == set(config_module.MECHANISMS)
