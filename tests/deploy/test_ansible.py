"""ansible/site.yml and the mcp_appliance role: lint, and a real install on a booted Debian 12 host.

The booted-host tests share one guest (tests.deploy.guest: systemd-nspawn, systemd as
PID 1, the host's loopback network) and run in file order: install, look, run again,
change the config. The playbook is the one an operator runs; only the inventory written
here knows it is a test (the nsenter connection, loopback ports picked at run time).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from tests.deploy.deploy_tools import missing, require_root, require_tool, tools_env
from tests.harness import free_port_block, wait_until

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "mcp_appliance"
WORKERS = 2
#: What the test host needs before the first run: nothing that the role installs itself.
PLAYBOOK_TIMEOUT = 900


# --- Static checks ---------------------------------------------------------------------------


def test_role_passes_ansible_lint_production_profile() -> None:
    lint = require_tool("ansible-lint", "pip install ansible-lint into the tool venv")
    result = subprocess.run(
        [lint, "--profile", "production", "--offline", "site.yml", "roles/mcp_appliance"],
        cwd=ANSIBLE, capture_output=True, text=True, timeout=600, env=tools_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_site_yml_passes_syntax_check() -> None:
    playbook = require_tool("ansible-playbook", "pip install ansible into the tool venv")
    result = subprocess.run(
        [playbook, "--syntax-check", "-i", "inventory.example", "site.yml"],
        cwd=ANSIBLE, capture_output=True, text=True, timeout=300, env=tools_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_role_variable_is_prefixed_and_documented() -> None:
    defaults = re.findall(r"^([A-Za-z_][\w]*):", (ROLE / "defaults" / "main.yml").read_text(), re.M)
    readme = (ROLE / "README.md").read_text()
    assert defaults
    for name in defaults:
        assert name.startswith("mcp_appliance_") and not name.startswith("mcp_appliance__"), name
        assert f"`{name}`" in readme, f"{name} is not in the role README's table"


def test_role_renders_only_appliance_toml() -> None:
    """nginx.conf and supervisord.conf come from `mcp-appliance run`, never from the role."""
    assert sorted(p.name for p in (ROLE / "templates").iterdir()) == ["appliance.toml.j2"]
    unit = REPO / "systemd" / "mcp-appliance.service"
    assert not list(ROLE.rglob(unit.name)), "the unit is copied from systemd/, not kept in the role"


def test_role_installs_node_npm_and_the_ca_bundle_and_its_venv_gets_uvx() -> None:
    """npx (Debian's nodejs and npm) and uvx (uv, a dependency of the wheel the role installs
    into the venv) for stdio servers; npm and uv trust ca-certificates' bundle."""
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert {"nodejs", "npm", "ca-certificates"} <= set(defaults["mcp_appliance_packages"])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"uv\b", requirement) for requirement in project["dependencies"])


# --- The booted host -------------------------------------------------------------------------


@dataclass
class Deployment:
    """The guest, its inventory and what the runs measured."""

    guest: Any  # tests.deploy.guest.Guest
    workdir: Path
    inventory: Path
    http_port: int
    host_vars: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)

    @property
    def mcp_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/mcp"

    def write_inventory(self, **overrides: Any) -> None:
        self.host_vars.update(overrides)
        inventory = {"all": {"children": {"mcp_appliance": {"hosts": {"guest": self.host_vars}}}}}
        self.inventory.write_text(json.dumps(inventory, indent=2))  # JSON is YAML

    def playbook(self, label: str) -> dict[str, int]:
        """Run site.yml as an operator would; return the guest's PLAY RECAP counters."""
        playbook = require_tool("ansible-playbook", "pip install ansible into the tool venv")
        started = time.monotonic()
        result = subprocess.run(
            [playbook, "-i", str(self.inventory), "site.yml"],
            cwd=ANSIBLE, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
            env=tools_env(ANSIBLE_LOCAL_TEMP=str(self.workdir / "ansible-tmp")),
        )
        self.timings[label] = time.monotonic() - started
        log = self.workdir / f"playbook-{label}.log"
        log.write_text(result.stdout + result.stderr)
        self.runs.append(result.stdout)
        recap = re.search(r"^guest\s*:\s*(.*)$", result.stdout, re.M)
        if result.returncode != 0 or not recap:
            journal = self.guest.run("journalctl", "-u", "mcp-appliance.service", "-n", "40", "--no-pager", check=False).stdout
            journal += self.guest.run("sh", "-c", "tail -n 15 /var/log/mcp-appliance/*.log", check=False).stdout
            raise AssertionError(f"ansible-playbook ({label}) failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}\n"
                                 f"--- journalctl -u mcp-appliance (guest):\n{journal}")
        return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", recap.group(1))}

    def sh(self, *cmd: str, check: bool = True) -> str:
        return self.guest.run(*cmd, check=check).stdout

    def main_pid(self) -> int:
        return int(self.sh("systemctl", "show", "--property=MainPID", "--value", "mcp-appliance.service"))

    def supervisorctl_status(self) -> dict[str, tuple[str, int]]:
        """Plain `supervisorctl status`, as an operator types it: name -> (state, pid)."""
        out = self.guest.run("supervisorctl", "status", check=False).stdout
        status = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                pid = re.search(r"pid (\d+)", line)
                status[parts[0]] = (parts[1], int(pid.group(1)) if pid else 0)
        return status

    def all_running(self) -> dict[str, tuple[str, int]]:
        """supervisorctl status once every program is RUNNING (a worker is STARTING for its
        startsecs after /health already counts it)."""
        def running() -> dict[str, tuple[str, int]] | None:
            status = self.supervisorctl_status()
            return status if status and all(state == "RUNNING" for state, _ in status.values()) else None

        return wait_until(running, 60, f"every program RUNNING in supervisorctl status (last: {self.supervisorctl_status()})", 0.5)

    def health(self) -> tuple[int, dict[str, Any]]:
        """GET /health with curl from inside the host."""
        out = self.sh("curl", "-sS", "-m", "10", "-w", "\n%{http_code}", f"http://127.0.0.1:{self.http_port}/health", check=False)
        body, _, code = out.rpartition("\n")
        try:
            doc = json.loads(body)
        except json.JSONDecodeError:
            doc = {"raw": body}
        return int(code or 0), doc


