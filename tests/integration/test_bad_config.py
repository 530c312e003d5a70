"""Bad configuration: `check` and `run` exit non-zero with a message naming the problem, before starting anything."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.harness import Appliance, cleanup, new_appliance, to_toml

pytestmark = pytest.mark.integration


@pytest.fixture
def appliance() -> Iterator[Appliance]:
    """A config on free ports in a fresh directory; nothing is started by the fixture."""
    app = new_appliance(2)
    try:
        yield app
    finally:
        cleanup(app)


def cli(app: Appliance, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI; if it wrongly starts supervisord, kill its whole process group and fail."""
    app.config_path.write_text(to_toml(app.settings))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--config", str(app.config_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=app.base,
        env={**os.environ, **app.env, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"`mcp-appliance {' '.join(args)}` did not exit: it started despite the bad config")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_refused(app: Appliance, command: str, *needles: str, env: Mapping[str, str] | None = None) -> str:
    result = cli(app, command, env=env)
    assert result.returncode != 0, result
    message = result.stderr.strip()
    assert message.startswith("mcp-appliance: error:"), message
    assert "Traceback" not in message, message
    assert len(message.splitlines()) == 1, "one clear line, not a traceback"
    for needle in needles:
        assert needle in message, message
    # Nothing was started: no supervisord socket, no rendered supervisord.conf.
    assert not (app.run_dir / "supervisor.sock").exists()
    assert not (app.run_dir / "supervisord.conf").exists()
    return message


def set_key(app: Appliance, table: str | None, key: str, value: Any) -> None:
    if table is None:
        app.settings[key] = value
    else:
        app.settings.setdefault(table, {})[key] = value


BAD_FILES = [
    pytest.param(("workers", "cuont", 3), ("'workers.cuont'", "unknown key"), id="unknown-key"),
    pytest.param((None, "colour", "blue"), ("'colour'", "unknown key"), id="unknown-top-level-key"),
    pytest.param(("workers", "count", "three"), ("'workers.count'", "expected an integer"), id="bad-type"),
    pytest.param(("mcp", "sessions", "yes"), ("'mcp.sessions'", "true or false"), id="bad-bool"),
    pytest.param((None, "environment", "prod"), ("'environment'", "expected one of"), id="bad-choice"),
    pytest.param(("mcp", "app", "no_such_module:app"), ("mcp.app", "no_such_module"), id="unimportable-app"),
    pytest.param(("tracing", "endpoint", "collector:4318"), ("'tracing.endpoint'", "'collector:4318'", "http://"),
                 id="bad-tracing-endpoint"),
    pytest.param(("tracing", "sample_ratio", 2), ("'tracing.sample_ratio'", "2.0", "0 to 1"), id="bad-sample-ratio"),
    pytest.param(("mcp", "app", "appliance.servers.notes:no_such_server"), ("mcp.app", "no_such_server"),
                 id="missing-app-attribute"),
    pytest.param(("servers", "files", {"command": ["x"], "colour": "blue"}), ("'servers.files.colour'", "unknown key"),
                 id="unknown-server-key"),
    pytest.param(("servers", "files", {}), ("'servers.files.command'", "'servers.files.app'"), id="server-without-command"),
    pytest.param(("servers", "files", {"command": ["x"], "path": "/mcp"}), ("'servers.files.path'", "'mcp.path'"),
                 id="two-servers-on-one-path"),
    pytest.param(("servers", "files", {"command": ["x"], "path": "/health/files"}), ("'servers.files.path'",),
                 id="server-path-shadows-health"),
    pytest.param(("servers", "files", {"command": ["x"], "path": "/admin"}), ("'servers.files.path'",),
                 id="server-path-shadows-admin"),
    pytest.param(("servers", "Files", {"command": ["x"]}), ("'[servers.Files]'", "server name"), id="bad-server-name"),
    pytest.param(("servers", "calc", {"app": "tests.integration.calc_server:server", "isolation": "session"}),
                 ("'servers.calc.isolation'", "'servers.calc.command'"), id="isolation-without-command"),
    pytest.param(("servers", "calc", {"app": "no_such_module:server"}), ("servers.calc.app", "no_such_module"),
                 id="unimportable-server-app"),
    pytest.param(("servers", "files", {"command": ["x"], "env_files": {"TOKEN": "/nonexistent/token"}}),
                 ("servers.files.env_files.TOKEN", "/nonexistent/token"), id="missing-secret-file"),
]


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(("change", "needles"), BAD_FILES)
def test_bad_config_file_is_refused_before_anything_starts(
    appliance: Appliance, command: str, change: tuple[Any, ...], needles: tuple[str, ...],
) -> None:
    set_key(appliance, *change)
    assert_refused(appliance, command, *needles)


@pytest.mark.parametrize("command", ["check", "run"])
def test_an_unreadable_tracing_headers_file_is_refused(appliance: Appliance, command: str) -> None:
    appliance.settings["tracing"] = {"enabled": True, "headers_file": str(appliance.base / "no-such-headers")}
    assert_refused(appliance, command, "'tracing.headers_file'", "cannot be read")


@pytest.mark.parametrize("command", ["check", "run"])
def test_two_ports_equal_in_config_are_a_clash(appliance: Appliance, command: str) -> None:
    appliance.settings["admin"]["port"] = appliance.port
    assert_refused(appliance, command, "port clash", "'admin.port'", "'http.port'", str(appliance.port))


@pytest.mark.parametrize("command", ["check", "run"])
def test_unknown_appliance_environment_variable_is_refused(appliance: Appliance, command: str) -> None:
    assert_refused(appliance, command, "MCP_APPLIANCE_WORKERS_CUONT", env={"MCP_APPLIANCE_WORKERS_CUONT": "3"})


@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_environment_value_names_the_variable(appliance: Appliance, command: str) -> None:
    assert_refused(appliance, command, "MCP_APPLIANCE_HTTP_PORT", "'http.port'", env={"MCP_APPLIANCE_HTTP_PORT": "eighty"})


@pytest.mark.parametrize("which", ["http.port", "admin.port", "workers.base_port (worker 1)"])
def test_run_refuses_a_port_already_in_use(appliance: Appliance, which: str) -> None:
    ports = {"http.port": appliance.port, "admin.port": appliance.settings["admin"]["port"],
             "workers.base_port (worker 1)": appliance.settings["workers"]["base_port"] + 1}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[which]))
        taken.listen()
        assert_refused(appliance, "run", "port clash", f"'{which}'", str(ports[which]), "already in use")


def test_check_accepts_the_same_config_once_fixed(appliance: Appliance) -> None:
    """The refusals above are about the bad values, not the test setup."""
    result = cli(appliance, "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")
