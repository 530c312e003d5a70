"""A hosted MCPServer's MCP path goes straight to its session manager; its own routes and its
lifespan are still the Starlette app's."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from appliance.endpoint import DirectEndpoint
from tests.integration.clients import modern_request


def server_with_a_route_and_a_lifespan(events: list[str]) -> MCPServer:
    @contextlib.asynccontextmanager
    async def lifespan(server: MCPServer) -> AsyncIterator[None]:
        events.append("up")
        yield
        events.append("down")

    server = MCPServer("direct", lifespan=lifespan)

    @server.tool()
    def add(a: int, b: int) -> int:
        return a + b

    @server.custom_route("/hello", methods=["GET"])
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    return server


async def http(app: Any, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "scheme": "http", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_calls_custom_routes_and_the_lifespan_all_work_through_the_direct_endpoint() -> None:
    events: list[str] = []
    server = server_with_a_route_and_a_lifespan(events)
    starlette = server.streamable_http_app(
        json_response=True, transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
    app = DirectEndpoint(starlette, server.session_manager, "/mcp")

    async def scenario() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})
        life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                       inbox.get, replies.put))
        assert (await asyncio.wait_for(replies.get(), 5))["type"] == "lifespan.startup.complete"
        headers, body = modern_request("tools/call", "add", {"name": "add", "arguments": {"a": 2, "b": 3}})
        answer = await http(app, "POST", "/mcp", headers, body)
        route = await http(app, "GET", "/hello", {})
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await asyncio.wait_for(replies.get(), 5))["type"] == "lifespan.shutdown.complete"
        await life
        return answer, route

    (status, body), route = asyncio.run(scenario())
    assert status == 200 and json.loads(body)["result"]["structuredContent"] == {"result": 5}
    assert route == (200, b"hi")
    assert events == ["up", "down"]
