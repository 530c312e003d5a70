"""The gate: ASGI middleware in every worker, in front of the hosted app.

Each concern is one small class; `build_gate` composes them in one visible list,
outermost first.
"""

from __future__ import annotations

from starlette.types import ASGIApp

from appliance.config import Settings
from appliance.gate.hosts import HostOriginCheck
from appliance.gate.limits import BodyLimit
from appliance.gate.probe import HealthProbe
from appliance.gate.requests import RequestContext
from appliance.gate.sessions import SessionOwnership
from appliance.gate.stats import WorkerStats


def build_gate(app: ASGIApp, settings: Settings, index: int, stats: WorkerStats) -> ASGIApp:
    """Wrap the hosted `app` for worker `index`."""
    mcp = settings.mcp
    layers = [
        lambda a: HealthProbe(a, stats),
        lambda a: RequestContext(a, stats),
        lambda a: HostOriginCheck(a, mcp.allowed_hosts, mcp.allowed_origins),
        lambda a: BodyLimit(a, mcp.max_body_bytes),
        lambda a: SessionOwnership(a, settings.node.ordinal, index, stats),
    ]
    for layer in reversed(layers):
        app = layer(app)
    return app


__all__ = ["WorkerStats", "build_gate"]
