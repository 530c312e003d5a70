"""Settings: defaults, TOML and environment overrides, errors that name the key, the example file."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from appliance.config import (
    DEFAULT_CONFIG_PATH,
    ENV_ALIASES,
    ConfigError,
    ServerSettings,
    Settings,
    config_path,
    env_name,
    iter_keys,
    load_settings,
    redacted,
)
from appliance.reference import EXAMPLE_UNSET
from tests.harness import to_toml

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "appliance.example.toml"
KEYS = [key for key, _, _ in iter_keys()]

#: Valid non-default values for string keys whose validation restricts them.
STRING_SAMPLES = {
    "service_name": "notes-prod",
    "version": "9.8.7",
    "user": "someone",
    "http.host": "127.0.0.1",
    "workers.host": "127.0.0.2",
    "admin.host": "::1",
    "mcp.app": "mypkg.server:mcp",
    "mcp.path": "/agents/mcp",
    "node.peer_address": "app-{ordinal}.app-peers.ns.svc.cluster.local:8080",
    "auth.api_key_header": "X-Agent-Key",
    "auth.resource_url": "https://mcp.example.com/mcp",
    "state.keys_file": "/etc/mcp-appliance/secrets/request-state.keys",
    "tracing.headers_file": "/etc/mcp-appliance/otlp-headers",
}
#: Valid non-default values for number keys whose validation restricts them.
FLOAT_SAMPLES = {"tracing.sample_ratio": 0.25}

#: Valid non-default values for list keys whose validation restricts them.
LIST_SAMPLES = {
    "node.peers": ["10.0.0.1:80", "[fd00::2]:8080", "app-2.example.internal:80"],
    "node.resolver": ["10.96.0.10", "127.0.0.1:5353"],
    "http.trusted_proxies": ["10.0.0.0/8", "fd00::/8"],
    "limits.exempt": ["192.0.2.7"],
    "metrics.allow_from": ["127.0.0.1", "10.1.0.0/16"],
    "policy.rules": ["tool:delete_* = notes:write notes:admin", "resource:notes://* = notes:read"],
}


def default_of(key: str) -> Any:
    value: Any = Settings()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def get(settings: Settings, key: str) -> Any:
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


def sample(key: str, hint: Any) -> Any:
    """A valid value different from the default, as Python (TOML-able) data."""
    default = default_of(key)
    if typing.get_origin(hint) is Literal:
        return next(a for a in typing.get_args(hint) if a != default)
    if typing.get_origin(hint) is tuple:
        return LIST_SAMPLES.get(key, ["mcp.example.com", "mcp.example.com:*"])
    if hint is bool:
        return not default
    if hint is int:
        return default + 1  # stays valid for every integer key (ports, counts, limits)
    if hint is float:
        return FLOAT_SAMPLES.get(key, default + 0.5)
    if hint is Path:
        return f"/srv/appliance-test/{key}"
    if hint is str:
        return STRING_SAMPLES.get(key, f"{default}-x")
    raise AssertionError(f"no sample for {key}: {hint}")


def as_env(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def nested(key: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": v}} for "a.b"."""
    head, _, rest = key.partition(".")
    return {head: nested(rest, value) if rest else value}


def expected(key: str, hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) is tuple:
        return tuple(value)
    if hint is Path:
        return Path(value)
    return value


