"""JSON logs on stderr for every appliance process; supervisord captures and rotates them."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from appliance.config import Settings


class _ContextFilter(logging.Filter):
    """Stamps every record with the service, process and request it belongs to."""

    def __init__(self, service: str, process_name: str, worker: int | None) -> None:
        super().__init__()
        self.service = service
        self.process_name = process_name
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        from appliance.gate.requests import principal_name, request_id, session_id

        record.service = self.service
        record.proc = self.process_name
        record.worker = self.worker
        record.request_id = getattr(record, "request_id", None) or request_id.get()
        record.principal = getattr(record, "principal", None) or principal_name.get()
        record.session = getattr(record, "session", None) or session_id.get()
        # The trace of the request (tracing on): what the audit record and the spans carry too.
        span = trace.get_current_span().get_span_context()
        record.trace_id = format(span.trace_id, "032x") if span.is_valid else None
        return True


class _OncePerStatelessRequest(logging.Filter):
    """Drops the SDK's "Terminating session: None", which it logs for every stateless request
    (each gets a throw-away transport): a line per call would cost more CPU than nginx's access
    log line that already records the call, in the worker and in supervisord's log pipe."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Terminating session: None"


def configure_logging(settings: Settings, process_name: str, worker: int | None = None) -> None:
    """Route all logging to stderr as one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}{service}{proc}{worker}{request_id}{principal}{session}{trace_id}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "proc": "process"},
            timestamp=False,
        )
    )
    handler.addFilter(_ContextFilter(settings.service_name, process_name, worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # hypercorn's access log duplicates nginx's; its error log is kept.
    logging.getLogger("hypercorn.access").disabled = True
    sdk = logging.getLogger("mcp.server.streamable_http")
    if not any(isinstance(f, _OncePerStatelessRequest) for f in sdk.filters):
        sdk.addFilter(_OncePerStatelessRequest())
    # httpx2 logs a line per outgoing request (the admin app probes every worker for each /health).
    logging.getLogger("httpx2").setLevel(logging.WARNING if root.level > logging.DEBUG else logging.NOTSET)
