"""Prometheus metrics of the whole appliance, served by the admin app at /metrics.

Workers, the admin app and the event listener write their counters, histograms and
gauges to prometheus-client's multiprocess files under <run_dir>/metrics (the
environment variable PROMETHEUS_MULTIPROC_DIR, set for them in supervisord.conf; the
directory is emptied when `run` starts). The admin app merges the files at scrape time
and adds what only it can see: process CPU and memory per program (psutil on the pids
supervisord reports), worker readiness, nginx's stub_status, uptime and build info.

Counters of a dead process stay in its files, so totals never go back when a worker
restarts; gauges use the "live" modes and the files of dead processes are removed.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx2
import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from appliance import __version__
from appliance.config import Settings
from appliance.runtime import live_worker_count
from appliance.supervisor import SupervisorUnavailable

logger = logging.getLogger("appliance.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Security violation kinds, all exported from the start (a series that appears at 1 hides the first hit).
VIOLATIONS = ("bad_credential", "bad_host", "bad_origin", "oversize", "policy", "malformed_jsonrpc", "session_owner")
#: JSON-RPC methods kept as label values; anything else a client sends is counted as "other".
KNOWN_METHODS = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get", "resources/list",
    "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "completion/complete", "logging/setLevel", "notifications/initialized", "notifications/cancelled",
    "notifications/progress", "notifications/roots/list_changed", "batch", "response",
})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Distinct tool label values one process reports before it folds the rest into "other".
MAX_TOOL_LABELS = 200


def multiproc_dir(run_dir: Path) -> Path:
    """Where the processes keep their metric files."""
    return run_dir / "metrics"


def reset_multiproc_dir(path: Path, owner: tuple[int, int] | None) -> None:
    """Empty the metrics directory (at `run`): counters start from zero with a fresh appliance."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if owner is not None:
        os.chown(path, *owner)


