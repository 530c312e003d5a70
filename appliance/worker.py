"""One MCP worker process: the hosted app behind the gate, served by hypercorn."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import signal
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp

from appliance.answers import AutoAnswers, answer_per_request
from appliance.config import Settings
from appliance.gate import WorkerStats, build_gate
from appliance.lifetime import STOP_MARGIN, die_with_supervisord, stay_reachable_by_the_watchdog
from appliance.metrics import TraceMetrics
from appliance.pool import session_socket, worker_socket
from appliance.state import sealing
from appliance.state.events import Fanout, WithBus, share_events
from appliance.state.local_fanout import LocalFanout, events_dir
from appliance.state.pg_fanout import BothFanouts, PgFanout
from appliance.state.keys import read_ring

logger = logging.getLogger("appliance.worker")


class HostedAppError(Exception):
    """The configured `mcp.app` cannot be imported or is not something we can serve."""


def import_target(spec: str) -> Any:
    """The object named by `module:attribute`."""
    # Before the app's module builds its MCPServer: tells its per-process policy from its own.
    sealing.track_per_process_policies()
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is an operator-facing error
        raise HostedAppError(f"mcp.app = {spec!r}: cannot import module {module_name!r}: {exc!r}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HostedAppError(f"mcp.app = {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def hosted_app(settings: Settings, index: int = 0) -> ASGIApp:
    """The configured app as ASGI: an MCPServer gets a Streamable HTTP app built from settings,
    sealing with the shared ring and publishing on the host's bus (worker `index`)."""
    target = import_target(settings.mcp.app)
    mcp = settings.mcp
    if isinstance(target, MCPServer):
        share_state(target, settings)
        bus = share_events(target, event_fanout(settings, index))
        app = target.streamable_http_app(
            streamable_http_path=mcp.path,
            json_response=mcp.json_response is True,
            stateless_http=not mcp.sessions,
            max_request_body_size=mcp.max_body_bytes,
            session_idle_timeout=mcp.session_idle_timeout,
            max_sessions=mcp.max_sessions,
            # The gate checks Host and Origin against the public names for every hosted
            # app; the SDK's own check would see nginx's view and answer 421.
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        if mcp.json_response == "auto":
            answer_per_request(target.session_manager)
            app = AutoAnswers(app)
        return app if bus is None else WithBus(app, bus)
    if callable(target):
        return target  # type: ignore[no-any-return]
    raise HostedAppError(
        f"mcp.app = {settings.mcp.app!r} is a {type(target).__name__}: expected an MCPServer or an ASGI app"
    )


def event_fanout(settings: Settings, index: int) -> Fanout:
    """The host's workers; and every node on the same database when the notes live in PostgreSQL."""
    local = LocalFanout(events_dir(settings.run_dir), index)
    if not settings.notes.database_url_file:
        return local
    return BothFanouts(local, PgFanout(Path(settings.notes.database_url_file), f"n{settings.node.ordinal}"))


def share_state(server: MCPServer, settings: Settings) -> None:
    """Give a hosted MCPServer what spans workers and hosts: the shared request-state ring."""
    if not sealing.seals_per_process(server):
        logger.info("%s keeps its own request_state_security", settings.mcp.app)
        return
    ring = read_ring(settings)
    sealing.share_ring(server, ring.as_bytes(), float(settings.state.request_ttl))
    logger.info("%s seals requestState with the shared ring (key ids %s)", settings.mcp.app, " ".join(ring.fingerprints()))


def hypercorn_config(settings: Settings, index: int) -> HypercornConfig:
    """hypercorn settings for worker `index`: loopback only, longer keepalive than nginx's."""
    config = HypercornConfig()
    # nginx reaches the worker on its unix socket (appliance/pool.py); the TCP port serves
    # the admin app's probes and operators.
    config.bind = [
        f"{settings.workers.host}:{settings.worker_port(index)}",
        f"unix:{worker_socket(settings.run_dir, index)}",
        f"unix:{session_socket(settings.run_dir, index)}",
    ]
    # A full accept queue makes a unix-socket connect fail at once (EAGAIN) rather than wait:
    # nginx would answer 502 (a session: 404). Room for bursts of new connections.
    config.backlog = 4096
    config.graceful_timeout = float(settings.workers.graceful_timeout)
    # nginx closes idle upstream connections first (pool.UPSTREAM_IDLE_TIMEOUT); the worker
    # must not, or nginx may reuse a connection the worker is closing.
    config.keep_alive_timeout = 75.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


def run_worker(settings: Settings, index: int) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight requests (bounded by graceful_timeout)."""
    die_with_supervisord(settings.run_dir, f"worker-{index:02d}", settings.workers.graceful_timeout + STOP_MARGIN)
    stay_reachable_by_the_watchdog()
    stats = WorkerStats(index=index)
    # Exported (at 0) with tracing off too, so the alert on dropped spans always has its series.
    trace_metrics = TraceMetrics()
    tracing = None
    if settings.tracing.enabled:  # imported only when on: a worker with tracing off loads no OpenTelemetry SDK
        from appliance.tracing import setup_tracing
        tracing = setup_tracing(settings, f"worker-{index:02d}", index, trace_metrics)
    app = build_gate(hosted_app(settings, index), settings, index, stats)
    config = hypercorn_config(settings, index)
    # Everything built so far (the SDK's and the hosted app's modules, models, schemas) lives
    # as long as the process: keep it out of the garbage collector's scans, which otherwise
    # walk all of it on every full collection while requests wait.
    gc.freeze()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # An operation drains the worker before it stops it (appliance/gate/drain.py).
        loop.add_signal_handler(signal.SIGUSR1, stats.start_draining)

        async def stopped() -> None:
            await stop.wait()
            stats.start_draining()
            logger.info("worker %d stopping: draining %d in-flight requests", index, stats.in_flight)

        logger.info("worker %d serving %s on %s", index, settings.mcp.app, config.bind[0])
        await serve(app, config, shutdown_trigger=stopped)  # type: ignore[arg-type]

    try:
        try:
            import uvloop
        except ImportError:  # uvloop is optional: plain asyncio works, a little slower
            asyncio.run(main())
        else:
            uvloop.run(main())
    finally:
        if tracing is not None:
            tracing.shutdown()  # the spans of the last requests (bounded by tracing.export_timeout)
