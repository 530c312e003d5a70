"""The README's set-up command on a freshly booted Debian 12 host, and every next step it prints.

One guest (tests.deploy.guest: systemd-nspawn, systemd as PID 1, the host's network
namespace) gets a copy of this checkout in /root/mcp-appliance, and `./install.sh` runs
there exactly as the README prints it: no variables, so the role's defaults (production,
API keys, port 80, admin port 9000, workers on 9100…). Then the tests below run, in file
order, the README's command blocks verbatim (tests/deploy/readme_commands.py finds them)
in a root shell with a fresh login's environment. The guest has no sudo: a command the
README prints as `sudo …` runs without the word `sudo`, as root, which is what sudo does.
MCP calls also come from the real `mcp` SDK client on the host, at http://127.0.0.1:80/mcp.

The guest's listeners are the host's: port 80, 9000, 9100 and 9101 must be free here (the
test fails, saying so, when they are not).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.deploy.deploy_tools import missing, require_root
from tests.deploy.readme_commands import README, as_root, readme_blocks
from tests.harness import http, wait_until

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = "/root/mcp-appliance"
#: The role's defaults: nginx on 0.0.0.0:80, the admin app on 9000, two workers from 9100.
PORTS = {80: "0.0.0.0", 9000: "127.0.0.1", 9100: "127.0.0.1", 9101: "127.0.0.1"}
MCP_URL = "http://127.0.0.1:80/mcp"
INSTALL_TIMEOUT = 1200
NOTES_DB = "/var/lib/mcp-appliance/notes.db"
KEYS_FILE = "/etc/mcp-appliance/api_keys.json"


@dataclass
class Host:
    """The guest after `./install.sh`, with what later steps learn (the key) and measure."""

    guest: Any  # tests.deploy.guest.Guest
    install_output: str = ""
    key: str = ""
    notes: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def readme(self, command: str, check: bool = True, timeout: float = 120) -> tuple[int, str, str]:
        """Run one README command in a root shell in the checkout; KEY is the key `keys add` printed."""
        result = self.guest.shell(as_root(command), cwd=CHECKOUT, env={"KEY": self.key} if self.key else None,
                                  check=False, timeout=timeout)
        if check:
            assert result.returncode == 0, f"README command failed ({result.returncode}): {command}\n{result.stdout}\n{result.stderr}"
        return result.returncode, result.stdout, result.stderr

    def sh(self, script: str, check: bool = True) -> str:
        """A command of the test's own (not the README's), as root in the guest."""
        return self.guest.shell(script, check=check).stdout

    def main_pid(self) -> int:
        return int(self.sh("systemctl show --property=MainPID --value mcp-appliance.service"))

    def health(self) -> dict[str, Any]:
        code, _, body = http("GET", "http://127.0.0.1:80/health")
        doc = json.loads(body)
        return doc if code == 200 and doc.get("status") == "ok" else {}

    def workers(self) -> dict[str, int]:
        """worker name -> pid, once every program is RUNNING in plain `supervisorctl status`."""
        def settled() -> dict[str, int] | None:
            lines = [line.split() for line in self.sh("supervisorctl status", check=False).splitlines() if line.strip()]
            if not lines or any(len(parts) < 4 or parts[1] != "RUNNING" for parts in lines):
                return None
            return {parts[0]: int(parts[3].rstrip(",")) for parts in lines if "worker-" in parts[0]}

        return wait_until(settled, 60, "every program RUNNING in supervisorctl status", 0.5)


def _ports_in_use() -> list[str]:
    """The role's default ports that something on this machine (the guest's network) holds."""
    taken = []
    for port, host in PORTS.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
            try:
                s.bind((host, port))
            except OSError as exc:
                taken.append(f"{host}:{port} ({exc.strerror})")
    return taken


def _copy_checkout(target: Path) -> None:
    """The checkout as an operator has it, without VCS and build leftovers."""
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".mcp-appliance-local", "rendered")
    shutil.copytree(REPO, target, ignore=ignore, symlinks=True)


def _answer(text: str) -> dict[str, Any]:
    """The JSON-RPC answer of a POST: a JSON body, or the last `data:` event of an SSE stream."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:") and line[5:].strip()]
    assert events, f"no JSON-RPC answer in {text[:500]!r}"
    return json.loads(events[-1])


