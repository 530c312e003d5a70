"""OpenTelemetry for every appliance process: spans batched and sent to an OTLP/HTTP receiver.

With `tracing.enabled = false` nothing is installed: the OpenTelemetry API (which the
`mcp` SDK already calls for its own span per request) stays the no-op it is by default,
and the gate has no tracing layer. With it on, each worker and the admin app install the
SDK's TracerProvider once at start, with a parent-based ratio sampler and the resource
attributes of the process. Spans go through the SDK's BatchSpanProcessor and OTLP/HTTP
exporter (a thread of their own): a request only appends its span to a bounded queue.

The BatchSpanProcessor drops silently (a log line) when its queue is full, and its
exporter gives a batch up when the receiver is down or slow. `CountingProcessor` and
`CountingExporter` wrap both through their public interfaces only, so every span that
never reaches the receiver is counted in mcp_appliance_trace_spans_dropped_total: the
processor keeps its own count of spans waiting (handed to the queue, not yet taken by
the exporter) and drops a span itself rather than let the queue overflow.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import CarrierT, Getter, Setter, TextMapPropagator, default_getter, default_setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from appliance.config import ConfigError, Settings
from appliance.metrics import TraceMetrics

logger = logging.getLogger("appliance.tracing")

#: The instrumentation scope of the appliance's own spans (the SDK's are "mcp-python-sdk").
SCOPE = "mcp-appliance"
#: Attribute names of the appliance's own (no OpenTelemetry convention covers them).
WORKER = "mcp_appliance.worker.index"
NODE = "mcp_appliance.node.ordinal"
SERVER = "mcp_appliance.server.name"

W3C = TraceContextTextMapPropagator()


def read_headers(path: str) -> dict[str, str]:
    """The export headers in tracing.headers_file ("Name: value" lines; # comments); ConfigError when unusable."""
    if not path:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'tracing.headers_file' = '{path}': cannot be read: {exc}") from None
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or any(c in name for c in " \t") or not value.strip():
            # The line may hold a secret: name its number, never its text.
            raise ConfigError(f"'tracing.headers_file' = '{path}': line {number} is not 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def resource(settings: Settings, process: str, worker: int | None) -> Resource:
    """What every span of this process carries (built directly: no OTEL_* environment is read)."""
    attributes: dict[str, Any] = {
        "service.name": settings.service_name,
        "service.version": settings.version,
        "service.instance.id": f"{socket.gethostname()}/{process}",
        "deployment.environment.name": settings.environment,
        "process.pid": os.getpid(),
        NODE: settings.node.ordinal,
    }
    if worker is not None:
        attributes[WORKER] = worker
    return Resource(attributes)


class CountingExporter(SpanExporter):
    """The OTLP exporter, counting what it sends and what it gives up."""

    def __init__(self, inner: SpanExporter, metrics: TraceMetrics, taken: Any) -> None:
        self.inner = inner
        self.metrics = metrics
        self.taken = taken

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken(len(spans))
        try:
            result = self.inner.export(spans)
        except Exception:  # the processor would log and lose them: count them first
            self.metrics.dropped("export_failed", len(spans))
            raise
        if result is SpanExportResult.SUCCESS:
            self.metrics.exported.inc(len(spans))
        else:
            self.metrics.dropped("export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingProcessor(SpanProcessor):
    """A BatchSpanProcessor whose queue never overflows unseen: a span that finds it full is dropped here, counted."""

    def __init__(self, exporter: SpanExporter, metrics: TraceMetrics, queue_size: int, export_timeout: float) -> None:
        self.metrics = metrics
        self.queue_size = queue_size
        self._lock = threading.Lock()
        #: Spans handed to the batch processor and not yet taken by its exporter.
        self._waiting = 0
        counted = CountingExporter(exporter, metrics, self._taken)
        self.inner = BatchSpanProcessor(counted, max_queue_size=queue_size, schedule_delay_millis=1000,
                                        max_export_batch_size=min(512, queue_size),
                                        export_timeout_millis=export_timeout * 1000)

    def _taken(self, count: int) -> None:
        with self._lock:
            self._waiting = max(0, self._waiting - count)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self._lock:
            full = self._waiting >= self.queue_size
            if not full:
                self._waiting += 1
        if full:
            self.metrics.dropped("queue_full")
            return
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class ContinuingPropagator(TextMapPropagator):
    """W3C trace context; a `traceparent` of the trace already being served continues under the current span.

    The SDK takes its span's parent from `_meta.traceparent` when there is one, which is
    the client's span, also the parent of the gate's span: the SDK's span would be the
    gate's sibling. Here the gate's span (the current one) is the SDK's parent instead.
    """

    def extract(self, carrier: CarrierT, context: Context | None = None,
                getter: Getter[CarrierT] = default_getter) -> Context:
        extracted = W3C.extract(carrier, context, getter)
        current = trace.get_current_span(context)
        theirs = trace.get_current_span(extracted).get_span_context()
        ours = current.get_span_context()
        if ours.is_valid and theirs.is_valid and ours.trace_id == theirs.trace_id:
            return trace.set_span_in_context(current, context)
        return extracted

    def inject(self, carrier: CarrierT, context: Context | None = None, setter: Setter[CarrierT] = default_setter) -> None:
        W3C.inject(carrier, context, setter)

    @property
    def fields(self) -> set[str]:
        return W3C.fields


class Tracing:
    """This process's tracer provider and the tracer of the appliance's spans."""

    def __init__(self, provider: TracerProvider, timeout: float) -> None:
        self.provider = provider
        self.timeout = timeout

    def shutdown(self) -> None:
        """Send what is queued, for at most tracing.export_timeout: a receiver that is down never holds up a stop."""
        flushing = threading.Thread(target=self.provider.shutdown, name="tracing-shutdown", daemon=True)
        flushing.start()
        flushing.join(self.timeout)


class ExecOnlyTracerProvider(TracerProvider):
    """The SDK's provider without its after-fork work: these processes fork only to exec.

    uvloop runs Python's after-fork hooks in the child it forks to start a subprocess (a
    stdio server's child), before exec. The SDK's hook re-detects the resource there on a
    thread pool, whose lock a thread of the parent may hold at the fork: the child hangs
    before exec, and with it the worker's start (seen: a worker with tracing on and a stdio
    server never answered). A child that execs needs nothing of the parent's provider.
    """

    def _handle_fork(self) -> None:
        return


def setup_tracing(settings: Settings, process: str, worker: int | None = None,
                  metrics: TraceMetrics | None = None) -> Tracing | None:
    """Install the OpenTelemetry SDK for this process when tracing is on (None when off: nothing installed)."""
    t = settings.tracing
    if not t.enabled:
        return None
    # Imported here: the exporter brings `requests` and protobuf, which a process with tracing off never needs.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=t.endpoint, headers=read_headers(t.headers_file), timeout=t.export_timeout)
    provider = ExecOnlyTracerProvider(resource=resource(settings, process, worker),
                                      sampler=ParentBased(TraceIdRatioBased(t.sample_ratio)), shutdown_on_exit=False)
    provider.add_span_processor(CountingProcessor(exporter, metrics or TraceMetrics(), t.queue_size, t.export_timeout))
    trace.set_tracer_provider(provider)
    propagate.set_global_textmap(ContinuingPropagator())
    logger.info("tracing on: spans of %s go to %s (sample ratio %s)", process, t.endpoint, t.sample_ratio)
    return Tracing(provider, t.export_timeout)


def trace_id_of(span: trace.Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def parent_from_headers(headers: Mapping[str, str]) -> Context | None:
    """The W3C context a request's `traceparent`/`tracestate` headers carry (None when there is none valid)."""
    ctx = W3C.extract(headers)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


__all__ = ["ContinuingPropagator", "CountingProcessor", "Tracing", "parent_from_headers", "read_headers",
           "setup_tracing"]
