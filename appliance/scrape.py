"""What /metrics serves: every process's metric files merged, plus what only the admin app sees.

The admin app adds process CPU and memory per program (psutil on the pids supervisord
reports), worker readiness, nginx's stub_status, uptime, limits and build info.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import time
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx2
import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from appliance import __version__
from appliance.config import Settings
from appliance.metrics import EdgeEvents, GateMetrics, ProcessEvents, TraceMetrics, multiproc_dir, storage_errors
from appliance.runtime import live_worker_count
from appliance.supervisor import SupervisorUnavailable
from appliance.watchdog import WatchdogMetrics

CONTENT_TYPE = CONTENT_TYPE_LATEST


def remove_dead_gauges(path: Path) -> None:
    """Drop live-gauge files of processes that are gone (a missed exit event must not leave stale sessions)."""
    for name in glob.glob(str(path / "gauge_live*_*.db")):
        match = re.search(r"_(\d+)\.db$", name)
        if match and not psutil.pid_exists(int(match[1])):
            mark_process_dead(int(match[1]), str(path))


def _program_processes(pid: int, with_children: bool) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)] if with_children else [proc]


def process_families(programs: Iterable[tuple[str, int]]) -> list[Metric]:
    """CPU seconds, resident memory and liveness per supervised program (nginx with its worker processes)."""
    cpu = CounterMetricFamily("mcp_appliance_process_cpu_seconds", "CPU time of a supervised program (user + system)",
                              labels=["program"])
    rss = GaugeMetricFamily("mcp_appliance_process_resident_memory_bytes", "Resident memory of a supervised program",
                            labels=["program"])
    up = GaugeMetricFamily("mcp_appliance_process_up", "1 when supervisord reports the program RUNNING",
                           labels=["program"])
    for name, pid in programs:
        alive = 0
        if pid:
            try:
                procs = _program_processes(pid, with_children=name == "nginx")  # nginx: master + workers
                seconds = memory = 0.0
                for proc in procs:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        seconds += times.user + times.system
                        memory += proc.memory_info().rss
                cpu.add_metric([name], seconds)
                rss.add_metric([name], memory)
                alive = 1
            except psutil.Error:
                pass
        up.add_metric([name], alive)
    return [cpu, rss, up]


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroups(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> list[Path]:
    """This process's cgroup v2 directory and every parent up to the mount root, innermost first.

    Under systemd the appliance runs in system.slice/mcp-appliance.service, whose MemoryMax= and
    CPUQuota= are written there, not at the root; a limit of any parent binds as well.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return [root]
    own = next((line[3:] for line in lines if line.startswith("0::")), "/")
    path = root / own.strip("/")
    found = []
    while True:
        found.append(path)
        if path == root or root not in path.parents:
            return found
        path = path.parent


def memory_limit(cgroups: list[Path] | None = None) -> float:
    """The memory this appliance may use: the tightest memory.max of its cgroups, else the machine's RAM."""
    limit = psutil.virtual_memory().total
    for directory in _own_cgroups() if cgroups is None else cgroups:
        try:
            text = (directory / "memory.max").read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return float(limit)


def cpu_limit(cgroups: list[Path] | None = None) -> float:
    """CPUs this appliance may use: the tightest cpu.max quota of its cgroups, else the machine's count."""
    limit = float(os.cpu_count() or 1)
    for directory in _own_cgroups() if cgroups is None else cgroups:
        try:
            quota, period = (directory / "cpu.max").read_text().split()
            if quota != "max":
                limit = min(limit, int(quota) / int(period))
        except (OSError, ValueError):
            continue
    return limit


_STUB = re.compile(
    r"Active connections:\s*(\d+)\s+server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)\s+"
    r"Reading:\s*(\d+)\s+Writing:\s*(\d+)\s+Waiting:\s*(\d+)"
)


def nginx_families(stub_status: str | None) -> list[Metric]:
    """nginx's stub_status as metrics (nginx_up 0 when it did not answer)."""
    up = GaugeMetricFamily("mcp_appliance_nginx_up", "1 when nginx answered its stub_status")
    match = _STUB.search(stub_status or "")
    up.add_metric([], 1 if match else 0)
    if not match:
        return [up]
    active, accepted, handled, requests, reading, writing, waiting = (int(g) for g in match.groups())
    conns = GaugeMetricFamily("mcp_appliance_nginx_connections", "nginx client connections by state", labels=["state"])
    for state, value in (("active", active), ("reading", reading), ("writing", writing), ("waiting", waiting)):
        conns.add_metric([state], value)
    return [
        up, conns,
        CounterMetricFamily("mcp_appliance_nginx_connections_accepted", "Client connections nginx accepted", value=accepted),
        CounterMetricFamily("mcp_appliance_nginx_connections_handled", "Client connections nginx handled", value=handled),
        CounterMetricFamily("mcp_appliance_nginx_http_requests", "Client requests nginx served", value=requests),
    ]


