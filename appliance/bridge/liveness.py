"""Hung stdio children: the workers' watchdog (appliance/watchdog.py) over one server's children.

A child that is alive but does not answer `ping` (a stopped process, a blocked event loop,
a deadlock) holds every call sent to it. The watchdog probes each live child every
PROBE_INTERVAL with an MCP ping; one that stays silent for workers.hang_timeout is
restarted like a hung worker: SIGTERM, then SIGKILL, to its guard's process group (the
guard then ends the child's group, appliance/bridge/guard.py). The bridge sees it go and
does what it does for any death: its sessions get 404, calls in flight on it a JSON-RPC
error, and a new child starts. The MCP spec asks every receiver to answer ping promptly,
also while it works on other requests; an error answer counts as an answer.
A child is never taken out of anything before that: requests are not queued elsewhere.
"""

from __future__ import annotations

import anyio
from mcp.shared.exceptions import MCPError

from appliance.bridge.child import Child
from appliance.bridge.children import Children
from appliance.watchdog import Probe, Target, WatchdogMetrics

_METRICS: WatchdogMetrics | None = None


def child_watchdog_metrics() -> WatchdogMetrics:
    """The process's one set (every stdio server of a worker counts into it, label = server)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = WatchdogMetrics("stdio_child")
    return _METRICS


def _ping(child: Child) -> Probe:
    async def probe(timeout: float) -> bool:
        session = child.session
        if session is None or child.gone.is_set():
            return False
        with anyio.move_on_after(timeout):
            try:
                await session.send_ping()
            except MCPError:
                pass  # an error answer (a server without ping) is an answer: it is reading its stdin
            except Exception:  # the pipe broke: the bridge is about to see it go
                return False
            return True
        return False

    return probe


class ChildFleet:
    """The `Watched` of one stdio server's children in this worker."""

    kind = "stdio_child"

    def __init__(self, children: Children) -> None:
        self.children = children

    async def targets(self) -> list[Target]:
        server = self.children.spec.server
        # Live children answered initialize: judged from the first probe (a hung one is not "starting").
        return [Target(f"{server}/{child.pid}", server, child.pid, _ping(child), ready=True)
                for child in list(self.children.live) if child.alive and child.pid]

    async def set_out(self, names: set[str]) -> None:
        return  # no pool to leave: a hung child's requests end when it is restarted

    async def already_out(self) -> set[str]:
        return set()

    async def cut(self, target: Target) -> int:
        return 0
