"""Tracing through a real appliance: nginx, the gate, the SDK's span, the audit trail and the logs.

No OpenTelemetry Collector (or Jaeger, Tempo) binary is installable here, so a small
OTLP/HTTP receiver written in this file stands in for one: it decodes the real
`ExportTraceServiceRequest` protobuf (opentelemetry-proto) that the appliance's OTLP
exporter sends, exactly as a collector would, and answers as one does.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.harness import Appliance, free_port_block, http, new_appliance, running, wait_until
from tests.integration.clients import LEGACY_VERSION, legacy_request_headers, modern_request
from tests.integration.gatekit import add_key, audit_records, bearer, call, write_config
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.integration

FIXTURE_APP = Path(__file__).with_name("traced_app.py")
HEADER_TOKEN = "Bearer receiver-" + secrets.token_hex(8)


@dataclass
class Span:
    """One span as the receiver decoded it."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    scope: str
    kind: int
    status: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    trace_state: str = ""


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint on loopback: records spans and the headers of each export."""

    port: int
    spans: list[Span] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: While cleared, every export waits (a slow receiver); set: answered at once.
    answering: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def receive(self, headers: dict[str, str], body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.headers.append(headers)
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                               ss.scope.name, s.kind, s.status.code,
                                               {a.key: _value(a.value) for a in s.attributes}, resource,
                                               s.trace_state))

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@contextlib.contextmanager
def receiver(answering: bool = True) -> Iterator[Receiver]:
    rec = Receiver(free_port_block(1))
    if answering:
        rec.answering.set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.answering.wait(60)  # a slow receiver holds the export until the test ends
            rec.receive({k.lower(): v for k, v in self.headers.items()}, body)
            out = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", rec.port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.answering.set()
        server.shutdown()
        server.server_close()


def traced_appliance(endpoint: str, **tracing: Any) -> Appliance:
    app = new_appliance(2, auth={"mode": "api_keys"}, mcp={"app": "traced_app:server", "allowed_hosts": ["127.0.0.1:*"]},
                        policy={"rules": ["tool:add = math"]},
                        tracing={"enabled": True, "endpoint": endpoint, "export_timeout": 1.0, **tracing})
    shutil.copy(FIXTURE_APP, app.base / "traced_app.py")
    app.env["PYTHONPATH"] = str(app.base)
    # A stdio server beside it: the bridge's call to its child belongs to the caller's trace too.
    app.settings["servers"] = {"tiny": {"command": ["node", str(TINY)]}}
    return app


TINY = Path(__file__).with_name("tiny_stdio_server.mjs")


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, parent span id) of a sampled client span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def add_call(app: Appliance, key: str | None, traceparent: str | None = None, in_meta: bool = False,
             request_id: str | None = None) -> tuple[int, Any]:
    """One 2026-07-28 tools/call of `add`, with the traceparent as a header or only in `_meta`."""
    headers, raw = modern_request("tools/call", "add", {"name": "add", "arguments": {"a": 2, "b": 3}})
    if key:
        headers.update(bearer(key))
    if request_id:
        headers["X-Request-ID"] = request_id
    if traceparent and in_meta:
        body = json.loads(raw)
        body["params"]["_meta"]["traceparent"] = traceparent
        raw = json.dumps(body).encode()
    elif traceparent:
        headers["traceparent"] = traceparent
    status, _, out = http("POST", app.mcp_url, raw, headers)
    return status, out


def worker_log_lines(app: Appliance) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(Path(app.settings["log_dir"]).glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
    return lines


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Appliance, Receiver, dict[str, str]]]:
    with receiver() as rec:
        app = traced_appliance(rec.endpoint, headers_file="")
        headers_file = app.base / "otlp-headers"
        headers_file.write_text(f"# sent with every export\nAuthorization: {HEADER_TOKEN}\n")
        app.settings["tracing"]["headers_file"] = str(headers_file)
        write_config(app)
        keys = {"math": add_key(app, "alice", "math"), "none": add_key(app, "bob")}
        with running(app):
            yield app, rec, keys


def server_and_sdk_spans(rec: Receiver, trace_id: str) -> tuple[Span, Span]:
    def both() -> tuple[Span, Span] | None:
        spans = rec.trace(trace_id)
        gate = [s for s in spans if s.scope == "mcp-appliance"]
        sdk = [s for s in spans if s.scope == "mcp-python-sdk"]
        return (gate[0], sdk[0]) if gate and sdk else None

    return wait_until(both, 20, f"the gate's and the SDK's spans of trace {trace_id} at the receiver")


@pytest.mark.parametrize("in_meta", [False, True], ids=["traceparent-header", "traceparent-in-meta"])
def test_a_tool_call_makes_one_trace_with_the_sdks_span_under_the_gates(traced: Any, in_meta: bool) -> None:
    app, rec, keys = traced
    traceparent, trace_id, client_span = new_traceparent()
    status, _ = add_call(app, keys["math"], traceparent, in_meta=in_meta)
    assert status == 200
    gate, sdk = server_and_sdk_spans(rec, trace_id)
    assert gate.parent_span_id == client_span
    assert sdk.parent_span_id == gate.span_id
    assert gate.attributes["gen_ai.tool.name"] == "add" and sdk.attributes["gen_ai.tool.name"] == "add"
    assert gate.attributes["mcp.method.name"] == "tools/call"
    assert gate.attributes["http.response.status_code"] == 200
    assert gate.attributes["mcp_appliance.outcome"] == "ok"
    assert gate.attributes["mcp_appliance.authz.decision"] == "allowed"
    worker = gate.attributes["mcp_appliance.worker.index"]
    assert worker in (0, 1) and gate.resource["mcp_appliance.worker.index"] == worker
    assert gate.resource["service.name"] == "mcp-appliance"
    assert gate.attributes["mcp_appliance.server.name"] == "default"  # the [mcp] server
    assert rec.headers[-1].get("authorization") == HEADER_TOKEN  # from tracing.headers_file


@pytest.mark.parametrize("in_meta", [False, True], ids=["traceparent-header", "traceparent-in-meta"])
def test_the_audit_record_and_the_log_line_name_the_calls_trace(traced: Any, in_meta: bool) -> None:
    app, rec, keys = traced
    traceparent, trace_id, _ = new_traceparent()
    request_id = "trace-audit-" + secrets.token_hex(4)
    assert add_call(app, keys["math"], traceparent, in_meta=in_meta, request_id=request_id)[0] == 200
    record = wait_until(lambda: [r for r in audit_records(app) if r["request_id"] == request_id], 10, "audit record")[0]
    assert record["trace_id"] == trace_id
    line = wait_until(lambda: [x for x in worker_log_lines(app) if x.get("logger") == "traced_app"
                               and x.get("request_id") == request_id], 10, "the tool's log line")[0]
    assert line["trace_id"] == trace_id


def test_refused_calls_have_a_span_naming_the_refusal(traced: Any) -> None:
    app, rec, keys = traced
    for key, status, reason in ((keys["none"], 403, "missing_scope"), (None, 401, "missing_credential")):
        traceparent, trace_id, _ = new_traceparent()
        request_id = f"refused-{status}-" + secrets.token_hex(4)
        assert add_call(app, key, traceparent, request_id=request_id)[0] == status
        span = wait_until(lambda: rec.trace(trace_id), 20, f"the span of the {status}")[0]
        record = wait_until(lambda: [r for r in audit_records(app) if r["request_id"] == request_id], 10, "record")[0]
        assert span.attributes["http.response.status_code"] == status
        assert span.attributes["mcp_appliance.refusal.reason"] == record["reason"] == reason
        assert span.attributes["mcp_appliance.authz.decision"] == "denied"
        assert span.attributes["mcp_appliance.outcome"] == "denied"
        assert record["trace_id"] == trace_id


def test_nginx_passes_traceparent_on_unchanged_and_adds_none(traced: Any) -> None:
    app, rec, keys = traced
    traceparent, trace_id, client_span = new_traceparent()
    tracestate = "vendor=abc,other=1"
    headers, raw = modern_request("tools/call", "add", {"name": "add", "arguments": {"a": 1, "b": 1}})
    status, _, _ = http("POST", app.mcp_url, raw, {**headers, **bearer(keys["math"]), "traceparent": traceparent,
                                                    "tracestate": tracestate, "X-Request-ID": "tp-" + trace_id[:8]})
    assert status == 200
    gate, _ = server_and_sdk_spans(rec, trace_id)
    # What the worker saw is what the client sent: its span inherits the tracestate too.
    assert (gate.trace_id, gate.parent_span_id, gate.trace_state) == (trace_id, client_span, tracestate)
    # Without a traceparent the gate sees none: its span starts a trace of its own, with no parent.
    request_id = "no-tp-" + secrets.token_hex(4)
    assert add_call(app, keys["math"], None, request_id=request_id)[0] == 200
    record = wait_until(lambda: [r for r in audit_records(app) if r["request_id"] == request_id], 10, "audit record")[0]
    fresh = wait_until(lambda: [s for s in rec.trace(record["trace_id"]) if s.scope == "mcp-appliance"], 20,
                       "the span of the call without traceparent")[0]
    assert fresh.parent_span_id == ""


def test_a_scale_operation_is_a_span(traced: Any) -> None:
    app, rec, _ = traced
    token = (app.run_dir / "admin.token").read_text().strip()
    traceparent, trace_id, client_span = new_traceparent()
    status, _, body = http("POST", app.url + "/admin/scale", {"workers": 2},
                           {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                            "traceparent": traceparent}, timeout=60)
    assert status == 200, body
    span = wait_until(lambda: rec.trace(trace_id), 20, "the scale operation's span")[0]
    assert span.name == "mcp_appliance.scale" and span.parent_span_id == client_span
    assert span.attributes["mcp_appliance.workers"] == 2
    assert span.resource.get("mcp_appliance.worker.index") is None  # the admin app's


def test_a_scale_from_the_command_line_is_a_span_too(traced: Any) -> None:
    app, rec, _ = traced
    result = app.command("scale", "2")
    assert result.returncode == 0, result.stderr
    spans = wait_until(lambda: [s for s in list(rec.spans) if s.name == "mcp_appliance.scale"
                                and str(s.resource.get("service.instance.id")).endswith("/cli")], 20, "the CLI's span")
    assert spans[0].attributes["mcp_appliance.workers"] == 2 and spans[0].status != 2  # 2: STATUS_CODE_ERROR


def closed_port() -> int:
    """A loopback port nothing listens on (the receiver is down)."""
    port = free_port_block(1)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


@pytest.mark.parametrize("receiver_state", ["down", "slow"])
def test_a_receiver_that_is_down_or_slow_never_fails_a_call_and_drops_are_counted(receiver_state: str) -> None:
    with contextlib.ExitStack() as stack:
        if receiver_state == "down":
            endpoint = f"http://127.0.0.1:{closed_port()}/v1/traces"
        else:
            endpoint = stack.enter_context(receiver(answering=False)).endpoint
        app = traced_appliance(endpoint, queue_size=4)
        write_config(app)
        key = add_key(app, "alice", "math")
        stack.enter_context(running(app))
        for _ in range(40):
            status, out = add_call(app, key, new_traceparent()[0])
            assert status == 200 and b'"isError":false' in out.replace(b" ", b"")

        def dropped() -> float:
            return total(scrape(app), "mcp_appliance_trace_spans_dropped_total")

        # 40 calls make at least 80 spans; a queue of 4 per worker holds few of them.
        wait_until(lambda: dropped() >= 40, 30, "spans counted as dropped")
        samples = scrape(app)
        assert total(samples, "mcp_appliance_trace_spans_dropped_total", reason="queue_full") > 0
        if receiver_state == "down":
            wait_until(lambda: total(scrape(app), "mcp_appliance_trace_spans_dropped_total", reason="export_failed") > 0,
                       30, "failed exports counted")
        assert total(samples, "mcp_appliance_trace_spans_exported_total") == 0


def test_tracing_off_records_no_trace_id() -> None:
    with running(new_appliance(1, mcp={"allowed_hosts": ["127.0.0.1:*"]})) as app:
        status, _, _ = call(app, "tools/call", "search_notes", {"arguments": {"query": "x"}},
                            headers={"traceparent": new_traceparent()[0], "X-Request-ID": "off-1"})
        assert status == 200
        record = wait_until(lambda: [r for r in audit_records(app) if r["request_id"] == "off-1"], 10, "record")[0]
        assert "trace_id" not in record
        samples = scrape(app)
        assert total(samples, "mcp_appliance_trace_spans_exported_total") == 0  # exported at 0 for the alert
        assert total(samples, "mcp_appliance_trace_spans_dropped_total") == 0



def test_a_call_in_a_legacy_session_puts_the_sdks_span_under_its_own_gate_span(traced: Any) -> None:
    app, rec, keys = traced
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **bearer(keys["math"])}
    init_tp, init_trace, _ = new_traceparent()
    status, headers, _ = http("POST", app.mcp_url, init, {**base, "traceparent": init_tp})
    assert status == 200
    session = {**legacy_request_headers(headers["mcp-session-id"]), **bearer(keys["math"])}
    assert http("POST", app.mcp_url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)[0] == 202
    traceparent, trace_id, client_span = new_traceparent()
    status, _, _ = http("POST", app.mcp_url, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                              "params": {"name": "add", "arguments": {"a": 1, "b": 2}}},
                        {**session, "traceparent": traceparent})
    assert status == 200
    gate, sdk = server_and_sdk_spans(rec, trace_id)
    assert gate.parent_span_id == client_span and sdk.parent_span_id == gate.span_id


def test_a_call_to_a_stdio_server_puts_the_bridges_call_to_its_child_in_the_callers_trace(traced: Any) -> None:
    app, rec, keys = traced
    traceparent, trace_id, client_span = new_traceparent()
    headers, raw = modern_request("tools/call", "ping", {"name": "ping", "arguments": {}})
    status, _, out = http("POST", app.url + "/servers/tiny/mcp", raw,
                          {**headers, **bearer(keys["math"]), "traceparent": traceparent})
    answer = out if isinstance(out, bytes) else json.dumps(out).encode()  # a command server answers as a stream
    assert status == 200 and b"pong" in answer, out

    def three() -> tuple[Span, Span, Span] | None:
        spans = rec.trace(trace_id)
        gate = [s for s in spans if s.scope == "mcp-appliance"]
        server = [s for s in spans if s.scope == "mcp-python-sdk" and s.kind == 2]  # SPAN_KIND_SERVER
        client = [s for s in spans if s.scope == "mcp-python-sdk" and s.kind == 3]  # SPAN_KIND_CLIENT
        return (gate[0], server[0], client[0]) if gate and server and client else None

    gate, server, to_child = wait_until(three, 20, f"gate, SDK server and bridge client spans of trace {trace_id}")
    assert gate.parent_span_id == client_span
    assert gate.attributes["mcp_appliance.server.name"] == "tiny"
    assert to_child.name == "MCP send tools/call ping"
    assert to_child.parent_span_id in {gate.span_id, server.span_id}
