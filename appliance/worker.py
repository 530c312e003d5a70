"""One MCP worker process: the hosted app behind the gate, served by hypercorn."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import signal
from functools import partial
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp

from appliance import toolchain
from appliance.answers import AutoAnswers, answer_per_request
from appliance.endpoint import DirectEndpoint
from appliance.config import DEFAULT_SERVER, ServerSettings, Settings, server_key
from appliance.gate import WorkerStats, build_gate
from appliance.gate.stats import ServerHealth
from appliance.lifetime import STOP_MARGIN, die_with_supervisord, stay_reachable_by_the_watchdog
from appliance.metrics import TraceMetrics
from appliance.pool import session_socket, worker_socket
from appliance.state import sealing
from appliance.state.events import Fanout, WithBus, share_events
from appliance.state.local_fanout import LocalFanout, events_dir
from appliance.state.pg_fanout import BothFanouts, PgFanout
from appliance.state.keys import read_ring

logger = logging.getLogger("appliance.worker")

#: The garbage collector's thresholds in a worker (Python's defaults: 700, 10, 10); see run_worker.
GC_THRESHOLDS = (10_000, 50, 100)


class HostedAppError(Exception):
    """A configured app (mcp.app, servers.<name>.app) cannot be imported or is not something we can serve."""


def import_target(spec: str, key: str = "mcp.app") -> Any:
    """The object named by `module:attribute` (`key` names the setting in errors)."""
    # Before the app's module builds its MCPServer: tells its per-process policy from its own.
    sealing.track_per_process_policies()
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is an operator-facing error
        raise HostedAppError(f"{key} = {spec!r}: cannot import module {module_name!r}: {exc!r}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HostedAppError(f"{key} = {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def import_servers(settings: Settings) -> dict[str, Any]:
    """Every Python server's object by server name, after reading every command server's env_files
    (`check` and `run` do it before anything starts); HostedAppError naming the key."""
    for server in settings.servers:
        read_env_files(server)
        if server.command:
            try:
                from appliance import bridge  # noqa: F401  (only a command server needs it)
            except ImportError as exc:
                raise HostedAppError(f"{server_key(server, 'command')}: this installation cannot run stdio "
                                     f"servers: {exc}") from None
    return {server.name: import_target(server.app, server_key(server, "app"))
            for server in settings.hosted_servers if server.app}


def hosted_app(settings: Settings, index: int = 0, server: ServerSettings | None = None) -> ASGIApp:
    """One hosted server (default: the [mcp] one) as ASGI for worker `index`: an MCPServer gets a
    Streamable HTTP app built from settings, sealing with the shared ring and publishing on the host's bus;
    a stdio command gets the bridge."""
    server = server or settings.hosted_servers[0]
    if server.command:
        # Only a command server needs the bridge (and its SDK client parts) in the worker's memory.
        from appliance.bridge import stdio_app

        bridge = stdio_app(stdio_spec(server, settings))
        drop_unexported_spans(bridge.server.middleware, settings)
        return bridge  # type: ignore[no-any-return]
    key = server_key(server, "app")
    target = import_target(server.app, key)
    mcp = settings.mcp
    if isinstance(target, MCPServer):
        drop_unexported_spans(target.middleware, settings)
        share_state(target, settings, key)
        bus = share_events(target, event_fanout(settings, index, server.name))
        app = target.streamable_http_app(
            streamable_http_path=server.path,
            json_response=server.json_response is True,
            stateless_http=not server.sessions,
            max_request_body_size=mcp.max_body_bytes,
            session_idle_timeout=mcp.session_idle_timeout,
            max_sessions=mcp.max_sessions,
            # The gate checks Host and Origin against the public names for every hosted
            # app; the SDK's own check would see nginx's view and answer 421.
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        app = DirectEndpoint(app, target.session_manager, server.path)
        if server.json_response == "auto":
            answer_per_request(target.session_manager)
            app = AutoAnswers(app)
        return app if bus is None else WithBus(app, bus)
    if callable(target):
        return target  # type: ignore[no-any-return]
    raise HostedAppError(f"{key} = {server.app!r} is a {type(target).__name__}: expected an MCPServer or an ASGI app")


def drop_unexported_spans(middleware: list[Any], settings: Settings) -> None:
    """With tracing off, take the SDK's span per request (its OpenTelemetryMiddleware) out of a server's chain.

    Without a tracer provider the span goes nowhere, yet opening it (reading `_meta` for a
    parent, attributes, a context switch) cost ~40 µs of CPU per call of a cheap tool
    (bench/RESULTS.md). The SDK documents dropping it as the opt-out. A hosted app that
    installed a tracer provider of its own keeps it: those spans are exported.
    """
    from mcp.server._otel import OpenTelemetryMiddleware
    from opentelemetry import trace

    if settings.tracing.enabled or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    middleware[:] = [m for m in middleware if not isinstance(m, OpenTelemetryMiddleware)]


def stdio_spec(server: ServerSettings, settings: Settings) -> Any:
    """What the bridge needs to run `server`'s command: its settings, env_files read now (at worker start)."""
    from appliance.bridge import StdioSpec

    return StdioSpec(
        server=server.name,
        command=server.command,
        # npx/uvx caches, home and CA bundle first (the SDK hands a child only HOME, PATH and a few
        # more of the worker's variables); the server's own env and secret files win over them.
        env=tuple(toolchain.runner_environment(settings.data_dir).items()) + server.env + read_env_files(server),
        cwd=Path(server.cwd) if server.cwd else settings.data_dir,
        isolation=server.isolation,
        max_children=server.max_children,
        idle_timeout=float(settings.mcp.session_idle_timeout),
        json_response=server.json_response is True,  # "auto" is for an MCPServer: the bridge answers with streams
        sessions=server.sessions,
        path=server.path,
        max_sessions=settings.mcp.max_sessions,
        log_name=server.name,
        hang_timeout=settings.workers.hang_timeout,
    )