def load(tmp_path: Path, data: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "appliance.toml"
    if data is not None:
        path.write_text(to_toml(data))
    return load_settings(path, environ or {})


def test_missing_file_means_built_in_defaults(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "absent.toml", {})
    assert settings == Settings()
    assert settings.source == "built-in defaults"
    assert settings.http.port == 80 and settings.workers.count == 2
    assert settings.mcp.app == "appliance.servers.notes:server"


def test_config_path_prefers_flag_then_environment_then_default() -> None:
    assert config_path("/a.toml", {"MCP_APPLIANCE_CONFIG": "/b.toml"}) == Path("/a.toml")
    assert config_path(None, {"MCP_APPLIANCE_CONFIG": "/b.toml"}) == Path("/b.toml")
    assert config_path(None, {}) == DEFAULT_CONFIG_PATH


@pytest.mark.parametrize(("key", "hint"), [(k, h) for k, _, h in iter_keys()], ids=KEYS)
def test_every_key_is_overridable_by_toml(tmp_path: Path, key: str, hint: Any) -> None:
    value = sample(key, hint)
    settings = load(tmp_path, nested(key, value))
    assert get(settings, key) == expected(key, hint, value)
    assert type(get(settings, key)) is type(expected(key, hint, value))
    assert settings.source == str(tmp_path / "appliance.toml")


@pytest.mark.parametrize(("key", "hint"), [(k, h) for k, _, h in iter_keys()], ids=KEYS)
def test_every_key_is_overridable_by_environment(tmp_path: Path, key: str, hint: Any) -> None:
    value = sample(key, hint)
    settings = load(tmp_path, environ={env_name(key): as_env(value)})
    assert get(settings, key) == expected(key, hint, value)
    assert type(get(settings, key)) is type(expected(key, hint, value))
    assert settings.source.endswith("+ environment")


def test_environment_wins_over_toml(tmp_path: Path) -> None:
    settings = load(tmp_path, {"workers": {"count": 3}}, {"MCP_APPLIANCE_WORKERS_COUNT": "5"})
    assert settings.workers.count == 5


def test_env_booleans_and_lists_are_parsed(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"MCP_APPLIANCE_MCP_SESSIONS": "off",
                                       "MCP_APPLIANCE_MCP_ALLOWED_ORIGINS": " https://a.example , https://b.example ,"})
    assert settings.mcp.sessions is False
    assert settings.mcp.allowed_origins == ("https://a.example", "https://b.example")


def bad_value(hint: Any) -> Any:
    """A TOML value of the wrong type for `hint`."""
    if hint in (int, float):
        return "many"
    if hint is bool:
        return "yes"
    return 5  # strings, paths, literals and lists all reject a number


@pytest.mark.parametrize(("key", "hint"), [(k, h) for k, _, h in iter_keys()], ids=KEYS)
def test_bad_toml_value_names_the_key(tmp_path: Path, key: str, hint: Any) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, nested(key, bad_value(hint)))
    assert f"'{key}'" in str(err.value)
    assert "expected" in str(err.value)


@pytest.mark.parametrize(
    ("key", "text"),
    [("workers.count", "three"), ("http.port", "80x"), ("mcp.sessions", "maybe"), ("health.probe_timeout", "soon"),
     ("environment", "prod"), ("log_level", "loud")],
)
def test_bad_env_value_names_the_variable_and_key(tmp_path: Path, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, environ={env_name(key): text})
    assert env_name(key) in str(err.value) and f"'{key}'" in str(err.value)


def test_literal_value_outside_the_choices_lists_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'environment' = 'prod' is invalid: expected one of 'development'"):
        load(tmp_path, {"environment": "prod"})


def test_json_response_takes_auto_or_a_boolean_and_nothing_that_only_equals_one(tmp_path: Path) -> None:
    assert load(tmp_path).mcp.json_response == "auto"
    assert load(tmp_path, {"mcp": {"json_response": True}}).mcp.json_response is True
    assert load(tmp_path, environ={"MCP_APPLIANCE_MCP_JSON_RESPONSE": "off"}).mcp.json_response is False
    assert load(tmp_path, environ={"MCP_APPLIANCE_MCP_JSON_RESPONSE": "auto"}).mcp.json_response == "auto"
    with pytest.raises(ConfigError, match="'mcp.json_response' = 1 is invalid: expected one of 'auto', true, false"):
        load(tmp_path, {"mcp": {"json_response": 1}})
    with pytest.raises(ConfigError, match="MCP_APPLIANCE_MCP_JSON_RESPONSE: 'mcp.json_response' = 'sometimes' is invalid"):
        load(tmp_path, environ={"MCP_APPLIANCE_MCP_JSON_RESPONSE": "sometimes"})


