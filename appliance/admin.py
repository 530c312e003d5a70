"""The admin app: health, readiness and effective config, behind nginx on loopback."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import anyio
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance import metrics, scrape
from appliance.config import Settings, redacted
from appliance.gate.audit import AdminAudit
from appliance.gate.auth import WELL_KNOWN, AdminGuard, protected_resource_metadata
from appliance.health import HealthChecker
from appliance.operations import OperationError, Operator, Result
from appliance.supervisor import SupervisorClient, socket_path
from appliance.watchdog import watching


def create_admin_app(settings: Settings, checker: HealthChecker | None = None) -> Starlette:
    """The Starlette admin app for `settings`."""
    checker = checker or HealthChecker(settings, SupervisorClient(socket_path(settings.run_dir)))
    shared_scrape = scrape.SharedScrape(settings, checker)

    async def health(request: Request) -> JSONResponse:
        status, doc = await checker.report()
        return JSONResponse(doc, status_code=503 if status == "down" else 200)

    async def live(request: Request) -> JSONResponse:
        # Alive means this process answers; restarting the pod would not fix a worker. Nothing
        # here waits for a scrape or a probe, so a flood of /metrics cannot fail the liveness probe.
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> JSONResponse:
        ok, probes = await checker.ready()
        serving = sum(1 for p in probes if p["ok"])
        body = {"status": "ready" if ok else "not ready", "serving": serving,
                "min_ready": settings.health.min_ready_workers}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def startup(request: Request) -> JSONResponse:
        if not checker.ever_ready:
            await checker.ready()
        started = checker.ever_ready
        return JSONResponse({"status": "started" if started else "starting"}, status_code=200 if started else 503)

    async def config(request: Request) -> JSONResponse:
        return JSONResponse(redacted(settings))

    async def metrics_endpoint(request: Request) -> Response:
        return Response(await shared_scrape.body(), media_type=scrape.CONTENT_TYPE)

    async def resource_metadata(request: Request) -> JSONResponse:
        if settings.auth.mode != "jwt":
            return JSONResponse({"error": "not found", "detail": "auth.mode is not jwt"}, status_code=404)
        return JSONResponse(protected_resource_metadata(settings, request.scope))

    async def operate(request: Request, action: Callable[[Operator], Result]) -> JSONResponse:
        # Operations block (XML-RPC, probes, drain waits): a thread keeps /health answering.
        operator = Operator(settings)
        # The operation's span continues the caller's trace, when its request carries one.
        parent = TraceContextTextMapPropagator().extract(request.headers)
        try:
            result = await anyio.to_thread.run_sync(lambda: _in_context(parent, action, operator))
        except OperationError as exc:
            return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=exc.status)
        # This process restarts last, after its answer went out.
        after = BackgroundTask(operator.restart_admin) if result.restart_admin else None
        return JSONResponse(result.as_dict(), background=after)

    async def scale(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        workers = body.get("workers") if isinstance(body, dict) else None
        if not isinstance(workers, int) or isinstance(workers, bool):
            return JSONResponse({"error": "BadRequest", "detail": 'send {"workers": N} with N an integer'},
                                status_code=400)
        return await operate(request, lambda op: op.scale(workers))

    async def reload(request: Request) -> JSONResponse:
        return await operate(request, lambda op: op.reload())

    async def restart_worker(request: Request) -> JSONResponse:
        index = request.path_params["index"]
        return await operate(request, lambda op: op.restart_worker(index))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        edge_events = metrics.listen_for_edge_events(settings)
        try:
            # Probes every worker twice a second, whether or not anyone asks /health (appliance/watchdog.py).
            async with watching(settings, checker.supervisor) as watchdog:
                checker.watchdog = watchdog
                yield
        finally:
            if edge_events is not None:
                with contextlib.suppress(OSError):  # wakes its reader thread, which close() alone does not
                    edge_events.shutdown(socket.SHUT_RDWR)
                edge_events.close()
            await checker.client.aclose()

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/health/live", live),
            Route("/health/ready", ready),
            Route("/health/startup", startup),
            Route("/config", config),
            # Behind AdminGuard (the admin token), like everything under /admin/.
            Route("/admin/scale", scale, methods=["POST"]),
            Route("/admin/reload", reload, methods=["POST"]),
            Route("/admin/workers/{index:int}/restart", restart_worker, methods=["POST"]),
            Route("/metrics", metrics_endpoint),
            Route(WELL_KNOWN, resource_metadata),
            Route(WELL_KNOWN + "/{resource:path}", resource_metadata),
        ],
        # Outermost first: every /admin/* request is audited, including refused ones.
        middleware=[Middleware(AdminAudit, settings=settings), Middleware(AdminGuard, settings=settings)],
        lifespan=lifespan,
    )


def _in_context(parent: Context, action: Callable[[Operator], Result], operator: Operator) -> Result:
    token = otel_context.attach(parent)
    try:
        return action(operator)
    finally:
        otel_context.detach(token)


def run_admin(settings: Settings) -> None:
    """Serve the admin app on its loopback port until SIGTERM."""
    import asyncio
    import signal

    from appliance.lifetime import STOP_MARGIN, die_with_supervisord

    config = HypercornConfig()
    config.bind = [f"{settings.admin.host}:{settings.admin.port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75.0
    config.graceful_timeout = 5.0
    die_with_supervisord(settings.run_dir, "admin", config.graceful_timeout + STOP_MARGIN)
    config.include_server_header = False
    app = create_admin_app(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    tracing = None
    if settings.tracing.enabled:  # imported only when on: tracing off loads no OpenTelemetry SDK
        from appliance.tracing import setup_tracing
        tracing = setup_tracing(settings, "admin")
    try:
        asyncio.run(main())
    finally:
        if tracing is not None:
            tracing.shutdown()
