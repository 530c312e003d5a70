"""The gate: ASGI middleware in every worker, in front of the hosted servers.

Each concern is one small class; `build_gate` composes them in visible lists, outermost
first: the worker's own layers (probe, request id), the router to the server the path
names (appliance/routing.py), then one gate per server (its record, policy, path, …) whose
shared parts (authenticator, audit writer, rate table, session registry) are one per worker.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp

from appliance.config import ServerSettings, Settings, audit_refuses, server_table
from appliance.gate.audit import AuditGuard
from appliance.gate.buckets import SharedBuckets
from appliance.gate.auth import Authenticate
from appliance.gate.binding import SessionBinding
from appliance.gate.drain import Drain
from appliance.gate.hosts import HostOriginCheck
from appliance.gate.jsonrpc import JsonRpcBody
from appliance.gate.limits import BodyLimit, RateLimit
from appliance.gate.outcome import Outcome
from appliance.gate.policy import PolicyCheck
from appliance.gate.probe import HealthProbe
from appliance.gate.registry import ServerCaps, SessionRegistry
from appliance.gate.requests import RequestContext
from appliance.gate.services import GateServices, gate_services, open_buckets
from appliance.gate.sessions import SessionOwnership
from appliance.gate.stats import WorkerStats
from appliance.routing import ServerRouter


def build_gate(hosted: ASGIApp | Sequence[tuple[ServerSettings, ASGIApp]], settings: Settings, index: int,
               stats: WorkerStats, services: GateServices | None = None) -> ASGIApp:
    """Wrap the hosted servers for worker `index`: one app (the [mcp] server), or (server, app) pairs
    each behind a gate of its own (services: made from settings when not given)."""
    mcp = settings.mcp
    s = services or gate_services(settings, index)
    buckets = s.buckets or open_buckets(settings)
    # One registry per worker: the session caps hold across its servers.
    stats.sessions = SessionRegistry(mcp.session_idle_timeout, mcp.max_sessions, mcp.max_sessions_per_principal,
                                     s.metrics.sessions_changed)
    servers = [(settings.hosted_servers[0], hosted)] if callable(hosted) else list(hosted)
    routes = [(server.path, _server_gate(app, server, settings, index, stats, s, buckets)) for server, app in servers]
    layers = [
        lambda a: HealthProbe(a, stats),
        lambda a: RequestContext(a, stats),
    ]
    # One server (the usual case) needs no router: every request is its, as before servers existed.
    app: ASGIApp = ServerRouter(routes) if len(routes) > 1 else routes[0][1]
    for layer in reversed(layers):
        app = layer(app)
    return app


def _server_gate(app: ASGIApp, server: ServerSettings, settings: Settings, index: int, stats: WorkerStats,
                 s: GateServices, buckets: SharedBuckets | None) -> ASGIApp:
    """The layers in front of one hosted server, outermost first."""
    mcp = settings.mcp
    # Without verified credentials, a caller is known only by its address.
    by_address = settings.auth.mode == "none"
    # A server with a rate of its own counts its calls apart from limits.rate's shared budget.
    buckets = s.buckets_for(server.name, buckets)
    layers = [
        # Records every request from here on: audit line and metrics, once it is answered.
        outcome := lambda a: Outcome(a, s.sinks(index, settings.audit.raw_arguments, server.name)),
        lambda a: Drain(a, stats),
        lambda a: HostOriginCheck(a, mcp.allowed_hosts, mcp.allowed_origins),
        lambda a: BodyLimit(a, mcp.max_body_bytes),
        lambda a: Authenticate(a, s.authenticator, settings, server.path),
        # Per verified principal, before any work is done for it.
        *([lambda a: RateLimit(a, buckets, settings.limits.retry_after, by_address, s.metrics.refused)]
          if buckets is not None else []),
        # The body is read and parsed once, here, for the session caps, the policy, the audit record and the metrics.
        body := lambda a: JsonRpcBody(a, server.path),
        lambda a: SessionBinding(a, stats.sessions, by_address, s.metrics.refused, settings.limits.retry_after,
                                 ServerCaps(server.name, server.max_sessions, server.max_sessions_per_principal,
                                            server_table(server))),
        lambda a: PolicyCheck(a, s.policy_for(server.name)),
        lambda a: SessionOwnership(a, settings.node.ordinal, index),
    ]
    if settings.tracing.enabled:
        # Imported only when on: a worker with tracing off has no tracing layer and loads no SDK.
        from opentelemetry import trace

        from appliance.gate.tracing import MetaParent, ServerSpan
        tracer = trace.get_tracer("mcp-appliance")
        # Inside Outcome (its record has the span's trace id); the body's `_meta` parent is read after JsonRpcBody.
        layers.insert(layers.index(outcome) + 1, lambda a: ServerSpan(a, tracer, index, server.path, server.name))
        layers.insert(layers.index(body) + 1, MetaParent)
    if s.audit is not None and audit_refuses(settings):
        # Last, right before the hosted app: a call whose record would have no room never runs.
        layers.append(lambda a: AuditGuard(a, s.audit))  # type: ignore[arg-type]
    for layer in reversed(layers):
        app = layer(app)
    return app


__all__ = ["GateServices", "WorkerStats", "build_gate", "gate_services"]