async def _call(mode: str, key: str, tool: str, arguments: dict[str, Any]) -> Any:
    """One tool call from the SDK client on the host, with the key; the result as the SDK gives it."""
    from tests.integration.clients import mcp_client

    async with mcp_client(MCP_URL, mode, headers={"Authorization": f"Bearer {key}"}) as (client, _):
        return await client.call_tool(tool, arguments)


def call(mode: str, key: str, tool: str, arguments: dict[str, Any]) -> Any:
    return anyio.run(_call, mode, key, tool, arguments)


def structured(result: Any) -> Any:
    assert not result.is_error, result
    return result.structured_content


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    """A freshly booted Debian 12 guest on which the README's `sudo ./install.sh` has run."""
    require_root("boots a Debian host with systemd-nspawn")
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"), ("nsenter", "util-linux")):
        if not shutil.which(tool):
            missing(f"{tool} not found (Debian package {package})")
    taken = _ports_in_use()
    if taken:
        pytest.fail(f"the README's install uses the role's default ports, and on this machine (whose network the "
                    f"guest shares) they are taken: {', '.join(taken)}; stop what listens there (ss -ltnp)")
    from tests.deploy.guest import booted_guest

    workdir = Path(tempfile.mkdtemp(prefix="mcp-appliance-install-", dir="/var/tmp"))
    started = time.monotonic()
    try:
        with booted_guest(workdir) as guest:
            booted = Host(guest)
            booted.timings["boot (incl. rootfs copy)"] = time.monotonic() - started
            _copy_checkout(guest.root / CHECKOUT.lstrip("/"))
            guest.use_host_pip_config()
            [install] = readme_blocks()["install"]
            began = time.monotonic()
            _, out, err = booted.readme(install, timeout=INSTALL_TIMEOUT)
            booted.timings["./install.sh"] = time.monotonic() - began
            booted.install_output = out + err
            yield booted
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nREADME install on a booted host: {time.monotonic() - started:.0f}s wall time in all")


def test_install_sh_with_the_role_defaults_runs_production_with_api_keys_and_no_key_yet(host: Host) -> None:
    config = host.sh("cat /etc/mcp-appliance/appliance.toml")
    assert 'environment = "production"' in config and 'mode = "api_keys"' in config and "port = 80" in config
    assert f'keys_file = "{KEYS_FILE}"' in config
    # The empty keys file the role made: readable by the service's group only, with no key.
    assert host.sh(f"stat -c '%a %U %G' {KEYS_FILE}").strip() == "640 root mcp-appliance"
    assert json.loads(host.sh(f"cat {KEYS_FILE}")) == {"keys": []}
    assert host.sh("systemctl is-active mcp-appliance.service").strip() == "active"


def test_install_sh_prints_the_readme_next_steps(host: Host) -> None:
    for command in readme_blocks()["first-steps"]:
        assert command in host.install_output, f"install.sh's closing message lacks {command!r}"
    assert "curl :" not in host.install_output


def test_every_mcp_call_gets_401_until_a_key_exists(host: Host) -> None:
    from tests.integration.clients import modern_request

    headers, body = modern_request("tools/list", None, {})
    code, answer_headers, answer = http("POST", MCP_URL, body, headers)
    assert code == 401 and answer_headers.get("www-authenticate", "").startswith("Bearer"), (code, answer)
    assert json.loads(answer)["error"]["message"].startswith("Unauthorized")


def test_readme_first_steps_run_as_printed(host: Host) -> None:
    """curl localhost/health, supervisorctl status, systemctl status, keys add: each as printed."""
    ran = []
    for command in readme_blocks()["first-steps"]:
        if command.startswith("curl localhost/health"):
            _, out, _ = host.readme(command)
            doc = json.loads(out)
            assert doc["status"] == "ok" and doc["environment"] == "production", doc
        elif command == "supervisorctl status":
            # Workers are STARTING for supervisord's startsecs after /health counts them: the
            # operator who types it again a few seconds later sees every program RUNNING.
            def all_running() -> str | None:
                _, out, _ = host.readme(command, check=False)
                states = [line.split()[1] for line in out.splitlines() if line.strip()]
                return out if len(states) >= 5 and set(states) == {"RUNNING"} else None

            out = wait_until(all_running, 60, "every program RUNNING in `supervisorctl status`", 0.5)
            assert {"nginx", "admin", "events", "worker-00", "worker-01"} <= {line.split()[0] for line in out.splitlines()}
        elif command == "systemctl status mcp-appliance":
            _, out, _ = host.readme(command)
            assert "active (running)" in out, out
        elif command.startswith("sudo mcp-appliance keys add"):
            _, out, err = host.readme(command)
            host.key = out.strip().splitlines()[-1]
            assert re.fullmatch(r"mcpk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", host.key), out
            assert "shown only now" in err
        else:
            pytest.fail(f"README's first steps show a command this test does not run: {command!r}")
        ran.append(command)
    assert len(ran) == 4
    # `keys add` ran as root and replaced the file: the service user must still read it.
    assert host.sh(f"stat -c '%a %U %G' {KEYS_FILE}").strip() == "640 root mcp-appliance"
    host.sh(f"setpriv --reuid=mcp-appliance --regid=mcp-appliance --init-groups cat {KEYS_FILE} >/dev/null")