def _source_snapshot(target: Path) -> Path:
    """A copy of the checkout to build the wheel from: others may edit the tree while this runs,
    and idempotence is judged on one source."""
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "bench")
    shutil.copytree(REPO, target, ignore=ignore, symlinks=True)
    return target


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    """A booted Debian 12 guest with the appliance installed by site.yml (first run)."""
    require_root("boots a Debian host with systemd-nspawn")
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"), ("nsenter", "util-linux")):
        if not shutil.which(tool):
            missing(f"{tool} not found (Debian package {package})")
    require_tool("ansible-playbook", "pip install ansible into the tool venv")
    from tests.deploy.guest import booted_guest

    workdir = Path(tempfile.mkdtemp(prefix="mcp-appliance-deploy-", dir="/var/tmp"))
    started = time.monotonic()
    try:
        with booted_guest(workdir) as guest:
            booted = time.monotonic()
            # Loopback ports free on the host right now: the guest shares its network.
            base = free_port_block(WORKERS + 2)
            deployment = Deployment(guest, workdir, workdir / "inventory.yml", base, {})
            deployment.timings["boot (incl. rootfs copy)"] = booted - started
            deployment.write_inventory(
                ansible_connection="community.docker.nsenter",
                ansible_nsenter_pid=guest.init_pid,
                ansible_python_interpreter="/usr/bin/python3",
                ansible_become=False,  # nsenter is root already; the guest has no sudo
                mcp_appliance_source_dir=str(_source_snapshot(workdir / "source")),
                mcp_appliance_environment="staging",
                mcp_appliance_auth_mode="none",  # the gate's auth has its own tests
                mcp_appliance_admin_token="deploy-test-admin-token-7c1f0e",
                mcp_appliance_http_host="127.0.0.1",
                mcp_appliance_http_port=base,
                mcp_appliance_admin_port=base + 1,
                mcp_appliance_workers_base_port=base + 2,
                mcp_appliance_workers=WORKERS,
                mcp_appliance_log_level="info",
            )
            deployment.playbook("first run")
            yield deployment
    finally:
        total = time.monotonic() - started
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nbooted-host deploy: {total:.0f}s wall time in all")


def test_first_run_leaves_the_service_enabled_active_and_every_program_running(deployment: Deployment) -> None:
    assert deployment.sh("systemctl", "is-enabled", "mcp-appliance.service").strip() == "enabled"
    assert deployment.sh("systemctl", "is-active", "mcp-appliance.service").strip() == "active"
    status = deployment.all_running()
    workers = [name for name in status if re.search(r"worker-\d\d$", name)]
    assert len(workers) == WORKERS and {"nginx", "admin", "events"} <= {n.split(":")[-1] for n in status}, status
    # supervisord is the unit's main process; Debian's own nginx.service never ran.
    assert deployment.main_pid() == int(deployment.sh("cat", "/run/mcp-appliance/supervisord.pid"))
    assert deployment.sh("systemctl", "is-enabled", "nginx.service", check=False).strip() == "masked"


def test_health_answers_200_ok_inside_the_host(deployment: Deployment) -> None:
    code, doc = deployment.health()
    assert code == 200 and doc.get("status") == "ok", doc


