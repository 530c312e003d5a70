"""Real appliances for tests: start `mcp-appliance run`, wait for health, always clean up.

Everything listens on loopback ports picked at run time. Processes are stopped by the
PID this harness started, never by name.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from appliance.health import worker_process_name
from appliance.supervisor import SupervisorClient

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, message: str, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns a truthy value or `timeout` passes (then fail with `message`)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the condition may not be checkable yet (connection refused …)
            last_error = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise TimeoutError(f"{message} (not within {timeout:.0f}s; last error: {last_error!r})")


#: Lowest port tests hand out: below it live the ports people's own services use (8080, 9000,
#: the appliance's defaults 9000 and 9100+ …).
PORT_FLOOR = 10000
#: Ports handed out by this process, never handed out twice (an appliance may not have bound
#: its ports yet when the next test asks).
_HANDED: set[int] = set()


def ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range:
    """The kernel's ephemeral range: source ports of outgoing connections come from it."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def listen_ports(ephemeral: range | None = None) -> range:
    """Ports tests may listen on: outside the ephemeral range, or an outgoing connection
    (any process's, a test client's, nginx's to a worker) may already hold the port an
    appliance is about to bind ("port clash")."""
    ephemeral = ephemeral or ephemeral_ports()
    below = range(PORT_FLOOR, max(PORT_FLOOR, ephemeral.start))
    above = range(max(PORT_FLOOR, ephemeral.stop), 65536)
    return max(below, above, key=len)


def free_port_block(count: int) -> int:
    """A base port such that base … base+count-1 are free on 127.0.0.1 right now, outside the
    kernel's ephemeral range, and not handed out before by this process.

    The one port picker of the tests and the benchmark: never bind port 0 to find a port
    for another process (that is an ephemeral port).
    """
    import random

    ports = listen_ports()
    if len(ports) < 100 * count:
        raise RuntimeError(f"too few ports outside the ephemeral range {ephemeral_ports()} for tests")
    for _ in range(200):
        base = random.randrange(ports.start, ports.stop - count)
        block = range(base, base + count)
        if _HANDED.intersection(block):
            continue
        socks = []
        try:
            for port in block:
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        _HANDED.update(block)
        return base
    raise RuntimeError("no free port block")


def to_toml(data: Mapping[str, Any]) -> str:
    """Enough TOML for appliance configs: scalars, lists of strings, tables within tables ([servers.calc])."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    def table(prefix: str, items: Mapping[str, Any]) -> list[str]:
        lines = [f"{k} = {value(v)}" for k, v in items.items() if not isinstance(v, Mapping)]
        for k, v in items.items():
            if isinstance(v, Mapping):
                lines.append(f"\n[{prefix}{k}]")
                lines += table(f"{prefix}{k}.", v)
        return lines

    return "\n".join(table("", data)) + "\n"


def http(method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None,
         timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (no MCP client): status, headers (lower-case keys), body."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


_RUNNING: list[Appliance] = []


@dataclass
class Appliance:
    """One `mcp-appliance run` in its own directory."""

    base: Path
    settings: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.base / "appliance.toml"

    @property
    def port(self) -> int:
        return int(self.settings["http"]["port"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return self.url + self.settings.get("mcp", {}).get("path", "/mcp")

    @property
    def run_dir(self) -> Path:
        return Path(self.settings["run_dir"])

    @property
    def supervisor(self) -> SupervisorClient:
        return SupervisorClient(self.run_dir / "supervisor.sock")

    @property
    def log(self) -> str:
        return (self.base / "run.out").read_text(errors="replace")

    def command(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the CLI against this appliance's config and capture its output."""
        return subprocess.run(
            [sys.executable, "-m", "appliance", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env, **(env or {})},
        )

    def start(self) -> Appliance:
        """Write the config and start `mcp-appliance run` (does not wait)."""
        self.config_path.write_text(to_toml(self.settings))
        out = open(self.base / "run.out", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(self.config_path), "run"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.base,
            env={**os.environ, **self.env},
        )
        _RUNNING.append(self)
        return self

    def health(self) -> tuple[int, dict[str, Any]]:
        status, _, body = http("GET", self.url + "/health")
        return status, json.loads(body)

    def wait_healthy(self, timeout: float = 30, workers: int | None = None) -> dict[str, Any]:
        """Poll /health until it says ok (with `workers` serving, when given)."""

        def ok() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"mcp-appliance run exited with {self.proc.returncode}:\n{self.log}")
            status, doc = self.health()
            if status == 200 and doc["status"] == "ok" and (workers is None or doc["workers"]["serving"] == workers):
                return doc
            return None

        try:
            return wait_until(ok, timeout, f"appliance on port {self.port} healthy")
        except AssertionError:
            raise
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- run.out ---\n{self.log[-4000:]}") from None

    def worker_pid(self, index: int) -> int:
        info = {p.name: p for p in self.supervisor.processes()}
        return info[worker_process_name(index)].pid

    def stop(self, timeout: float = 40) -> None:
        """SIGTERM supervisord (it stops its children), then SIGKILL the group if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self in _RUNNING:
            _RUNNING.remove(self)


def new_appliance(workers: int = 2, env: Mapping[str, str] | None = None, max_workers: int | None = None,
                  **overrides: Any) -> Appliance:
    """An appliance config on fresh loopback ports in a fresh world-readable directory.

    `max_workers`: also keep the ports free that scaling up to that many workers needs.
    Keyword overrides are merged into the settings: tables (dicts) key by key.
    """
    base = Path(tempfile.mkdtemp(prefix="mcp-appliance-test-", dir="/tmp"))
    base.chmod(0o755)  # the workers may run as the unprivileged service user
    first = free_port_block(max(workers, max_workers or 0) + 2)
    settings: dict[str, Any] = {
        "run_dir": str(base / "run"),
        "log_dir": str(base / "log"),
        "data_dir": str(base / "data"),
        "http": {"host": "127.0.0.1", "port": first},
        "admin": {"port": first + 1},
        "workers": {"count": workers, "base_port": first + 2, "graceful_timeout": 5},
    }
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            settings.setdefault(key, {}).update(value)
        else:
            settings[key] = value
    return Appliance(base=base, settings=settings, env=dict(env or {}))


@contextlib.contextmanager
def running(app: Appliance) -> Iterator[Appliance]:
    """`app` started, with every worker serving, for the block; stopped after it whatever happens."""
    try:
        app.start()
        app.wait_healthy(timeout=60, workers=int(app.settings["workers"]["count"]))
        yield app
    finally:
        cleanup(app)


def cleanup(appliance: Appliance) -> None:
    """Stop it and remove its directory."""
    try:
        appliance.stop()
    finally:
        shutil.rmtree(appliance.base, ignore_errors=True)


@atexit.register
def _stop_leftovers() -> None:
    for appliance in list(_RUNNING):
        appliance.stop(timeout=10)