#: The unit's directives that make its sandbox (not how it starts or stops): a transient unit
#: with these runs a command as the workers run, under the same hardening.
SANDBOX = ("User", "Group", "UMask", "StateDirectory", "StateDirectoryMode", "CapabilityBoundingSet",
           "AmbientCapabilities", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
           "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
           "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictNamespaces", "RestrictRealtime",
           "RestrictSUIDSGID", "LockPersonality", "ProtectProc", "RestrictAddressFamilies",
           "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber", "MemoryDenyWriteExecute",
           "LimitNOFILE")
INITIALIZE = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "install-test", "version": "1"}}})


def _in_the_units_sandbox(host: Host, env: list[str], argv: list[str]) -> tuple[int, str, str]:
    """Run `argv` as a oneshot unit with the appliance unit's sandbox and `env`: exit code, stdout, stderr.

    A unit file of the test's own rather than systemd-run: --wait and --pipe need D-Bus,
    which the guest does not run.
    """
    from tests.deploy.test_systemd_unit import unit_options

    service = unit_options()["Service"]
    path = next(v.removeprefix("PATH=") for v in env if v.startswith("PATH="))
    executable = host.sh(f"PATH={path} command -v {argv[0]}").strip()
    quoted = " ".join(json.dumps(a) for a in [executable, *argv[1:]])
    lines = ["[Service]", "Type=oneshot", f"ExecStart={quoted}", "StandardOutput=file:/run/stdio-probe.out",
             "StandardError=file:/run/stdio-probe.err",
             *[f"{key}={service[key]}" for key in SANDBOX if key in service],
             *[f"Environment={json.dumps(v.replace('%', '%%'))}" for v in env]]
    unit = host.guest.root / "etc/systemd/system/mcp-stdio-probe.service"
    unit.write_text("\n".join(lines) + "\n")
    try:
        host.sh("rm -f /run/stdio-probe.out /run/stdio-probe.err && systemctl daemon-reload")
        code = host.guest.run("systemctl", "start", "mcp-stdio-probe.service", check=False, timeout=300).returncode
        return code, host.sh("cat /run/stdio-probe.out"), host.sh("cat /run/stdio-probe.err")
    finally:
        unit.unlink()
        host.sh("systemctl reset-failed mcp-stdio-probe.service 2>/dev/null; systemctl daemon-reload")


def test_npx_and_uvx_run_in_the_units_sandbox_with_a_workers_environment(host: Host) -> None:
    """Node.js and uv from the install, run as a worker would start a stdio server: the
    service user, the unit's hardening, the environment read from a running worker; each
    installs a local package into its cache under data_dir and runs it (no registry)."""
    from tests.deploy.runner_packages import MARKER, npm_tarball, npx_argv, uvx_argv, wheel

    worker = host.workers()["worker-00"]
    env = [line for line in host.sh(f"tr '\\0' '\\n' < /proc/{worker}/environ").splitlines() if "=" in line]
    assert "HOME=/var/lib/mcp-appliance" in env and any(v.startswith("PATH=/opt/mcp-appliance/bin:") for v in env), env
    packages = host.guest.root / "srv/stdio-packages"
    packages.mkdir(parents=True, exist_ok=True)
    packages.chmod(0o755)
    tarball, built = npm_tarball(packages), wheel(packages)
    for argv in (["npx", "--version"], ["uvx", "--version"]):
        code, out, err = _in_the_units_sandbox(host, env, argv)
        assert code == 0, (argv, out, err)
    for argv in (npx_argv(f"/srv/stdio-packages/{tarball.name}"), uvx_argv(f"/srv/stdio-packages/{built.name}")):
        code, out, err = _in_the_units_sandbox(host, env, argv)
        assert (code, out.strip()) == (0, MARKER), (argv, out, err)
    owners = host.sh("stat -c '%U' /var/lib/mcp-appliance/.npm/_npx /var/lib/mcp-appliance/.cache/uv").split()
    assert owners == ["mcp-appliance", "mcp-appliance"], owners


