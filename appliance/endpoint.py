"""A hosted MCPServer served from its session manager: the SDK's own endpoint, without the
Starlette app around it for the MCP path.

`MCPServer.streamable_http_app()` returns a Starlette app: error and exception middleware,
a router, a route, then the session manager's `handle_request` (the SDK's documented
ASGI entry for mounting it in an app of one's own). In a worker the gate in front already
routes by path, limits the body, answers errors as JSON-RPC and records every request,
so for the MCP path those layers only cost: ~6 coroutine frames per request and two send
wrappers per message (bench/RESULTS.md). Every other path (the server's custom routes, its
auth routes) and the lifespan (which starts the session manager and the server's own
lifespan) still go to the Starlette app, so nothing the server defines is lost.
"""

from __future__ import annotations

from typing import Any

from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.types import ASGIApp, Receive, Scope, Send


class DirectEndpoint:
    """`app` (the server's Starlette app) with requests to `path` handed to `manager` directly."""

    def __init__(self, app: ASGIApp, manager: StreamableHTTPSessionManager, path: str) -> None:
        self.app = app
        self.handle = manager.handle_request
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        if scope["type"] == "http" and scope["path"] == self.path:
            await self.handle(scope, receive, send)
            return
        await self.app(scope, receive, send)
