"""The gate's metrics sink: one finished request becomes counter and histogram updates.

Seven values change per tools/call (three counters, two histograms of two values each).
prometheus-client's multiprocess value takes a lock and calls getpid() (a syscall, to
notice a fork) on every change; a worker never forks and changes its metrics on the
event loop's thread only, so `_bump` writes the new value straight into the same mmap
slot: the file holds every count the moment the request is recorded, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from appliance.config import DEFAULT_SERVER
from appliance.gate.exchange import Exchange
from appliance.metrics import KNOWN_METHODS, GateMetrics


def _bump(value: Any) -> Callable[[float], None]:
    """`value.inc` without the lock and fork check when it is a multiprocess (mmap) value."""
    file, key = getattr(value, "_file", None), getattr(value, "_key", None)
    if file is None or key is None:  # the single-process value (no PROMETHEUS_MULTIPROC_DIR): its own inc
        return value.inc  # type: ignore[no-any-return]

    def inc(amount: float) -> None:
        value._value += amount
        file.write_value(key, value._value, 0.0)

    return inc


class _Counter:
    """One labelled counter child: inc()."""

    def __init__(self, child: Any) -> None:
        self.inc_by = _bump(child._value)

    def inc(self) -> None:
        self.inc_by(1.0)


class _Histogram:
    """One labelled histogram child: observe(), as prometheus-client stores it (sum, one bucket per value)."""

    def __init__(self, child: Any) -> None:
        self.sum = _bump(child._sum)
        self.bounds = tuple(child._upper_bounds)
        self.buckets = tuple(_bump(b) for b in child._buckets)

    def observe(self, amount: float) -> None:
        self.sum(amount)
        for bound, bucket in zip(self.bounds, self.buckets):
            if amount <= bound:
                bucket(1.0)
                break


class _Children:
    """Labelled children of one metric, looked up once per label set (labels() takes a lock each time)."""

    def __init__(self, labels: Callable[..., Any], kind: Callable[[Any], Any]) -> None:
        self.labels = labels
        self.kind = kind
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.kind(self.labels(*values))
        return child


class RequestMetrics:
    """Counts a finished request: by method and status, its latency, tool outcome, authz and violations."""

    def __init__(self, metrics: GateMetrics, server: str = DEFAULT_SERVER) -> None:
        self.m = metrics
        # The request metrics carry the hosted server's name first (one sink per server).
        self.requests = _Children(partial(metrics.requests.labels, server), _Counter)
        self.latency = _Children(partial(metrics.latency.labels, server), _Histogram)
        self.tool_calls = _Children(partial(metrics.tool_calls.labels, server), _Counter)
        self.tool_latency = _Children(partial(metrics.tool_latency.labels, server), _Histogram)
        self.authz = _Children(metrics.authz.labels, _Counter)
        self.violations = _Children(metrics.violations.labels, _Counter)

    def __call__(self, ex: Exchange, duration: float) -> None:
        rpc = ex.rpc
        if rpc is not None:
            method = rpc.method or "response"
            if method not in KNOWN_METHODS:
                method = "other"
        elif ex.violation == "malformed_jsonrpc":
            method = "invalid"
        else:
            method = ex.http_method if ex.http_method in {"GET", "DELETE", "POST"} else "other"
        self.requests(method, str(ex.status)).inc()
        self.latency(method).observe(duration)
        if rpc is not None and rpc.method == "tools/call":
            tool = self.m.tool_label(rpc.name)
            self.tool_calls(tool, ex.outcome).inc()
            self.tool_latency(tool).observe(duration)
        if ex.authz is not None:
            self.authz(*ex.authz).inc()
        if ex.violation is not None:
            self.violations(ex.violation).inc()
