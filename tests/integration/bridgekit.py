"""Bridged stdio servers for tests: hosted alone by hypercorn, or as an appliance's hosted app."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.harness import Appliance, free_port_block, http, new_appliance, wait_until
from tests.integration.bridge_apps import SPEC_VARIABLE
from tests.integration.bridge_host import STATUS_PATH

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Host:
    """One `bridge_host` process: its URL and process."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        """`bridge_status()` of the host's process, per server."""
        base = self.url.split("/", 3)
        status, _, body = http("GET", f"{base[0]}//{base[2]}{STATUS_PATH}")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]


@contextlib.contextmanager
def hosted(*, wait_for_child: bool = True, **spec: Any) -> Iterator[Host]:
    """A bridge for `spec` (StdioSpec fields; env as a dict) served by hypercorn; killed after the block.

    A shared server's child is waited for unless `wait_for_child` is false (it never starts)."""
    base = Path(tempfile.mkdtemp(prefix="mcp-bridge-test-"))
    spec.setdefault("server", "test")
    spec.setdefault("path", "/mcp")
    (base / "spec.json").write_text(json.dumps(spec))
    port = free_port_block(1)
    log = open(base / "host.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.bridge_host", str(port), str(base / "spec.json")],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    host = Host(f"http://127.0.0.1:{port}{spec['path']}", proc, base / "host.log")
    try:
        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"bridge_host exited with {proc.returncode}:\n{host.log}")
            return http("GET", f"http://127.0.0.1:{port}/", timeout=2)[0] == 404
        wait_until(answers, 30, "bridge host answering")
        if spec.get("isolation", "shared") == "shared" and wait_for_child:
            wait_until(lambda: commands(proc.pid), 30, f"shared child of {spec['command'][0]} started")
        yield host
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def guards(pid: int) -> list[psutil.Process]:
    """The child guards a worker (or bridge host) `pid` runs."""
    try:
        return [p for p in psutil.Process(pid).children() if any(a.endswith("bridge/guard.py") for a in p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def commands(pid: int) -> list[psutil.Process]:
    """The stdio servers (the guards' children) of `pid`."""
    found = []
    for guard in guards(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            found += guard.children()
    return found


def tree(pid: int) -> list[int]:
    """Every descendant of `pid`."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (from /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def bridged_appliance(workers: int = 2, **spec: Any) -> Appliance:
    """An appliance whose hosted app (`mcp.app`) is a bridge for `spec`."""
    app = new_appliance(workers, mcp={"app": "tests.integration.bridge_apps:app"})
    spec.setdefault("server", "test")
    spec.setdefault("path", "/mcp")
    spec_file = app.base / "bridge-spec.json"
    spec_file.write_text(json.dumps(spec))
    spec_file.chmod(0o644)
    app.env.update({"PYTHONPATH": str(REPO), SPEC_VARIABLE: str(spec_file)})
    return app