class _Families:
    """A collector of families computed before the scrape is rendered."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def appliance_families(settings: Settings, supervisord_pid: int | None, ready_workers: int) -> list[Metric]:
    """Uptime, build info, limits and worker counts."""
    uptime = GaugeMetricFamily("mcp_appliance_uptime_seconds", "Seconds since supervisord started the appliance")
    try:
        started = psutil.Process(supervisord_pid).create_time() if supervisord_pid else None
    except psutil.Error:
        started = None
    uptime.add_metric([], time.time() - started if started else 0.0)
    build = InfoMetricFamily("mcp_appliance_build", "Versions of this appliance")
    build.add_metric([], {"version": settings.version, "appliance": __version__, "mcp_sdk": version("mcp"),
                          "service": settings.service_name, "environment": settings.environment})
    families: list[Metric] = [uptime, build]
    for name, doc, value in (
        ("mcp_appliance_workers_configured", "Worker processes configured (after a live `scale`)",
         live_worker_count(settings)),
        ("mcp_appliance_workers_ready", "Workers answering their health probe", ready_workers),
        ("mcp_appliance_cpu_limit", "CPUs the appliance may use (cgroup quota or machine)", cpu_limit()),
        ("mcp_appliance_memory_limit_bytes", "Memory the appliance may use (cgroup limit or machine)", memory_limit()),
    ):
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], value)
        families.append(family)
    return families


NGINX_STATUS_PATH = "/_appliance/nginx_status"


def nginx_status_url(settings: Settings) -> str:
    """nginx's stub_status location, reached on loopback (nginx allows nothing else there)."""
    host = settings.http.host
    if host in {"0.0.0.0", "::"}:
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.http.port}{NGINX_STATUS_PATH}"


async def nginx_stub_status(client: httpx2.AsyncClient, url: str, timeout: float = 1.0) -> str | None:
    """nginx's stub_status text, or None when nginx does not answer."""
    try:
        response = await client.get(url, timeout=timeout)
    except httpx2.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


async def scrape(settings: Settings, checker: Any) -> bytes:
    """The /metrics body: every process's files merged, plus programs, workers, nginx and build info.

    `checker` is the admin app's HealthChecker (supervisord client and worker probes).
    """
    (programs, _), (_, probes), stub = await asyncio.gather(
        checker.programs(), checker.ready(), nginx_stub_status(checker.client, nginx_status_url(settings)))
    try:
        supervisord_pid: int | None = await asyncio.to_thread(checker.supervisor.pid)
    except SupervisorUnavailable:  # its metrics are simply absent
        supervisord_pid = None
    ready = sum(1 for p in probes if p.get("ok"))
    pids = [(p.name, p.pid) for p in programs] + ([("supervisord", supervisord_pid)] if supervisord_pid else [])

    def build() -> bytes:
        families = [*process_families(pids), *nginx_families(stub), *appliance_families(settings, supervisord_pid, ready)]
        return render(families, multiproc_dir(settings.run_dir))

    return await asyncio.to_thread(build)


#: Least seconds between the starts of two scrapes: a flood of /metrics costs at most 1/SCRAPE_INTERVAL
#: scrapes per second, and a lone request waits at most this long.
SCRAPE_INTERVAL = 0.25


class SharedScrape:
    """The /metrics body, shared: every request that arrives before a scrape starts gets that scrape.

    So an answer is never older than its request (two scrapes in a row see what happened
    between them), yet a flood of requests costs one scrape per SCRAPE_INTERVAL.
    """

    def __init__(self, settings: Settings, checker: Any, interval: float = SCRAPE_INTERVAL) -> None:
        self.settings = settings
        self.checker = checker
        self.interval = interval
        #: The scrape that requests arriving now will get (it has not started yet).
        self._next: asyncio.Future[bytes] | None = None
        self._running: asyncio.Future[bytes] | None = None
        self._last_start = -interval

    async def body(self) -> bytes:
        """A scrape that starts after this call (shared with every call until it starts)."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._scrape_next())
        # Shielded: a client that gives up must not cancel the scrape the others wait for.
        return await asyncio.shield(self._next)

    async def _scrape_next(self) -> bytes:
        if self._running is not None:
            await asyncio.wait([self._running])
        delay = self._last_start + self.interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # From here on, new requests wait for the scrape after this one.
        self._running, self._next = self._next, None
        self._last_start = time.monotonic()
        try:
            return await scrape(self.settings, self.checker)
        finally:
            self._running = None


def render(families: list[Metric], multiproc: Path | None) -> bytes:
    """The exposition text: the processes' files merged, plus `families`."""
    registry = CollectorRegistry()
    if multiproc is not None and multiproc.is_dir():
        remove_dead_gauges(multiproc)
        MultiProcessCollector(registry, path=str(multiproc))
    registry.register(_Families(families))  # type: ignore[arg-type]
    return generate_latest(registry)


def exported_names(settings: Settings | None = None) -> set[str]:
    """Every sample name /metrics exports (what dashboards and alert rules may use)."""
    registry = CollectorRegistry()
    gate = GateMetrics(0, registry)
    gate.requests.labels("default", "tools/call", "200").inc()
    gate.latency.labels("default", "tools/call").observe(0.01)
    gate.tool_calls.labels("default", "x", "ok").inc()
    gate.tool_latency.labels("default", "x").observe(0.01)
    ProcessEvents(1, None, registry)
    TraceMetrics(registry)
    settings = settings or Settings()
    if any(server.command for server in settings.servers):
        # Only workers that run a stdio server export these (appliance/bridge/metrics.py).
        from appliance.bridge.metrics import BridgeMetrics

        BridgeMetrics(registry).start("x")
    storage_errors(registry).labels("full").inc()
    watchdog = WatchdogMetrics("worker", registry)
    watchdog.unresponsive.labels("0")
    watchdog.hang_restarts.labels("0")
    # The admin app's own process: its rate-limit counter shares its name with the workers'.
    edge = CollectorRegistry()
    EdgeEvents(edge)
    stub = "Active connections: 1\nserver accepts handled requests\n 1 1 1\nReading: 0 Writing: 1 Waiting: 0\n"
    static = [*process_families([("admin", os.getpid())]), *nginx_families(stub), *appliance_families(settings, None, 0)]
    registry.register(_Families(static))  # type: ignore[arg-type]
    # *_created samples exist only in single-process mode; /metrics (multiprocess) has none.
    families = [*registry.collect(), *edge.collect()]
    return {s.name for family in families for s in family.samples if not s.name.endswith("_created")}
