"""The tracing pieces on their own: the export headers file, the counting of spans that never leave, the propagator."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from appliance.config import ConfigError, LimitsSettings, Settings, TracingSettings, load_settings
from appliance.gate import WorkerStats, build_gate
from appliance.gate.services import GateServices
from appliance.gate.tracing import ServerSpan
from appliance.metrics import TraceMetrics
from appliance.tracing import ContinuingPropagator, CountingProcessor, read_headers


class HeldExporter(SpanExporter):
    """An exporter whose receiver does not answer until released (a slow or hung collector)."""

    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.release = threading.Event()
        self.result = result
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(30)
        self.exported += len(spans)
        return self.result

    def shutdown(self) -> None:
        self.release.set()


def counted(metrics: TraceMetrics, reason: str) -> float:
    return metrics.drops.labels(reason)._value.get()


def spans_through(processor: CountingProcessor, count: int) -> None:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    for n in range(count):
        tracer.start_span(f"s{n}").end()


def test_a_full_queue_drops_new_spans_and_counts_them_without_waiting() -> None:
    metrics, exporter = TraceMetrics(CollectorRegistry()), HeldExporter()
    processor = CountingProcessor(exporter, metrics, queue_size=3, export_timeout=1)
    try:
        spans_through(processor, 20)  # returns although the exporter holds every export
        # At most one batch (3) is held by the exporter and 3 wait in the queue: the rest are dropped.
        assert counted(metrics, "queue_full") >= 20 - 6
    finally:
        exporter.release.set()
        processor.shutdown()
    assert exporter.exported + counted(metrics, "queue_full") == 20  # every span accounted for


def test_spans_of_a_failed_export_are_counted_as_dropped() -> None:
    metrics, exporter = TraceMetrics(CollectorRegistry()), HeldExporter(SpanExportResult.FAILURE)
    exporter.release.set()
    processor = CountingProcessor(exporter, metrics, queue_size=100, export_timeout=1)
    spans_through(processor, 5)
    processor.force_flush()
    assert counted(metrics, "export_failed") == 5
    assert metrics.exported._value.get() == 0
    processor.shutdown()


def test_headers_file_lines_become_export_headers(tmp_path: Path) -> None:
    path = tmp_path / "headers"
    path.write_text("# for the collector\nAuthorization: Bearer s3cret:with-colon\n\nX-Scope-OrgID: tenant-1\n")
    assert read_headers(str(path)) == {"Authorization": "Bearer s3cret:with-colon", "X-Scope-OrgID": "tenant-1"}


def test_a_bad_headers_line_is_named_by_number_never_by_its_secret(tmp_path: Path) -> None:
    path = tmp_path / "headers"
    path.write_text("Authorization Bearer s3cret\n")
    with pytest.raises(ConfigError, match="'tracing.headers_file'.*line 1") as err:
        read_headers(str(path))
    assert "s3cret" not in str(err.value)


def test_a_meta_traceparent_of_the_current_trace_continues_under_the_current_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    client = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    propagator = ContinuingPropagator()
    with tracer.start_as_current_span("gate", context=propagator.extract({"traceparent": client})) as gate:
        parent = trace.get_current_span(propagator.extract({"traceparent": client}))
        assert parent is gate
        other = "00-" + "12" * 16 + "-" + "34" * 8 + "-01"  # another trace: taken as sent
        theirs = trace.get_current_span(propagator.extract({"traceparent": other})).get_span_context()
        assert (format(theirs.trace_id, "032x"), format(theirs.span_id, "016x")) == ("12" * 16, "34" * 8)
    # Outside any span a traceparent is taken as sent too.
    assert trace.get_current_span(propagator.extract({"traceparent": client})).get_span_context().span_id == int("cd" * 8, 16)


def layers(app: object) -> list[type]:
    found = []
    while hasattr(app, "app"):
        found.append(type(app))
        app = app.app  # type: ignore[attr-defined]
    return found


async def hosted(scope: object, receive: object, send: object) -> None:
    pass


def services() -> GateServices:
    from appliance.gate.auth import load_authenticator
    from appliance.gate.policy import Policy
    from appliance.metrics import GateMetrics

    settings = Settings()
    return GateServices(load_authenticator(settings), Policy(settings.policy, None), GateMetrics(0, CollectorRegistry()),
                        None)


def test_tracing_off_adds_no_layer_and_on_adds_the_server_span() -> None:
    base = dataclasses.replace(Settings(), limits=LimitsSettings(rate=0))
    off = build_gate(hosted, base, 0, WorkerStats(index=0), services())
    assert ServerSpan not in layers(off)
    on = build_gate(hosted, dataclasses.replace(base, tracing=TracingSettings(enabled=True)), 0, WorkerStats(index=0),
                    services())
    assert ServerSpan in layers(on)


def test_the_readmes_tracing_example_is_a_valid_config(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Tracing", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "appliance.toml"
    path.write_text(block)
    settings = load_settings(path, {})
    assert settings.tracing.enabled and settings.tracing.sample_ratio == 0.1


def test_with_tracing_off_the_sdks_span_per_request_is_dropped_unless_the_app_exports_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp.server._otel import OpenTelemetryMiddleware
    from mcp.server.mcpserver import MCPServer

    from appliance.worker import drop_unexported_spans

    def spans_kept(settings: Settings) -> bool:
        chain = MCPServer("t").middleware
        others = [m for m in chain if not isinstance(m, OpenTelemetryMiddleware)]
        drop_unexported_spans(chain, settings)
        assert [m for m in chain if not isinstance(m, OpenTelemetryMiddleware)] == others  # the rest untouched
        return any(isinstance(m, OpenTelemetryMiddleware) for m in chain)

    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)  # nothing installed: spans go nowhere
    assert not spans_kept(Settings())
    assert spans_kept(dataclasses.replace(Settings(), tracing=TracingSettings(enabled=True)))
    monkeypatch.setattr(trace, "get_tracer_provider", TracerProvider)  # the hosted app exports spans of its own
    assert spans_kept(Settings())
