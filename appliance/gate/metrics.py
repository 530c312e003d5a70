"""The gate's metrics sink: one finished request becomes counter and histogram updates."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from appliance.config import DEFAULT_SERVER
from appliance.gate.exchange import Exchange
from appliance.metrics import KNOWN_METHODS, GateMetrics


class _Children:
    """Labelled children of one metric, looked up once per label set (labels() takes a lock each time)."""

    def __init__(self, labels: Callable[..., Any]) -> None:
        self.labels = labels
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.labels(*values)
        return child


class RequestMetrics:
    """Counts a finished request: by method and status, its latency, tool outcome, authz and violations."""

    def __init__(self, metrics: GateMetrics, server: str = DEFAULT_SERVER) -> None:
        self.m = metrics
        # The request metrics carry the hosted server's name first (one sink per server).
        self.requests = _Children(partial(metrics.requests.labels, server))
        self.latency = _Children(partial(metrics.latency.labels, server))
        self.tool_calls = _Children(partial(metrics.tool_calls.labels, server))
        self.tool_latency = _Children(partial(metrics.tool_latency.labels, server))
        self.authz = _Children(metrics.authz.labels)
        self.violations = _Children(metrics.violations.labels)

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
