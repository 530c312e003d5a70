"""The one settings object: `appliance.toml` plus environment overrides, validated once.

Everything the appliance does is derived from a `Settings` value produced by
`load_settings`. Nothing else in the package reads the environment or the TOML file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance import __version__

DEFAULT_CONFIG_PATH = Path("/etc/mcp-appliance/appliance.toml")
ENV_PREFIX = "MCP_APPLIANCE_"
#: Environment variables that the appliance itself sets or reads outside the key mapping.
ENV_RESERVED = frozenset({"MCP_APPLIANCE_CONFIG"})

Environment = Literal["development", "staging", "production"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(Exception):
    """An operator mistake in the configuration; the message names the key."""


@dataclass(frozen=True)
class HttpSettings:
    """The public listener: nginx."""

    host: str = "0.0.0.0"
    port: int = 80
    #: Largest request body nginx accepts, in bytes (413 beyond it).
    max_body_bytes: int = 4 * 1024 * 1024
    #: How long nginx waits for a worker's answer or the next SSE event, in seconds.
    read_timeout: int = 3600
    connect_timeout: int = 2
    #: Idle keepalive connections nginx keeps to each worker.
    upstream_keepalive: int = 64
    worker_connections: int = 4096


@dataclass(frozen=True)
class WorkersSettings:
    """The MCP worker processes (hypercorn, loopback only)."""

    count: int = 2
    host: str = "127.0.0.1"
    #: Worker K listens on base_port + K.
    base_port: int = 9100
    #: Seconds a stopping worker gives in-flight requests before it is killed.
    graceful_timeout: int = 20


@dataclass(frozen=True)
class AdminSettings:
    """The admin and health app (Starlette on hypercorn, loopback only)."""

    host: str = "127.0.0.1"
    port: int = 9000


@dataclass(frozen=True)
class McpSettings:
    """The hosted MCP app and its transport."""

    #: `module:attribute` naming an MCPServer or any Streamable HTTP ASGI app.
    app: str = "appliance.servers.notes:server"
    path: str = "/mcp"
    #: Legacy (2025-11-25 and earlier) sessions; false makes the legacy era stateless.
    sessions: bool = True
    json_response: bool = False
    session_idle_timeout: int = 1800
    max_sessions: int = 10000
    #: Body limit enforced inside the worker (nginx enforces http.max_body_bytes first).
    max_body_bytes: int = 4 * 1024 * 1024
    #: Host header values allowed (DNS-rebinding protection); "*" allows any,
    #: "name:*" any port of a name. A bad Host gets 421.
    allowed_hosts: tuple[str, ...] = ("*",)
    #: Origin header values allowed; requests without Origin always pass. A bad Origin gets 403.
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthSettings:
    """How the admin app judges readiness."""

    min_ready_workers: int = 1
    probe_timeout: float = 1.0


@dataclass(frozen=True)
class NodeSettings:
    """This host's place among peers (a StatefulSet pod ordinal on Kubernetes)."""

    ordinal: int = 0


