"""The HTTP server span of each request to the worker, when tracing is on (no layer at all when off).

The span's parent is the client's `traceparent` header (nginx passes it on unchanged),
or, for clients that only put it there, `params._meta.traceparent` of the JSON-RPC
body. A header is known at once: `ServerSpan` opens the span when the request arrives
and makes it current, so everything the gate and the hosted app do runs inside it. A
`_meta` parent is known only once the body is read: `MetaParent` (right after
`JsonRpcBody`) opens the span then, with the arrival time as its start. A request
refused before its body was read and without a header gets a span of a new trace.

The SDK's own span (`mcp/server/_otel.py`) takes the current span as parent, or the
`_meta` traceparent when there is one: `appliance.tracing.ContinuingPropagator` makes
the latter resolve to the gate's span too, so the SDK's span is always its child.

When the request is answered the span gets what the gate decided (from the Exchange):
the method, the tool, the status, the authorization decision and the refusal reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.exchange import Exchange, exchange
from appliance.gate.jsonrpc import read_body, replay
from appliance.tracing import SERVER, W3C, WORKER, parent_from_headers, trace_id_of

STATE_KEY = "appliance.trace"


@dataclass(slots=True)
class RequestTrace:
    """One request's span, opened as soon as its parent is known."""

    start_ns: int
    #: The layer that opens and ends it.
    layer: ServerSpan
    span: trace.Span | None = None


class ServerSpan:
    """Opens (from a `traceparent` header), annotates and ends the server span of every HTTP request."""

    def __init__(self, app: ASGIApp, tracer: Tracer, worker: int, path: str, server: str) -> None:
        self.app = app
        self.tracer = tracer
        self.worker = worker
        self.path = path.rstrip("/")
        # A span attribute, not the resource's: one worker hosts every [servers.<name>].
        self.server = server

    def open(self, scope: Scope, rt: RequestTrace, parent: Context | None) -> trace.Span:
        # Named for the route, not the path a client chose: span names must stay few.
        path = scope["path"]
        route = self.path if path == self.path or path.startswith(self.path + "/") else "other"
        span = self.tracer.start_span(f"{scope['method']} {route}", context=parent or Context(),
                                      kind=SpanKind.SERVER, start_time=rt.start_ns,
                                      attributes={"http.request.method": scope["method"], "url.path": scope["path"],
                                                  WORKER: self.worker, SERVER: self.server})
        rt.span = span
        ex = exchange(scope)
        if ex is not None:
            ex.trace_id = trace_id_of(span)
        return span

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rt = RequestTrace(time.time_ns(), self)
        scope.setdefault("state", {})[STATE_KEY] = rt
        carrier = _trace_headers(scope["headers"])
        parent = parent_from_headers(carrier) if carrier else None
        token = None
        if parent is not None:
            token = otel_context.attach(trace.set_span_in_context(self.open(scope, rt, parent), parent))

        async def traced_send(message: Message) -> None:
            if rt.span is None and message["type"] == "http.response.start":
                self.open(scope, rt, None)  # answered before a parent could be read: a trace of its own
            await send(message)

        try:
            await self.app(scope, receive, traced_send)
        finally:
            if token is not None:
                otel_context.detach(token)
            span = rt.span or self.open(scope, rt, None)
            annotate(span, exchange(scope))
            span.end()


class MetaParent:
    """Opens the server span from `params._meta.traceparent` when no header did (after JsonRpcBody)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state") or {}
        rt: RequestTrace | None = state.get(STATE_KEY)
        ex = exchange(scope)
        # Only a JSON-RPC body JsonRpcBody parsed (it replays it as one message) can name a parent.
        if rt is None or rt.span is not None or ex is None or ex.rpc is None:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)  # JsonRpcBody replays the whole body as one message: no copy
        if body is None:
            return
        parent = _meta_parent(body)
        span = rt.layer.open(scope, rt, parent)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, replay(body, receive), send)
        finally:
            otel_context.detach(token)


def _trace_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
    carrier = None
    for key, value in headers:
        if key == b"traceparent" or key == b"tracestate":
            carrier = carrier or {}
            carrier[key.decode()] = value.decode("latin-1")
    return carrier if carrier and "traceparent" in carrier else None


def _meta_parent(body: bytes) -> Context | None:
    """The W3C context in `params._meta` of a JSON-RPC request body (None without a valid one)."""
    if b"traceparent" not in body:  # most bodies: no second parse
        return None
    try:
        meta = json.loads(body)["params"]["_meta"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("traceparent"), str):
        return None
    carrier = {k: meta[k] for k in ("traceparent", "tracestate") if isinstance(meta.get(k), str)}
    ctx = W3C.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def annotate(span: trace.Span, ex: Exchange | None) -> None:
    """What the gate decided about the request, as attributes of its span."""
    if ex is None or not span.is_recording():
        return
    attributes: dict[str, Any] = {"http.response.status_code": ex.status, "mcp_appliance.outcome": ex.outcome,
                                  "mcp_appliance.request_id": ex.request_id}
    rpc = ex.rpc
    if rpc is not None and rpc.method is not None:
        attributes["mcp.method.name"] = rpc.method
        if rpc.kind == "tool" and rpc.name is not None:
            attributes["gen_ai.tool.name"] = rpc.name
        elif rpc.kind == "prompt" and rpc.name is not None:
            attributes["gen_ai.prompt.name"] = rpc.name
        elif rpc.kind == "resource" and rpc.name is not None:
            attributes["mcp.resource.uri"] = rpc.name
    if ex.protocol_version:
        attributes["mcp.protocol.version"] = ex.protocol_version
    if ex.authz is not None:
        attributes["mcp_appliance.authz.decision"], attributes["mcp_appliance.authz.reason"] = ex.authz
    if ex.denied:
        attributes["mcp_appliance.refusal.reason"] = ex.denied
    if ex.violation:
        attributes["mcp_appliance.violation"] = ex.violation
    span.set_attributes(attributes)
    if ex.status == 0 or ex.status >= 500:
        span.set_status(StatusCode.ERROR, f"HTTP {ex.status}" if ex.status else "no complete answer")