def bridge_report(name: str) -> dict[str, Any]:
    """The stdio server `name` as the worker's probe reports it, from the bridge's own account."""
    from appliance.bridge import bridge_status

    return bridge_health(bridge_status().get(name))


def bridge_health(state: dict[str, Any] | None) -> dict[str, Any]:
    """The bridge's state of one server (children, restarts, up, crash_looping, …) with a probe status:
    "ok", "down" (no child running) or "crash_looping" (given up); anything but ok degrades the worker."""
    if state is None:
        return {"status": "unknown", "reason": "the stdio bridge reports nothing about it (not started)"}
    if state.get("crash_looping"):
        return {**state, "status": "crash_looping",
                "reason": "its command keeps exiting and is no longer restarted (see the worker's log)"}
    if not state.get("up", True):
        return {**state, "status": "down", "reason": "no child of its command is running"}
    return {**state, "status": "ok"}


def read_env_files(server: ServerSettings) -> tuple[tuple[str, str], ...]:
    """`server`'s env_files as (name, content) pairs; HostedAppError naming the key (never the content)."""
    values = []
    for name, file in server.env_files:
        try:
            text = Path(file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise HostedAppError(f"{server_key(server, 'env_files')}.{name} = {file!r}: cannot read: {reason}") from None
        values.append((name, text.removesuffix("\n")))
    return tuple(values)


def event_fanout(settings: Settings, index: int, server: str = DEFAULT_SERVER) -> Fanout:
    """The host's workers (a socket directory per server); and every node on the same database when
    the notes live in PostgreSQL (the [mcp] server's events only: that database is the notes')."""
    directory = events_dir(settings.run_dir)
    if server != DEFAULT_SERVER:
        directory = directory / server
    local = LocalFanout(directory, index)
    if not settings.notes.database_url_file or server != DEFAULT_SERVER:
        return local
    return BothFanouts(local, PgFanout(Path(settings.notes.database_url_file), f"n{settings.node.ordinal}"))


def share_state(server: MCPServer, settings: Settings, key: str = "mcp.app") -> None:
    """Give a hosted MCPServer what spans workers and hosts: the shared request-state ring."""
    if not sealing.seals_per_process(server):
        logger.info("%s keeps its own request_state_security", key)
        return
    ring = read_ring(settings)
    sealing.share_ring(server, ring.as_bytes(), float(settings.state.request_ttl))
    logger.info("%s seals requestState with the shared ring (key ids %s)", key, " ".join(ring.fingerprints()))


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
    # A server with a worker count runs in its first workers only; nginx sends its calls to none other.
    serving = [server for server in settings.hosted_servers if server.hosted_by(index)]
    hosted = [(server, hosted_app(settings, index, server)) for server in serving]
    stats.servers = [ServerHealth(server.name, server.path, server.kind, app,
                                  partial(bridge_report, server.name) if server.command else None)
                     for server, app in hosted]
    app = build_gate(hosted, settings, index, stats)
    config = hypercorn_config(settings, index)
    # Everything built so far (the SDK's and the hosted app's modules, models, schemas) lives
    # as long as the process: keep it out of the garbage collector's scans, which otherwise
    # walk all of it on every full collection while requests wait.
    gc.freeze()
    # A request allocates thousands of short-lived objects (pydantic models, dicts, coroutines):
    # with Python's default first threshold (700) the collector runs several times per call.
    # 10,000 makes that ~once per call and cut ~85 µs of CPU from a cheap call (bench/RESULTS.md);
    # the memory this lets wait for a collection is a few MiB at most.
    gc.set_threshold(*GC_THRESHOLDS)

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

        logger.info("worker %d serving %s on %s", index,
                    ", ".join(f"{x.name} ({x.app or x.command[0]}) at {x.path}" for x in serving), config.bind[0])
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
