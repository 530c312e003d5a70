"""systemd/mcp-appliance.service: valid for systemd, and consistent with the appliance's settings."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest

from appliance import toolchain
from appliance.config import Settings
from tests.deploy.deploy_tools import require_tool

pytestmark = pytest.mark.deploy

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "mcp-appliance.service"
INSTALLED_CLI = "/opt/mcp-appliance/bin/mcp-appliance"


def unit_options() -> dict[str, dict[str, str]]:
    """The unit's sections and keys (the unit uses no repeated keys, so a dict is enough)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return {section: dict(parser[section]) for section in parser.sections()}


def test_unit_passes_systemd_analyze_verify_without_warnings(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "Debian package systemd")
    # The CLI is installed under /opt/mcp-appliance only on an appliance host, and verify
    # refuses an ExecStart= binary that does not exist. So we verify a copy in which that
    # one path is replaced by an executable that exists here; nothing else changes.
    text = UNIT.read_text()
    assert text.count(INSTALLED_CLI) == 2  # ExecStart and ExecReload
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_CLI, "/usr/bin/true"))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on an unknown key and only warns: the warnings are the verdict.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_unit_runs_and_reloads_through_the_installed_cli() -> None:
    service = unit_options()["Service"]
    assert service["ExecStart"] == f"{INSTALLED_CLI} run"
    assert service["ExecReload"] == f"{INSTALLED_CLI} reload"
    # supervisord (exec'd by `run`) stays in the foreground as the main process.
    assert service["Type"] in {"simple", "exec"}
    assert service["Restart"] == "on-failure"
    unit = unit_options()["Unit"]
    assert int(unit["StartLimitBurst"]) >= 1 and int(unit["StartLimitIntervalSec"]) > 0


def test_only_the_appliance_directories_are_writable() -> None:
    service = unit_options()["Service"]
    defaults = Settings()
    assert service["ProtectSystem"] == "strict"
    assert "ReadWritePaths" not in service  # the three directories below are writable by systemd's own rule
    assert Path("/run") / service["RuntimeDirectory"] == defaults.run_dir
    assert Path("/var/lib") / service["StateDirectory"] == defaults.data_dir
    assert Path("/var/log") / service["LogsDirectory"] == defaults.log_dir
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key


def test_runs_as_the_service_user_with_only_the_capability_to_bind_port_80() -> None:
    """No root, so nothing to drop: supervisord, nginx and the workers all run as the service
    user (the one appliance.toml names), and only binding a port below 1024 needs a capability."""
    service = unit_options()["Service"]
    assert service["User"] == service["Group"] == Settings().user
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert int(service["LimitNOFILE"]) >= 65536


def test_stop_bound_covers_supervisords_graceful_stop() -> None:
    """KillMode=mixed sends SIGTERM to supervisord alone; it stops nginx (QUIT) and then the
    workers, each allowed workers.graceful_timeout + 5 s, the admin app 10 s. The unit must
    wait for all of that before it kills what is left."""
    service = unit_options()["Service"]
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    per_program = Settings().workers.graceful_timeout + 5
    needed = 2 * per_program + 10
    stop = service["TimeoutStopSec"]
    assert re.fullmatch(r"\d+", stop), stop
    assert needed < int(stop) <= 300, (needed, stop)


def test_stdio_servers_caches_and_jit_are_not_blocked_by_the_sandbox() -> None:
    """Workers run npx and uvx with HOME and every cache under data_dir (appliance/toolchain.py):
    that is the StateDirectory, writable under ProtectSystem=strict, and not under ProtectHome.
    Node.js compiles JavaScript into W+X pages, which MemoryDenyWriteExecute would forbid."""
    service = unit_options()["Service"]
    data_dir = Path("/var/lib") / service["StateDirectory"]
    environment = toolchain.runner_environment(data_dir)
    for name, value in environment.items():
        if value.startswith("/") and name != "NODE_EXTRA_CA_CERTS":
            assert Path(value).is_relative_to(data_dir), (name, value)
            assert not Path(value).is_relative_to("/home") and not Path(value).is_relative_to("/root"), (name, value)
    assert service.get("MemoryDenyWriteExecute", "no") == "no"
    assert "PATH=" not in service.get("Environment", "")  # systemd's PATH reaches node in /usr/bin