class GateMetrics:
    """What each worker's gate counts."""

    def __init__(self, worker: int, registry: CollectorRegistry | None = None) -> None:
        self.worker = str(worker)
        self.requests = Counter("mcp_appliance_requests", "MCP requests answered by the workers, by JSON-RPC method "
                                "(or HTTP method for GET/DELETE) and HTTP status", ["method", "status"], registry=registry)
        self.latency = Histogram("mcp_appliance_request_duration_seconds", "Time from a request reaching a worker "
                                 "to its answer", ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.tool_calls = Counter("mcp_appliance_tool_calls", "tools/call requests by tool and outcome "
                                  "(ok, tool_error, denied, protocol_error)", ["tool", "outcome"], registry=registry)
        self.tool_latency = Histogram("mcp_appliance_tool_call_duration_seconds", "Duration of tools/call requests "
                                      "by tool", ["tool"], buckets=LATENCY_BUCKETS, registry=registry)
        self.authz = Counter("mcp_appliance_authz_decisions", "Authorization decisions: allowed or denied, by reason",
                             ["decision", "reason"], registry=registry)
        self.violations = Counter("mcp_appliance_security_violations", "Requests refused as a security violation, "
                                  "by kind", ["kind"], registry=registry)
        self.sessions = Gauge("mcp_appliance_sessions_open", "Legacy MCP sessions open per worker", ["worker"],
                              multiprocess_mode="livesum", registry=registry)
        self.audit_errors = Counter("mcp_appliance_audit_write_errors", "Audit records that could not be written",
                                    registry=registry)
        for kind in VIOLATIONS:
            self.violations.labels(kind)
        for decision, reason in (("allowed", "authenticated"), ("denied", "bad_credential"), ("denied", "missing_scope")):
            self.authz.labels(decision, reason)
        self.sessions.labels(self.worker).set(0)
        self._tools: set[str] = set()

    def tool_label(self, name: str | None) -> str:
        """The tool's name as a label, bounded: tool names come from clients."""
        if name is None:
            return "none"
        if name in self._tools:
            return name
        if len(self._tools) >= MAX_TOOL_LABELS or len(name) > 64:
            return "other"
        self._tools.add(name)
        return name

    def sessions_changed(self, count: int) -> None:
        self.sessions.labels(self.worker).set(count)


class ProcessEvents:
    """The event listener's part: worker restarts, and dead processes' live gauges removed."""

    def __init__(self, workers: int, directory: Path | None, registry: CollectorRegistry | None = None) -> None:
        self.directory = directory
        self.restarts = Counter("mcp_appliance_worker_restarts", "Automatic restarts of a worker after it exited",
                                ["worker"], registry=registry)
        for k in range(workers):
            self.restarts.labels(str(k))

    def __call__(self, event: str, fields: dict[str, str]) -> None:
        pid = fields.get("pid")
        if event in {"PROCESS_STATE_EXITED", "PROCESS_STATE_STOPPED"} and pid and pid.isdigit() and self.directory:
            mark_process_dead(int(pid), str(self.directory))
        name = fields.get("processname", "")
        # Each worker is its own program and group "worker-NN" (see supervisord.conf.j2).
        if (event == "PROCESS_STATE_STARTING" and fields.get("groupname") == name
                and fields.get("from_state") in {"EXITED", "BACKOFF"} and name.startswith("worker-")):
            self.restarts.labels(str(int(name.removeprefix("worker-")))).inc()


class EdgeEvents(asyncio.DatagramProtocol):
    """Counts nginx's 429 and 5xx answers: nginx logs each as a syslog datagram to a unix socket here.

    nginx's own counters (stub_status) do not split answers by status, and these are the
    two that matter: clients turned away by a limit, and failures (a worker's or nginx's).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.limited = Counter("mcp_appliance_rate_limited", "Requests nginx refused with 429, by limit "
                               "(request rate or connections)", ["limit"], registry=registry)
        self.errors = Counter("mcp_appliance_http_errors", "5xx answers nginx sent to clients (from a worker or "
                              "its own: no worker, worker died), by status", ["status"], registry=registry)
        for limit in ("request", "connection"):
            self.limited.labels(limit)
        for status in ("500", "502", "503", "504"):
            self.errors.labels(status)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # "<190>Jan  1 00:00:00 edge: rate_limited_request" -> the word after the tag
        event = data.rsplit(b": ", 1)[-1].strip().decode("ascii", "replace")
        if event.startswith("rate_limited_"):
            limit = event.removeprefix("rate_limited_")
            self.limited.labels(limit if limit in {"request", "connection"} else "other").inc()
        elif event.startswith("http_error_") and event[11:].isdigit():
            self.errors.labels(event[11:]).inc()

    async def listen(self, path: Path) -> asyncio.DatagramTransport:
        """Bind the socket nginx sends to (replacing a stale one)."""
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        os.chmod(path, 0o660)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        return transport


def edge_socket(run_dir: Path) -> Path:
    """The datagram socket nginx reports 429 and 5xx answers to (nginx.conf.j2 uses this path)."""
    return run_dir / "nginx-edge.sock"


async def listen_for_edge_events(settings: Settings) -> asyncio.DatagramTransport | None:
    """In the admin app: count nginx's 429 and 5xx answers (None when the socket cannot be bound)."""
    try:
        return await EdgeEvents().listen(edge_socket(settings.run_dir))
    except OSError as exc:
        logger.warning("not counting nginx's 429 and 5xx answers: cannot bind %s: %s", edge_socket(settings.run_dir), exc)
        return None


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


def memory_limit() -> float:
    """The memory this appliance may use: its cgroup's limit, else the machine's RAM."""
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            return float(min(int(text), psutil.virtual_memory().total))
    except OSError:
        pass
    return float(psutil.virtual_memory().total)


def cpu_limit() -> float:
    """CPUs this appliance may use: its cgroup's quota, else the machine's count."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return min(int(quota) / int(period), float(os.cpu_count() or 1))
    except (OSError, ValueError):
        pass
    return float(os.cpu_count() or 1)


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
    gate.requests.labels("tools/call", "200").inc()
    gate.latency.labels("tools/call").observe(0.01)
    gate.tool_calls.labels("x", "ok").inc()
    gate.tool_latency.labels("x").observe(0.01)
    ProcessEvents(1, None, registry)
    EdgeEvents(registry)
    settings = settings or Settings()
    stub = "Active connections: 1\nserver accepts handled requests\n 1 1 1\nReading: 0 Writing: 1 Waiting: 0\n"
    static = [*process_families([("admin", os.getpid())]), *nginx_families(stub), *appliance_families(settings, None, 0)]
    registry.register(_Families(static))  # type: ignore[arg-type]
    # *_created samples exist only in single-process mode; /metrics (multiprocess) has none.
    return {s.name for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}