@dataclass(frozen=True)
class Settings:
    """Every knob of the appliance."""

    service_name: str = "mcp-appliance"
    environment: Environment = "development"
    version: str = __version__
    log_level: LogLevel = "info"
    data_dir: Path = Path("/var/lib/mcp-appliance")
    log_dir: Path = Path("/var/log/mcp-appliance")
    run_dir: Path = Path("/run/mcp-appliance")
    #: Unprivileged user for every process but supervisord and the nginx master,
    #: applied only when the appliance starts as root.
    user: str = "mcp-appliance"
    #: "files": supervisord writes each process's output under log_dir and rotates it;
    #: "stdout": everything goes to supervisord's stdout (containers).
    log_target: Literal["files", "stdout"] = "files"
    #: Rotation of the files under log_dir (supervisord does it; no logrotate needed).
    log_max_bytes: int = 50 * 1024 * 1024
    log_backups: int = 5
    http: HttpSettings = field(default_factory=HttpSettings)
    workers: WorkersSettings = field(default_factory=WorkersSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    mcp: McpSettings = field(default_factory=McpSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    #: Where these settings came from, for error messages and rendered headers.
    source: str = field(default="built-in defaults", compare=False)

    def worker_port(self, index: int) -> int:
        """The loopback port of worker `index`."""
        return self.workers.base_port + index


#: The seed's environment names, kept working: name -> dotted key.
ENV_ALIASES: Mapping[str, str] = {
    "ENVIRONMENT": "environment",
    "SERVICE_NAME": "service_name",
    "VERSION": "version",
    "LOG_LEVEL": "log_level",
    "MCP_HOST": "http.host",
    "MCP_PORT": "http.port",
}


def env_name(key: str) -> str:
    """The MCP_APPLIANCE_* variable that overrides dotted `key`."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def iter_keys(cls: type = Settings, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """Every leaf key as (dotted key, field, resolved type), in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        hint = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(hint):
            yield from iter_keys(hint, key + ".")
        else:
            yield key, f, hint


def config_path(cli_path: str | None, environ: Mapping[str, str]) -> Path:
    """The config file to read: --config, then MCP_APPLIANCE_CONFIG, then the default."""
    return Path(cli_path or environ.get("MCP_APPLIANCE_CONFIG") or DEFAULT_CONFIG_PATH)


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (missing means defaults), apply the environment, validate."""
    environ = os.environ if environ is None else environ
    path = path or config_path(None, environ)
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        source = str(path)
    overrides = _env_overrides(environ)
    if overrides:
        source += " + environment"
    settings = _build(Settings, raw, overrides, "", str(path))
    settings = dataclasses.replace(settings, source=source)
    validate(settings)
    return settings


def _env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Dotted key -> raw string from the environment; unknown MCP_APPLIANCE_* names are errors."""
    by_env = {env_name(key): key for key, _, _ in iter_keys()}
    found: dict[str, str] = {}
    for name, key in ENV_ALIASES.items():
        if name in environ:
            found[key] = environ[name]
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        if name not in by_env:
            raise ConfigError(f"environment variable {name}: unknown setting (known: see README, e.g. {env_name('workers.count')})")
        found[by_env[name]] = value
    return found


def _build(cls: type, raw: Mapping[str, Any], env: Mapping[str, str], prefix: str, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for name in raw:
        if name not in names:
            where = f"[{prefix[:-1]}]" if prefix else "top level"
            raise ConfigError(f"{path}: unknown key '{prefix}{name}' ({where} knows: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        key = prefix + f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            section = raw.get(f.name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: '{key}' must be a table [{key}], got {type(section).__name__}")
            values[f.name] = _build(hint, section, env, key + ".", path)
        elif key in env:
            values[f.name] = _from_env(key, env[key], hint)
        elif f.name in raw:
            values[f.name] = _coerce(key, raw[f.name], hint, path)
    return cls(**values)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(hint, str(hint))


def _coerce(key: str, value: Any, hint: Any, path: str) -> Any:
    """A TOML value checked against the field's type."""
    bad = ConfigError(f"{path}: '{key}' = {value!r} is invalid: expected {_describe(hint)}")
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise bad
        return Path(value)
    raise TypeError(f"no coercion for {hint}")  # a programming error, not an operator's


def _from_env(key: str, text: str, hint: Any) -> Any:
    """An environment string parsed as the field's type."""
    name = env_name(key)
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError
            value: Any = lowered in {"1", "true", "yes", "on"}
        elif hint is int:
            value = int(text)
        elif hint is float:
            value = float(text)
        elif origin is tuple:
            value = [part.strip() for part in text.split(",") if part.strip()]
        else:
            value = text
    except ValueError:
        raise ConfigError(f"environment {name}={text!r} (key '{key}') is invalid: expected {_describe(hint)}") from None
    return _coerce(key, value, hint, f"environment {name}")


_APP_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def validate(settings: Settings) -> None:
    """Checks that span more than one value's type; raises ConfigError naming the key."""

    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{settings.source}: '{key}' = {value!r} is invalid: expected {expected}")

    for key, value in (("http.port", settings.http.port), ("admin.port", settings.admin.port)):
        need(1 <= value <= 65535, key, value, "a TCP port 1-65535")
    w = settings.workers
    need(1 <= w.count <= 64, "workers.count", w.count, "1 to 64 workers")
    need(1024 <= w.base_port and w.base_port + w.count - 1 <= 65535, "workers.base_port", w.base_port,
         "a port from 1024 leaving room for workers.count ports")
    need(_is_loopback(w.host), "workers.host", w.host, "a loopback address (workers are reached only through nginx)")
    need(_is_loopback(settings.admin.host), "admin.host", settings.admin.host, "a loopback address")
    need(w.graceful_timeout >= 0, "workers.graceful_timeout", w.graceful_timeout, "seconds >= 0")
    need(_is_address(settings.http.host), "http.host", settings.http.host, "an IP address to listen on, e.g. 0.0.0.0 or ::")
    for key in ("max_body_bytes", "read_timeout", "connect_timeout", "upstream_keepalive", "worker_connections"):
        value = getattr(settings.http, key)
        need(value > 0, f"http.{key}", value, "a positive integer")
    m = settings.mcp
    need(bool(_APP_SPEC.match(m.app)), "mcp.app", m.app, "'module:attribute', e.g. 'mypkg.server:mcp'")
    need(m.path.startswith("/") and " " not in m.path and m.path != "/", "mcp.path", m.path, "an absolute URL path such as /mcp")
    need(not m.path.startswith(("/health", "/admin", "/metrics", "/config", "/_appliance")), "mcp.path", m.path,
         "a path not used by the appliance itself")
    for key in ("session_idle_timeout", "max_sessions", "max_body_bytes"):
        value = getattr(m, key)
        need(value > 0, f"mcp.{key}", value, "a positive integer")
    need(1 <= settings.health.min_ready_workers <= w.count, "health.min_ready_workers",
         settings.health.min_ready_workers, f"1 to workers.count ({w.count})")
    need(settings.health.probe_timeout > 0, "health.probe_timeout", settings.health.probe_timeout, "seconds > 0")
    need(0 <= settings.node.ordinal <= 999, "node.ordinal", settings.node.ordinal, "0 to 999")
    need(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", settings.service_name)), "service_name", settings.service_name,
         "letters, digits, '.', '_' or '-'")
    need(settings.log_max_bytes >= 1024, "log_max_bytes", settings.log_max_bytes, "bytes >= 1024")
    need(settings.log_backups >= 0, "log_backups", settings.log_backups, "an integer >= 0")
    need(bool(re.fullmatch(r"[a-z_][a-z0-9_-]*", settings.user)), "user", settings.user, "a system user name")
    for key in ("data_dir", "log_dir", "run_dir"):
        value = getattr(settings, key)
        need(value.is_absolute(), key, str(value), "an absolute path")
    # nginx, the admin app and the workers all bind on this host: one port each.
    ports: dict[int, str] = {}
    claims = [("http.port", settings.http.port), ("admin.port", settings.admin.port)]
    claims += [(f"workers.base_port (worker {k})", settings.worker_port(k)) for k in range(w.count)]
    for key, port in claims:
        if port in ports:
            raise ConfigError(f"{settings.source}: port clash: '{key}' and '{ports[port]}' both use port {port}")
        ports[port] = key


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain JSON-able data, secrets replaced."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    data = plain(settings)
    return _redact(data)


_SECRET_WORDS = ("token", "secret", "password", "key_file", "private")


def _redact(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: ("***" if any(w in k for w in _SECRET_WORDS) and data[k] else _redact(v)) for k, v in data.items()}
    return data

