"""deploy.sh: the seed's verbs as thin names for docker compose, kubectl and mcp-appliance.

There is no Docker engine and no cluster here, so for `docker` and `k8s` a recording
stand-in on PATH shows the exact command deploy.sh hands over; `local` runs for real.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from appliance.config import load_settings
from appliance.preflight import check_ports_free
from tests.deploy.deploy_tools import require_tool
from tests.harness import cleanup, new_appliance, to_toml, wait_until

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy.sh"
BASH = shutil.which("bash") or "/bin/bash"

pytestmark = pytest.mark.deploy


def run(*args: str, path: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": path, **(env or {})})


def bare_path(tmp_path: Path) -> str:
    """A PATH with only what deploy.sh itself uses: no docker, kubectl or mcp-appliance."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("dirname", "sed", "cat", "mkdir", "rm", "nohup"):
        (bare / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    return str(bare)


def test_deploy_script_passes_shellcheck() -> None:
    shellcheck = require_tool("shellcheck", "apt-get install shellcheck")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(("verb", "tool"), [(("docker", "up"), "docker"), (("k8s", "status"), "kubectl"),
                                            (("local", "start"), "mcp-appliance")])
def test_a_missing_tool_is_named_with_how_to_get_it(tmp_path: Path, verb: tuple[str, str], tool: str) -> None:
    result = run(*verb, path=bare_path(tmp_path))
    assert result.returncode == 127
    assert f"'{tool}' not found on PATH: install" in result.stderr


def test_unknown_verbs_print_the_usage(tmp_path: Path) -> None:
    result = run("k8s", "deploy", path=bare_path(tmp_path))
    assert result.returncode == 2 and "./deploy.sh k8s up|status|down" in result.stderr


@pytest.mark.parametrize(("verb", "expected"), [
    (("docker", "up"), f"compose -f {REPO}/conf/compose.yaml up -d --build"),
    (("docker", "down"), f"compose -f {REPO}/conf/compose.yaml down"),
    (("docker", "logs"), f"compose -f {REPO}/conf/compose.yaml logs -f"),
    (("k8s", "up"), f"apply -k {REPO}/conf/k8s"),
    (("k8s", "status"), "get statefulset,pods,services,hpa,pdb,pvc -l app.kubernetes.io/name=mcp-appliance"),
    (("k8s", "down"), f"delete -k {REPO}/conf/k8s"),
])
def test_docker_and_k8s_verbs_hand_over_to_the_real_tool(tmp_path: Path, verb: tuple[str, str], expected: str) -> None:
    """Stand-ins for docker and kubectl (no engine, no cluster here) print what they were asked."""
    path = bare_path(tmp_path)
    for tool in ("docker", "kubectl"):
        (Path(path) / tool).write_text('#!/bin/sh\necho "$*"\n')
        (Path(path) / tool).chmod(0o755)
    result = run(*verb, "--extra", path=path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{expected} --extra"


def test_local_start_runs_the_appliance_and_local_stop_returns_once_it_is_gone(tmp_path: Path) -> None:
    appliance = new_appliance(1)
    appliance.config_path.write_text(to_toml(appliance.settings))
    env = {"MCP_DEPLOY_LOCAL_DIR": str(tmp_path / "local")}
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    pid = 0
    try:
        started = run("local", "start", "--config", str(appliance.config_path), path=path, env=env)
        assert started.returncode == 0, started.stderr
        pid = int((tmp_path / "local" / "appliance.pid").read_text())
        wait_until(lambda: appliance.health()[0] == 200, 30, "the locally started appliance answers /health")
        stopped = run("local", "stop", path=path, env=env)
        assert stopped.returncode == 0, stopped.stderr
        # Stopped when `local stop` returns, not later: a `local start` right after finds the ports free.
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert not (tmp_path / "local" / "appliance.pid").exists()
        check_ports_free(load_settings(appliance.config_path))
    finally:
        if pid and psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
        cleanup(appliance)
