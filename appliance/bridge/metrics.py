"""The bridge's Prometheus metrics (label `server`), in the workers' multiprocess files.

Defined here rather than in appliance/metrics.py so the bridge stays one package; they
follow its conventions: counters survive a worker's restart, the children gauge is a
live sum over the workers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BridgeMetrics:
    """What a worker's bridges count, one label set per server."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.children = Gauge("mcp_appliance_stdio_children", "stdio server child processes running, per server",
                              ["server"], multiprocess_mode="livesum", registry=registry)
        self.restarts = Counter("mcp_appliance_stdio_child_restarts", "stdio children that died unasked and were "
                                "started again, per server", ["server"], registry=registry)
        self.crash_looping = Gauge("mcp_appliance_stdio_crash_looping", "1 while a worker has stopped restarting a "
                                   "server's children (they died too often in a row)", ["server"],
                                   multiprocess_mode="livemax", registry=registry)
        self.refused = Counter("mcp_appliance_stdio_refused", "Requests refused by the bridge, per server and reason "
                               "(max_children, crash_loop, child_gone)", ["server", "reason"], registry=registry)

    def start(self, server: str) -> None:
        """Export the server's series from the start (a series that appears at 1 hides the first hit)."""
        self.children.labels(server).set(0)
        self.restarts.labels(server)
        self.crash_looping.labels(server).set(0)
        for reason in ("max_children", "crash_loop", "child_gone"):
            self.refused.labels(server, reason)


_METRICS: BridgeMetrics | None = None


def bridge_metrics() -> BridgeMetrics:
    """The process's one set (prometheus-client refuses a second registration of a name)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = BridgeMetrics()
    return _METRICS
