"""npx and uvx run as the service user with exactly the environment the workers get.

The environment is the rendered supervisord.conf's, read back by Supervisor's own option
parser (so `%(ENV_PATH)s` is expanded as supervisord would), over the bare environment
systemd gives the unit (no HOME of root's). Packages come from local files with the tools'
offline switches, so nothing leaves the machine: an npm tarball through `npx -y` and a
wheel through `uvx --from`, each installed into its cache under data_dir.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from appliance.config import Settings, WorkersSettings
from appliance.preflight import prepare_dirs
from appliance.render import RenderContext, cli_command, render_all, write_files
from appliance.supervisor import worker_program
from tests.deploy.runner_packages import MARKER, npm_tarball, npx_argv, uvx_argv, wheel

pytestmark = pytest.mark.deploy

#: systemd's PATH for a unit (what supervisord inherits under systemd/mcp-appliance.service).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVICE_USER = Settings().user


@dataclasses.dataclass
class Worker:
    """What a worker process gets: its environment, its data_dir and the user it runs as."""

    settings: Settings
    env: dict[str, str]
    base: Path

    def run(self, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        drop = ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--init-groups"] if os.geteuid() == 0 else []
        return subprocess.run([*drop, *argv], env=self.env, cwd=cwd or self.settings.data_dir,
                              capture_output=True, text=True, timeout=120)


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:
    for tool in ("node", "npm", "npx"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} not found: install Debian's nodejs and npm (scripts/test.sh does)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            pytest.fail(f"the service user {SERVICE_USER} does not exist (scripts/test.sh creates it)")
    base = Path(tempfile.mkdtemp(prefix="mcp-appliance-runners-", dir="/tmp"))
    base.chmod(0o755)  # the service user must reach data_dir
    try:
        settings = dataclasses.replace(
            Settings(), run_dir=base / "run", log_dir=base / "log", data_dir=base / "data",
            workers=WorkersSettings(count=1, base_port=9100), source=str(base / "appliance.toml"))
        prepare_dirs(settings, as_root=os.geteuid() == 0)  # what `mcp-appliance run` does first
        bin_dir = str(Path(sys.executable).parent)
        files = render_all(settings, RenderContext(command=cli_command(sys.executable, base / "appliance.toml"),
                                                   as_root=os.geteuid() == 0, bin_dir=bin_dir))
        write_files(files, settings.run_dir)
        monkeypatch.setenv("PATH", SYSTEMD_PATH)
        options = ServerOptions()
        options.realize(args=["-c", str(settings.run_dir / "supervisord.conf")])
        groups = {g.name: g for g in options.process_group_configs}
        program_env = groups[worker_program(0)].process_configs[0].environment
        yield Worker(settings, {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **program_env}, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _owned_by_service_user(path: Path) -> bool:
    return os.geteuid() != 0 or path.stat().st_uid == pwd.getpwnam(SERVICE_USER).pw_uid


def test_npx_and_uvx_answer_as_the_service_user_with_the_workers_environment(worker: Worker) -> None:
    for argv in (("node", "--version"), ("npx", "--version"), ("uvx", "--version")):
        result = worker.run(*argv)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
    assert worker.run("sh", "-c", "command -v uvx").stdout.strip() == str(Path(sys.executable).parent / "uvx")


def _runs_and_caches(worker: Worker, argv: list[str], cache: Path) -> None:
    """`argv` prints the package's marker as the service user, leaving its cache in `cache`, owned by that user."""
    result = worker.run(*argv)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.strip() == MARKER
    assert cache.is_dir() and _owned_by_service_user(cache)


def test_npx_installs_and_runs_a_package_from_its_cache_under_the_data_dir(worker: Worker) -> None:
    _runs_and_caches(worker, npx_argv(str(npm_tarball(worker.base))), worker.settings.data_dir / ".npm" / "_npx")


def test_uvx_installs_and_runs_a_wheel_from_its_cache_under_the_data_dir(worker: Worker) -> None:
    _runs_and_caches(worker, uvx_argv(str(wheel(worker.base))), worker.settings.data_dir / ".cache" / "uv")