def test_readme_preinstall_puts_stdio_servers_under_the_data_dir_that_answer_as_the_service_user(host: Host) -> None:
    for command in readme_blocks()["preinstall"]:
        host.readme(command, timeout=900)
    for executable in ("/var/lib/mcp-appliance/npm/node_modules/.bin/mcp-server-everything",
                       "/var/lib/mcp-appliance/venvs/time/bin/mcp-server-time"):
        assert host.sh(f"stat -L -c '%U' {executable}").strip() == "mcp-appliance"
        # One initialize over stdio, as the bridge sends it; the server ends at the end of its input.
        out = host.sh(f"printf '%s\\n' '{INITIALIZE}' | timeout 60 setpriv --reuid=mcp-appliance "
                      f"--regid=mcp-appliance --init-groups {executable}", check=False)
        answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert any(a.get("id") == 1 and "serverInfo" in a.get("result", {}) for a in answers), out


@pytest.mark.parametrize(("command", "expected"), [
    ("curl localhost/health", '"status":"ok"'),  # README: "Everyday use", "Operations"
    ("curl localhost/metrics", "mcp_appliance_workers_ready"),  # README: "Operations"
    ("mcp-appliance status", "health: ok"),
])
def test_readme_table_commands_answer(host: Host, command: str, expected: str) -> None:
    assert f"`{command}`" in README.read_text()
    _, out, _ = host.readme(command)
    assert expected in out, out[-2000:]


def test_readme_curl_calls_list_tools_and_add_a_note_with_the_new_key(host: Host) -> None:
    """The running workers take the new key without a reload: they re-read the keys file
    within a second of a change (the README's promise), so the first call may wait that long."""
    tools_list, add_note = readme_blocks()["curl-tools"]

    def listed() -> dict[str, Any] | None:
        answer = _answer(host.readme(tools_list)[1])
        return None if "Unauthorized" in answer.get("error", {}).get("message", "") else answer

    answer = wait_until(listed, 3, "the new key accepted within a second of `keys add`", 0.2)
    names = {tool["name"] for tool in answer["result"]["tools"]}
    assert {"add_note", "get_note", "search_notes"} <= names, names
    _, out, _ = host.readme(add_note)
    result = _answer(out)["result"]
    assert not result["isError"] and result["structuredContent"]["title"] == "hello", result
    host.notes["curl"] = result["structuredContent"]["id"]


@pytest.mark.parametrize("mode", ["2026-07-28", "legacy"])
def test_sdk_client_on_the_host_writes_and_reads_a_note_with_the_key(host: Host, mode: str) -> None:
    marker = f"sdk-{mode}-{uuid.uuid4().hex[:8]}"
    note = structured(call(mode, host.key, "add_note", {"title": marker, "body": f"written by the {mode} client"}))
    assert structured(call(mode, host.key, "get_note", {"id": note["id"]}))["title"] == marker
    hits = structured(call(mode, host.key, "search_notes", {"query": marker}))
    assert [hit["id"] for hit in (hits["result"] if isinstance(hits, dict) else hits)] == [note["id"]], hits
    host.notes[mode] = note["id"]


@pytest.mark.parametrize("credential", [None, "wrong-format", "mcpk_000000000000_" + "A" * 43])
def test_a_call_without_the_key_or_with_a_wrong_one_gets_401(host: Host, credential: str | None) -> None:
    from tests.integration.clients import modern_request

    headers, body = modern_request("tools/call", "get_note", {"name": "get_note", "arguments": {"id": 1}})
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    code, _, answer = http("POST", MCP_URL, body, headers)
    assert code == 401, (code, answer)


def test_systemctl_reload_keeps_the_service_healthy_and_the_key_working(host: Host) -> None:
    main_pid, before = host.main_pid(), host.workers()
    began = time.monotonic()
    host.readme("systemctl reload mcp-appliance", timeout=300)  # README, "systemd" table
    host.timings["systemctl reload"] = time.monotonic() - began
    assert host.main_pid() == main_pid
    after = host.workers()
    assert set(after) == set(before) and all(after[n] != before[n] for n in before), (before, after)
    assert wait_until(host.health, 30, "/health ok after the reload")
    assert structured(call("2026-07-28", host.key, "get_note", {"id": host.notes["curl"]}))["title"] == "hello"


