"""The gate: ASGI middleware in every worker, in front of the hosted app.

Each concern is one small class; `build_gate` composes them in one visible list,
outermost first.
"""

from __future__ import annotations

from starlette.types import ASGIApp

from appliance.config import Settings, audit_refuses
from appliance.gate.audit import AuditGuard
from appliance.gate.auth import Authenticate
from appliance.gate.binding import SessionBinding
from appliance.gate.drain import Drain
from appliance.gate.hosts import HostOriginCheck
from appliance.gate.jsonrpc import JsonRpcBody
from appliance.gate.limits import BodyLimit, RateLimit
from appliance.gate.outcome import Outcome
from appliance.gate.policy import PolicyCheck
from appliance.gate.probe import HealthProbe
from appliance.gate.registry import SessionRegistry
from appliance.gate.requests import RequestContext
from appliance.gate.services import GateServices, gate_services, open_buckets
from appliance.gate.sessions import SessionOwnership
from appliance.gate.stats import WorkerStats


def build_gate(app: ASGIApp, settings: Settings, index: int, stats: WorkerStats,
               services: GateServices | None = None) -> ASGIApp:
    """Wrap the hosted `app` for worker `index` (services: made from settings when not given)."""
    mcp = settings.mcp
    s = services or gate_services(settings, index)
    buckets = s.buckets or open_buckets(settings)
    # Without verified credentials, a caller is known only by its address.
    by_address = settings.auth.mode == "none"
    stats.sessions = SessionRegistry(mcp.session_idle_timeout, mcp.max_sessions, mcp.max_sessions_per_principal,
                                     s.metrics.sessions_changed)
    layers = [
        lambda a: HealthProbe(a, stats),
        lambda a: RequestContext(a, stats),
        # Records every request from here on: audit line and metrics, once it is answered.
        outcome := lambda a: Outcome(a, s.sinks(index, settings.audit.raw_arguments)),
        lambda a: Drain(a, stats),
        lambda a: HostOriginCheck(a, mcp.allowed_hosts, mcp.allowed_origins),
        lambda a: BodyLimit(a, mcp.max_body_bytes),
        lambda a: Authenticate(a, s.authenticator, settings),
        # Per verified principal, before any work is done for it.
        *([lambda a: RateLimit(a, buckets, settings.limits.retry_after, by_address, s.metrics.refused)]
          if buckets is not None else []),
        # The body is read and parsed once, here, for the session caps, the policy, the audit record and the metrics.
        body := lambda a: JsonRpcBody(a, mcp.path),
        lambda a: SessionBinding(a, stats.sessions, by_address, s.metrics.refused, settings.limits.retry_after),
        lambda a: PolicyCheck(a, s.policy),
        lambda a: SessionOwnership(a, settings.node.ordinal, index),
    ]
    if settings.tracing.enabled:
        # Imported only when on: a worker with tracing off has no tracing layer and loads no SDK.
        from opentelemetry import trace

        from appliance.gate.tracing import MetaParent, ServerSpan
        tracer = trace.get_tracer("mcp-appliance")
        # Inside Outcome (its record has the span's trace id); the body's `_meta` parent is read after JsonRpcBody.
        layers.insert(layers.index(outcome) + 1, lambda a: ServerSpan(a, tracer, index, mcp.path))
        layers.insert(layers.index(body) + 1, MetaParent)
    if s.audit is not None and audit_refuses(settings):
        # Last, right before the hosted app: a call whose record would have no room never runs.
        layers.append(lambda a: AuditGuard(a, s.audit))  # type: ignore[arg-type]
    for layer in reversed(layers):
        app = layer(app)
    return app


__all__ = ["GateServices", "WorkerStats", "build_gate", "gate_services"]
