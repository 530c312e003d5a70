"""One worker, several hosted servers: requests go to the server whose path they are under.

A worker hosts every configured server (appliance.toml's [mcp] and [servers.<name>]
tables) but those with a worker count it is not among, each behind a gate of its own; nginx
sends each server's path to the workers that host it. The router picks the server by URL
path; a path under no server goes to the first one (the [mcp] server), as when a worker
hosted only it: its app answers 404.

Hosted apps have lifespans (the SDK's session manager runs in one): the router passes the
server's lifespan events to every app and reports startup once all of them have started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("appliance.worker")


class ServerRouter:
    """Routes HTTP requests by path prefix to one app per server; fans the lifespan out to all."""

    def __init__(self, routes: Sequence[tuple[str, ASGIApp]]) -> None:
        if not routes:
            raise ValueError("a worker hosts at least one server")
        # Paths never nest (config.validate), so the first match is the only one.
        self.routes = [(path.rstrip("/"), app) for path, app in routes]
        self.fallback = routes[0][1]

    def app_for(self, path: str) -> ASGIApp:
        """The app of the server `path` is under (the first server's when none)."""
        for prefix, app in self.routes:
            if path == prefix or path.startswith(prefix + "/"):
                return app
        return self.fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app_for(scope.get("path", ""))(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if len(self.routes) == 1:
            await self.fallback(scope, receive, send)
            return
        lifespans = [_Lifespan(app, scope) for _, app in self.routes]
        try:
            message = await receive()  # lifespan.startup
            failures = [f for f in await asyncio.gather(*(life.step(message) for life in lifespans)) if f]
            if failures:
                await send({"type": "lifespan.startup.failed", "message": "; ".join(failures)})
                return
            await send({"type": "lifespan.startup.complete"})
            message = await receive()  # lifespan.shutdown
            failures = [f for f in await asyncio.gather(*(life.step(message) for life in lifespans)) if f]
            if failures:
                await send({"type": "lifespan.shutdown.failed", "message": "; ".join(failures)})
            else:
                await send({"type": "lifespan.shutdown.complete"})
        finally:
            for life in lifespans:
                life.cancel()


class _Lifespan:
    """One app's lifespan, driven one event at a time."""

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.answer: asyncio.Queue[Message] = asyncio.Queue()
        self.task = asyncio.ensure_future(app(scope, self.inbox.get, self.answer.put))

    async def step(self, message: Message) -> str | None:
        """Pass `message` on; None when the app completed it, else why it failed."""
        if self.task.done():
            return self._ended()
        await self.inbox.put(message)
        answer = asyncio.ensure_future(self.answer.get())
        await asyncio.wait({answer, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            answer.cancel()
            return self._ended()
        reply = answer.result()
        if reply["type"].endswith(".failed"):
            return reply.get("message") or reply["type"]
        return None

    def _ended(self) -> str | None:
        """The app returned or raised without answering: per ASGI, it does not do lifespans."""
        exc = self.task.exception() if not self.task.cancelled() else None
        if exc is not None:
            logger.debug("a hosted app does not support lifespan events: %r", exc)
        return None

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()