def test_readme_admin_token_command_shows_the_effective_settings(host: Host) -> None:
    [command] = readme_blocks()["admin-token"]
    _, out, _ = host.readme(command)
    settings = json.loads(out)
    assert settings["environment"] == "production" and settings["auth"]["mode"] == "api_keys", settings
    code, _, _ = http("GET", "http://127.0.0.1:80/config")
    assert code == 401  # production protects /config: the token is what made the README's call work


def test_readme_upgrade_installs_the_new_code_with_a_reload_and_keeps_the_keys(host: Host) -> None:
    """A changed checkout, then `./install.sh` again: new wheel, rolling reload, keys and notes kept."""
    marker = f"# upgrade check {uuid.uuid4().hex}"
    host.sh(f"echo '{marker}' >> {CHECKOUT}/appliance/__init__.py")
    keys_before = host.sh(f"cat {KEYS_FILE}")
    main_pid, before = host.main_pid(), host.workers()
    [command] = readme_blocks()["upgrade"]
    began = time.monotonic()
    host.readme(command, timeout=INSTALL_TIMEOUT)
    host.timings["./install.sh again (upgrade)"] = time.monotonic() - began
    installed = host.sh("/opt/mcp-appliance/bin/python -c 'import appliance, pathlib; print(pathlib.Path(appliance.__file__).read_text())'")
    assert marker in installed, "the upgrade did not install the changed code"
    assert host.main_pid() == main_pid, "the upgrade restarted the service instead of reloading it"
    after = host.workers()
    assert all(after[n] != before[n] for n in before), "the workers still run the old code"
    assert host.sh(f"cat {KEYS_FILE}") == keys_before
    assert wait_until(host.health, 30, "/health ok after the upgrade")
    assert structured(call("2026-07-28", host.key, "get_note", {"id": host.notes["curl"]}))["title"] == "hello"


def test_readme_backup_and_restore_bring_back_the_notes_of_the_backup(host: Host) -> None:
    [backup] = readme_blocks()["backup"]
    host.readme(backup)
    copy = "/var/backups/mcp-appliance-notes.db"
    assert host.sh(f"stat -c '%a %U' {copy}").strip() == "600 root"
    titles = host.sh(f"python3 -c 'import sqlite3; print([r[0] for r in sqlite3.connect(\"{copy}\").execute(\"select title from notes\")])'")
    assert "hello" in titles, titles
    later = structured(call("2026-07-28", host.key, "add_note", {"title": "after the backup", "body": "gone after the restore"}))
    for command in readme_blocks()["restore"]:
        host.readme(command, timeout=180)
    assert wait_until(host.health, 60, "/health ok after the restore")
    assert structured(call("2026-07-28", host.key, "get_note", {"id": host.notes["legacy"]}))["id"] == host.notes["legacy"]
    assert call("2026-07-28", host.key, "get_note", {"id": later["id"]}).is_error, "a note newer than the backup survived the restore"
    assert host.sh(f"stat -c '%U %G' {NOTES_DB}").strip() == "mcp-appliance mcp-appliance"


def test_readme_uninstall_removes_the_service_its_files_and_its_user(host: Host) -> None:
    for command in readme_blocks()["uninstall"]:
        host.readme(command, timeout=180)
    assert host.sh("systemctl list-unit-files --no-legend mcp-appliance.service", check=False).strip() == ""
    left = host.sh("ls -d /opt/mcp-appliance* /etc/mcp-appliance /var/lib/mcp-appliance /var/log/mcp-appliance "
                   "/var/cache/mcp-appliance /usr/local/bin/mcp-appliance /usr/local/bin/supervisorctl 2>/dev/null", check=False)
    assert left.strip() == "", left
    assert host.guest.shell("getent passwd mcp-appliance", check=False).returncode == 2
    assert host.sh("systemctl is-enabled nginx.service", check=False).strip() != "masked"
    listening = host.sh("ss -Hltn '( sport = :80 or sport = :9000 or sport = :9100 or sport = :9101 )'")
    assert listening.strip() == "", listening
    assert not _ports_in_use()
    timings = ", ".join(f"{label} {seconds:.0f}s" for label, seconds in host.timings.items())
    print(f"\nREADME install on a booted host: {timings}")