def test_secrets_and_config_are_readable_only_by_root_and_the_service_group(deployment: Deployment) -> None:
    def stat(path: str) -> str:
        return deployment.sh("stat", "-c", "%a %U %G", path).strip()

    assert stat("/etc/mcp-appliance/secrets") == "750 root mcp-appliance"
    assert stat("/etc/mcp-appliance/secrets/admin.token") == "640 root mcp-appliance"
    assert stat("/etc/mcp-appliance/appliance.toml") == "640 root mcp-appliance"
    config = deployment.sh("cat", "/etc/mcp-appliance/appliance.toml")
    assert 'token_file = "/etc/mcp-appliance/secrets/admin.token"' in config
    assert "deploy-test-admin-token" not in config
    # The unit is this repository's file, unchanged.
    installed = deployment.sh("cat", "/etc/systemd/system/mcp-appliance.service")
    assert installed == (REPO / "systemd" / "mcp-appliance.service").read_text()


def test_second_run_changes_nothing(deployment: Deployment) -> None:
    pid = deployment.main_pid()
    recap = deployment.playbook("second run")
    assert recap["changed"] == 0 and recap["failed"] == 0, (recap, deployment.runs[-1][-4000:])
    assert deployment.main_pid() == pid


def test_config_change_reloads_in_place_and_each_open_session_keeps_working_or_gets_404(deployment: Deployment) -> None:
    """Changing a variable rewrites appliance.toml and reloads the unit: supervisord and nginx
    stay (same PIDs, no unit restart). A legacy session opened before the reload goes on
    working if its worker survived the reload; if the rolling reload replaced that worker
    (today's `mcp-appliance reload` replaces every worker, one at a time) the session gets
    the spec's 404 and a fresh session works."""
    from tests.integration.clients import mcp_client, sessions_on_two_workers

    main_pid = deployment.main_pid()
    restarts = deployment.sh("systemctl", "show", "--property=NRestarts", "--value", "mcp-appliance.service").strip()
    before = deployment.all_running()
    workers_before = {name: pid for name, (_, pid) in before.items() if "worker-" in name}
    outcome: dict[str, str] = {}

    async def scenario() -> None:
        async with sessions_on_two_workers(deployment.mcp_url) as sessions:
            for session in sessions:
                await session.client.list_tools()
            deployment.write_inventory(mcp_appliance_log_level="debug")
            recap = await anyio.to_thread.run_sync(deployment.playbook, "config change")
            assert recap["changed"] >= 2 and recap["failed"] == 0, recap  # appliance.toml + the reload handler
            # The reload handler's `systemctl reload` ran and was not refused (no restart fallback).
            assert re.search(r"HANDLER \[mcp_appliance : Reload mcp-appliance\][^\n]*\nchanged", deployment.runs[-1]), deployment.runs[-1][-3000:]
            assert recap["ignored"] == 0, deployment.runs[-1][-3000:]
            workers_after = {name: pid for name, (_, pid) in deployment.all_running().items() if "worker-" in name}
            for session in sessions:
                name = next(n for n in workers_before if n.endswith(f"worker-{session.owner:02d}"))
                if workers_after.get(name) == workers_before[name]:
                    await session.client.list_tools()  # the worker survived: its session still works
                    outcome[name] = "survived, session kept working"
                else:
                    with pytest.raises(Exception) as lost:
                        await session.client.list_tools()
                    assert "404" in str(lost.value) or "not found" in str(lost.value).lower(), lost.value
                    async with mcp_client(deployment.mcp_url, "legacy") as (fresh, _):
                        await fresh.list_tools()
                    outcome[name] = "replaced, session ended with 404, a new one works"

    anyio.run(scenario)
    assert 'log_level = "debug"' in deployment.sh("cat", "/etc/mcp-appliance/appliance.toml")
    assert deployment.main_pid() == main_pid, "the config change restarted supervisord instead of reloading"
    assert deployment.sh("systemctl", "show", "--property=NRestarts", "--value", "mcp-appliance.service").strip() == restarts
    journal = deployment.sh("journalctl", "-u", "mcp-appliance.service", "--no-pager", "-o", "cat")
    assert re.search(r"^Reload(ed|ing)", journal, re.M), journal[-3000:]
    after = deployment.all_running()
    assert after["nginx"][1] == before["nginx"][1], "nginx was restarted, not reloaded"
    code, doc = deployment.health()
    assert code == 200 and doc.get("status") == "ok", doc
    timings = ", ".join(f"{label} {seconds:.0f}s" for label, seconds in deployment.timings.items())
    print(f"\nbooted-host deploy: {timings}; workers after reload: {outcome}")
