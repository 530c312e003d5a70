"""The appliance's Prometheus metrics, as each process records them.

Workers, the admin app and the event listener write their counters, histograms and
gauges to prometheus-client's multiprocess files under <run_dir>/metrics (the
environment variable PROMETHEUS_MULTIPROC_DIR, set for them in supervisord.conf; the
directory is emptied when `run` starts). appliance/scrape.py merges them for /metrics.
Workers import this module and not that one: what only the admin app needs (psutil,
the supervisord client) stays out of every worker's memory.

Counters of a dead process stay in its files, so totals never go back when a worker
restarts; gauges use the "live" modes and the files of dead processes are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import mark_process_dead

from appliance.config import Settings

logger = logging.getLogger("appliance.metrics")

#: Security violation kinds, all exported from the start (a series that appears at 1 hides the first hit).
VIOLATIONS = ("bad_credential", "bad_host", "bad_origin", "oversize", "policy", "malformed_jsonrpc", "session_owner")
#: JSON-RPC methods kept as label values; anything else a client sends is counted as "other".
KNOWN_METHODS = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get", "resources/list",
    "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "completion/complete", "logging/setLevel", "notifications/initialized", "notifications/cancelled",
    "notifications/progress", "notifications/roots/list_changed", "batch", "response",
})
#: One metric for every refusal by a limit, whichever process refused (nginx's through the admin app).
LIMITED_HELP = ("Requests refused by a limit, by limit: request and connection (nginx, per client address), "
                "principal and client (the workers' shared rate per verified principal, or per address without one), "
                "principal_sessions and sessions (legacy session caps), server_principal_sessions and "
                "server_sessions (a [servers.<name>] table's own session caps), limiter_error (the shared table "
                "unusable)")
#: The workers' limits, all exported from the start.
GATE_LIMITS = ("principal", "client", "principal_sessions", "sessions", "server_principal_sessions",
               "server_sessions", "limiter_error")
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


def audit_write_errors(registry: CollectorRegistry | None = None) -> Counter:
    """The count of failed audit writes (records, or the space reserved for them), in any process."""
    return Counter("mcp_appliance_audit_write_errors", "Failed writes of audit records or of the space reserved "
                   "for them (disk full, read-only, permissions)", registry=registry)


def storage_errors(registry: CollectorRegistry | None = None) -> Counter:
    """Writes of a hosted server's data that the storage refused, by reason (the default notes server counts)."""
    return Counter("mcp_appliance_storage_errors", "Writes of hosted data the storage refused, by reason "
                   "(full, read_only, io_error, cannot_open, database_unavailable)", ["reason"], registry=registry)


#: Why a span never reached the trace receiver.
TRACE_DROP_REASONS = ("queue_full", "export_failed")


class TraceMetrics:
    """What a process with tracing on counts of its spans (appliance/tracing.py); updated from the export thread."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.exported = Counter("mcp_appliance_trace_spans_exported", "Spans the trace receiver accepted",
                                registry=registry)
        self.drops = Counter("mcp_appliance_trace_spans_dropped", "Spans that never reached the trace receiver, by "
                             "reason: queue_full (the receiver is down or slower than the spans come; the queue of "
                             "tracing.queue_size is full) or export_failed (the receiver refused or did not answer "
                             "within tracing.export_timeout)", ["reason"], registry=registry)
        self._drops = {reason: self.drops.labels(reason) for reason in TRACE_DROP_REASONS}

    def dropped(self, reason: str, count: int = 1) -> None:
        self._drops[reason].inc(count)


class GateMetrics:
    """What each worker's gate counts."""

    def __init__(self, worker: int, registry: CollectorRegistry | None = None) -> None:
        self.worker = str(worker)
        self.requests = Counter("mcp_appliance_requests", "MCP requests answered by the workers, by JSON-RPC method "
                                "(or HTTP method for GET/DELETE) and HTTP status, by hosted server", ["server", "method", "status"], registry=registry)
        self.latency = Histogram("mcp_appliance_request_duration_seconds", "Time from a request reaching a worker "
                                 "to its answer, by hosted server", ["server", "method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.tool_calls = Counter("mcp_appliance_tool_calls", "tools/call requests by tool and outcome "
                                  "(ok, tool_error, denied, protocol_error), by hosted server", ["server", "tool", "outcome"], registry=registry)
        self.tool_latency = Histogram("mcp_appliance_tool_call_duration_seconds", "Duration of tools/call requests "
                                      "by hosted server and tool", ["server", "tool"], buckets=LATENCY_BUCKETS, registry=registry)
        self.authz = Counter("mcp_appliance_authz_decisions", "Authorization decisions: allowed or denied, by reason",
                             ["decision", "reason"], registry=registry)
        self.violations = Counter("mcp_appliance_security_violations", "Requests refused as a security violation, "
                                  "by kind", ["kind"], registry=registry)
        self.sessions = Gauge("mcp_appliance_sessions_open", "Legacy MCP sessions open per worker", ["worker"],
                              multiprocess_mode="livesum", registry=registry)
        self.audit_errors = audit_write_errors(registry)
        self.limited = Counter("mcp_appliance_rate_limited", LIMITED_HELP, ["limit"], registry=registry)
        self._limited = {limit: self.limited.labels(limit) for limit in GATE_LIMITS}
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

    def refused(self, limit: str) -> None:
        """Count a request a worker refused by a limit (one of GATE_LIMITS)."""
        self._limited[limit].inc()


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


class EdgeEvents:
    """Counts nginx's 429 and 5xx answers: nginx logs each as a syslog datagram to a unix socket here.

    nginx's own counters (stub_status) do not split answers by status, and these are the
    two that matter: clients turned away by a limit, and failures (a worker's or nginx's).
    A thread of its own reads them: a unix datagram socket queues only
    net.unix.max_dgram_qlen (often 10) datagrams, after which nginx drops what it sends, and
    the admin app's event loop can be busy with a scrape just when a flood is refused.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.limited = Counter("mcp_appliance_rate_limited", LIMITED_HELP, ["limit"], registry=registry)
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

    def listen(self, path: Path) -> socket.socket:
        """Bind the socket nginx sends to (replacing a stale one) and read it in a thread until it is closed."""
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        os.chmod(path, 0o660)
        threading.Thread(target=self._read, args=(sock,), name="edge-events", daemon=True).start()
        return sock

    def _read(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(512)
            except OSError:  # closed at shutdown
                return
            if not data:
                return
            self.datagram_received(data, None)


def edge_socket(run_dir: Path) -> Path:
    """The datagram socket nginx reports 429 and 5xx answers to (nginx.conf.j2 uses this path)."""
    return run_dir / "nginx-edge.sock"


def listen_for_edge_events(settings: Settings) -> socket.socket | None:
    """In the admin app: count nginx's 429 and 5xx answers (None when the socket cannot be bound); close it to stop."""
    try:
        return EdgeEvents().listen(edge_socket(settings.run_dir))
    except OSError as exc:
        logger.warning("not counting nginx's 429 and 5xx answers: cannot bind %s: %s", edge_socket(settings.run_dir), exc)
        return None
