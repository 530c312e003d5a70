"""The admin app: health, readiness and effective config, behind nginx on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from appliance.config import Settings, redacted
from appliance.health import HealthChecker
from appliance.supervisor import SupervisorClient, socket_path


def create_admin_app(settings: Settings, checker: HealthChecker | None = None) -> Starlette:
    """The Starlette admin app for `settings`."""
    checker = checker or HealthChecker(settings, SupervisorClient(socket_path(settings.run_dir)))

    async def health(request: Request) -> JSONResponse:
        status, doc = await checker.report()
        return JSONResponse(doc, status_code=503 if status == "down" else 200)

    async def live(request: Request) -> JSONResponse:
        # Alive means this process answers; restarting the pod would not fix a worker.
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

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await checker.client.aclose()

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/health/live", live),
            Route("/health/ready", ready),
            Route("/health/startup", startup),
            Route("/config", config),
        ],
        lifespan=lifespan,
    )


def run_admin(settings: Settings) -> None:
    """Serve the admin app on its loopback port until SIGTERM."""
    import asyncio
    import signal

    config = HypercornConfig()
    config.bind = [f"{settings.admin.host}:{settings.admin.port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75.0
    config.graceful_timeout = 5.0
    config.include_server_header = False
    app = create_admin_app(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    asyncio.run(main())