def test_booleans_are_not_integers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'workers.count'"):
        load(tmp_path, {"workers": {"count": True}})


@pytest.mark.parametrize(
    ("data", "named"),
    [({"colour": "blue"}, "'colour'"), ({"workers": {"cuont": 3}}, "'workers.cuont'"),
     ({"http": {"port": 8080, "tls": True}}, "'http.tls'"), ({"mcp": "notes"}, "'mcp'")],
)
def test_unknown_or_misplaced_keys_are_errors(tmp_path: Path, data: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(tmp_path, data)


def test_unknown_appliance_environment_variable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MCP_APPLIANCE_WORKERS_CUONT"):
        load(tmp_path, environ={"MCP_APPLIANCE_WORKERS_CUONT": "3"})
    # The config-path variable is not a setting, and foreign variables are ignored.
    assert load(tmp_path, environ={"MCP_APPLIANCE_CONFIG": "/x.toml", "HOME": "/root"}) == Settings()


def test_invalid_toml_syntax_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text("[workers\ncount = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, {})


@pytest.mark.parametrize(
    ("alias", "text", "key", "value"),
    [("ENVIRONMENT", "staging", "environment", "staging"),  # production also needs auth (test_auth.py)
     ("SERVICE_NAME", "notes-eu", "service_name", "notes-eu"),
     ("VERSION", "2025.11.1", "version", "2025.11.1"),
     ("LOG_LEVEL", "debug", "log_level", "debug"),
     ("MCP_HOST", "127.0.0.1", "http.host", "127.0.0.1"),
     ("MCP_PORT", "8080", "http.port", 8080)],
)
def test_seed_environment_names_still_work(tmp_path: Path, alias: str, text: str, key: str, value: Any) -> None:
    assert ENV_ALIASES[alias] == key
    assert get(load(tmp_path, environ={alias: text}), key) == value


def test_appliance_variable_wins_over_seed_alias(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"MCP_PORT": "8080", "MCP_APPLIANCE_HTTP_PORT": "8081"})
    assert settings.http.port == 8081


@pytest.mark.parametrize(
    ("data", "both"),
    [({"http": {"port": 9000}}, ("http.port", "admin.port")),
     ({"admin": {"port": 9101}}, ("admin.port", "worker 1")),
     ({"http": {"port": 9100}, "admin": {"port": 8999}}, ("http.port", "worker 0"))],
)
def test_port_clash_names_both_keys(tmp_path: Path, data: dict[str, Any], both: tuple[str, str]) -> None:
    with pytest.raises(ConfigError, match="port clash") as err:
        load(tmp_path, data)
    for name in both:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [({"workers": {"host": "0.0.0.0"}}, "workers.host"),
     ({"admin": {"host": "10.0.0.1"}}, "admin.host"),
     ({"workers": {"count": 0}}, "workers.count"),
     ({"workers": {"count": 2}, "health": {"min_ready_workers": 3}}, "health.min_ready_workers"),
     ({"mcp": {"app": "no colon"}}, "mcp.app"),
     ({"mcp": {"path": "/health"}}, "mcp.path"),
     ({"http": {"port": 70000}}, "http.port"),
     ({"http": {"host": "example.com"}}, "http.host"),
     ({"data_dir": "relative/dir"}, "data_dir"),
     ({"tracing": {"endpoint": "127.0.0.1:4318"}}, "tracing.endpoint"),
     ({"tracing": {"endpoint": "grpc://collector:4317"}}, "tracing.endpoint"),
     ({"tracing": {"endpoint": "http://collector:99999/v1/traces"}}, "tracing.endpoint"),
     ({"tracing": {"sample_ratio": 1.5}}, "tracing.sample_ratio"),
     ({"tracing": {"sample_ratio": -0.1}}, "tracing.sample_ratio"),
     ({"tracing": {"queue_size": 0}}, "tracing.queue_size"),
     ({"tracing": {"headers_file": "otlp-headers"}}, "tracing.headers_file")],
)
def test_cross_field_checks_name_the_key(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load(tmp_path, data)


def test_settings_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().workers.count = 5  # type: ignore[misc]


def test_redacted_settings_are_plain_json_and_complete() -> None:
    doc = redacted(Settings())
    json.dumps(doc)  # JSON-able as is
    for key in KEYS:
        value: Any = doc
        for part in key.split("."):
            value = value[part]
        plain = default_of(key)
        if value == "***":  # a secret (or the path of one): test_every_secret_setting_is_redacted
            continue
        assert value == (list(plain) if isinstance(plain, tuple) else str(plain) if isinstance(plain, Path) else plain)


def test_redaction_hides_secret_values_at_any_depth() -> None:
    @dataclasses.dataclass(frozen=True)
    class Auth:
        token: str = "s3cret"
        token_file: str = ""  # empty: nothing to hide, and showing it unset helps the operator
        header: str = "Authorization"

    @dataclasses.dataclass(frozen=True)
    class WithSecrets:
        admin_token: str = "abc"
        db_password: str = "hunter2"
        auth: Auth = dataclasses.field(default_factory=Auth)

    doc = redacted(WithSecrets())  # type: ignore[arg-type]
    assert doc == {"admin_token": "***", "db_password": "***",
                   "auth": {"token": "***", "token_file": "", "header": "Authorization"}}
    assert "s3cret" not in json.dumps(doc) and "hunter2" not in json.dumps(doc)


def test_every_secret_setting_is_redacted(tmp_path: Path) -> None:
    """Keys that hold secrets (by name) never show their value in /config."""
    secret_keys = [k for k, _, h in iter_keys() if h is str and any(w in k for w in ("token", "secret", "password"))]
    if not secret_keys:
        pytest.skip("no secret-holding string settings defined yet")
    environ = {env_name(k): "do-not-show-me" for k in secret_keys}
    assert "do-not-show-me" not in json.dumps(redacted(load(tmp_path, environ=environ)))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def test_example_config_lists_exactly_every_key() -> None:
    text = EXAMPLE.read_text()
    keys = list(flatten(tomllib.loads(text)))
    assert sorted(keys) == sorted(set(KEYS) - set(EXAMPLE_UNSET)), \
        "conf/appliance.example.toml must show every key of Settings, no others"
    for key in EXAMPLE_UNSET:  # shown commented out, with its value today
        assert f"\n# {key.rsplit('.', 1)[-1]} = " in text, key


def test_example_config_loads_and_shows_the_defaults() -> None:
    settings = load_settings(EXAMPLE, {})
    for key in KEYS:
        assert get(settings, key) == default_of(key), f"{key} in the example differs from the default"


def test_example_config_comments_every_key() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            above = lines[i - 1]
            # A key is commented directly above, or shares the comment of the key just above it.
            assert above.startswith("#") or ("=" in above and not above.startswith("#")), f"no comment for: {line}"


@pytest.mark.parametrize(
    ("workers", "named"),
    [({"hang_timeout": 1}, "'workers.hang_timeout' = 1.0 is invalid: expected seconds from 2"),
     ({"hang_timeout": 7200}, "'workers.hang_timeout'"),
     ({"read_timeout": 0}, "'workers.read_timeout' = 0 is invalid"),
     ({"read_timeout": 7200}, r"expected seconds from 1 to http.read_timeout \(3600\)")],
)
def test_watchdog_and_read_retry_timeouts_are_bounded(tmp_path: Path, workers: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(tmp_path, {"workers": workers})


@pytest.mark.parametrize("count", [-1, 1025])
def test_a_negative_or_huge_nginx_worker_count_names_the_key(tmp_path: Path, count: int) -> None:
    with pytest.raises(ConfigError, match=rf"'http.nginx_workers' = {count} is invalid: expected 0 \(one per 4 CPUs\)"):
        load(tmp_path, {"http": {"nginx_workers": count}})


CALC = {"app": "tests.integration.calc_server:server"}


def test_server_tables_load_in_file_order_after_the_mcp_server(tmp_path: Path) -> None:
    settings = load(tmp_path, {"mcp": {"json_response": True}, "servers": {
        "calc": {**CALC, "policy_rules": ["tool:add = calc:use"], "policy_default": "deny"},
        "files": {"command": ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/files"],
                  "path": "/files/mcp", "isolation": "session", "max_children": 4, "json_response": False,
                  "env": {"LOG_LEVEL": "info"}, "env_files": {"GITHUB_TOKEN": "/etc/secrets/github"}}}})
    default, calc, files = settings.hosted_servers
    assert (default.name, default.path, default.kind, default.app) == ("default", "/mcp", "app", settings.mcp.app)
    assert [s.name for s in settings.servers] == ["calc", "files"]
    # Absent keys: the derived path, and the [mcp] answer mode.
    assert (calc.path, calc.kind, calc.json_response, calc.sessions) == ("/servers/calc/mcp", "app", True, True)
    assert (files.path, files.kind, files.isolation, files.max_children, files.json_response) == (
        "/files/mcp", "command", "session", 4, False)
    assert files.command == ("npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/files")
    assert files.env == (("LOG_LEVEL", "info"),) and files.env_files == (("GITHUB_TOKEN", "/etc/secrets/github"),)


def test_a_server_policy_falls_back_to_the_policy_section_key_by_key(tmp_path: Path) -> None:
    settings = load(tmp_path, {"policy": {"default": "deny"}, "servers": {
        "calc": {**CALC, "policy_rules": ["tool:add = calc:use"]}, "other": {"app": "mypkg.other:server"}}})
    default, calc, other = settings.hosted_servers
    assert default.policy(settings.policy) == settings.policy
    assert calc.policy(settings.policy).rules == ("tool:add = calc:use",)
    assert calc.policy(settings.policy).default == "deny"  # not set for calc: [policy]'s
    assert other.policy(settings.policy) == settings.policy


@pytest.mark.parametrize(
    ("servers", "named"),
    [({"calc": {**CALC, "colour": "blue"}}, "'servers.calc.colour'"),
     ({"calc": {}}, "'servers.calc.command'"),
     ({"calc": {**CALC, "command": ["calc"]}}, "'servers.calc.command'"),
     ({"calc": {"command": []}}, "'servers.calc.command'"),
     ({"calc": {"command": "npx server"}}, "'servers.calc.command'"),
     ({"calc": {**CALC, "path": "/mcp"}}, "'servers.calc.path'"),
     ({"calc": {**CALC, "path": "/mcp/calc"}}, "'servers.calc.path'"),
     ({"calc": {**CALC, "path": "/x"}, "two": {"app": "mypkg.two:server", "path": "/x"}}, "'servers.two.path'"),
     ({"calc": {**CALC, "path": "/health"}}, "'servers.calc.path'"),
     ({"calc": {**CALC, "path": "/admin/calc"}}, "'servers.calc.path'"),
     ({"calc": {**CALC, "path": "/_appliance/health"}}, "'servers.calc.path'"),
     ({"calc": {**CALC, "path": "/metrics"}}, "'servers.calc.path'"),
     ({"calc": {**CALC, "path": "/config"}}, "'servers.calc.path'"),
     ({"calc": {**CALC, "path": "no-slash"}}, "'servers.calc.path'"),
     ({"calc": {**CALC, "path": "/a b"}}, "'servers.calc.path'"),
     ({"Calc": CALC}, r"'\[servers.Calc\]'"),
     ({"-calc": CALC}, r"'\[servers.-calc\]'"),
     ({"default": CALC}, r"'\[servers.default\]'"),
     ({"calc": "app"}, "'servers.calc'"),
     ({"calc": {**CALC, "isolation": "session"}}, "'servers.calc.isolation'"),
     ({"calc": {**CALC, "env": {"A": "1"}}}, "'servers.calc.env'"),
     ({"calc": {"command": ["x"], "isolation": "per-call"}}, "'servers.calc.isolation'"),
     ({"calc": {"command": ["x"], "max_children": 0}}, "'servers.calc.max_children'"),
     ({"calc": {"command": ["x"], "env": {"A": 1}}}, "'servers.calc.env'"),
     ({"calc": {"command": ["x"], "env_files": {"TOKEN": "relative/file"}}}, "'servers.calc.env_files.TOKEN'"),
     ({"calc": {"command": ["x"], "cwd": "relative"}}, "'servers.calc.cwd'"),
     ({"calc": {**CALC, "json_response": "yes"}}, "'servers.calc.json_response'"),
     ({"calc": {**CALC, "policy_rules": ["add needs calc:use"]}}, r"'servers.calc.policy_rules\[0\]'"),
     ({"calc": {**CALC, "policy_default": "maybe"}}, "'servers.calc.policy_default'"),
     ({"calc": {"app": "appliance.servers.notes:server"}}, "'servers.calc.app'"),
     ({"calc": {"app": "no colon"}}, "'servers.calc.app'"),
     ({"calc": {**CALC, "rate": -1}}, "'servers.calc.rate' = -1 is invalid"),
     ({"calc": {**CALC, "burst": "many"}}, "'servers.calc.burst'"),
     ({"calc": {**CALC, "max_sessions": 0}}, "'servers.calc.max_sessions' = 0 is invalid"),
     ({"calc": {**CALC, "max_sessions_per_principal": -2}}, "'servers.calc.max_sessions_per_principal' = -2"),
     ({"calc": {**CALC, "max_sessions_per_principal": 1.5}}, "'servers.calc.max_sessions_per_principal'")],
)
def test_bad_server_tables_name_the_key(tmp_path: Path, servers: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(tmp_path, {"servers": servers})


def test_redacted_servers_show_where_secrets_come_from_never_what_they_are(tmp_path: Path) -> None:
    settings = load(tmp_path, {"servers": {"gh": {"command": ["github-mcp"], "env": {
        "GITHUB_TOKEN": "ghp_do-not-show-me", "API_KEY": "do-not-show-me-2", "LOG_LEVEL": "debug"},
        "env_files": {"GITHUB_PAT": "/etc/secrets/github"}}}})
    doc = redacted(settings)
    text = json.dumps(doc)
    assert "do-not-show-me" not in text
    (gh,) = doc["servers"]
    assert gh["env"]["LOG_LEVEL"] == "debug" and gh["env_files"] == {"GITHUB_PAT": "/etc/secrets/github"}


def test_the_readmes_server_tables_are_valid_settings(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Several servers in one appliance", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "appliance.toml"
    path.write_text(block)
    calc, files = load_settings(path, {}).servers
    assert (calc.path, calc.kind, files.path, files.kind) == ("/servers/calc/mcp", "app", "/servers/files/mcp", "command")


def test_the_examples_commented_server_table_is_valid_once_uncommented(tmp_path: Path) -> None:
    block = EXAMPLE.read_text().split("# [servers.calc]", 1)[1]
    text = "[servers.calc]" + "".join("\n" + line.removeprefix("# ") for line in block.splitlines())
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    (calc,) = load_settings(path, {}).servers
    assert (calc.app, calc.path, calc.policy_rules) == ("mypkg.calc:server", "/servers/calc/mcp", ("tool:add = calc:use",))
    # Every key a server table takes is shown (a stdio server's commented twice, as the alternative to app).
    shown = {line.lstrip("# ").split(" = ", 1)[0] for line in block.splitlines() if " = " in line}
    assert shown == {f.name for f in dataclasses.fields(ServerSettings)} - {"name"}
