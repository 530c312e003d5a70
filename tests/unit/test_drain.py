"""A draining worker: serves what still arrives without a session, ends its sessions (404),
closes each connection after the answer, and ends open streams."""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.gate.drain import Drain
from appliance.gate.stats import WorkerStats


def scope(method: str = "POST", session: bool = False) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if session:
        headers.append((b"mcp-session-id", b"n0w0-abc"))
    return {"type": "http", "method": method, "path": "/mcp", "headers": headers}


async def hosted(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"keep-alive")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def call(app: Drain, s: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(s, receive, send)
    return sent


def test_before_a_drain_nothing_changes() -> None:
    stats = WorkerStats(index=0)
    sent = asyncio.run(call(Drain(hosted, stats), scope(session=True)))
    assert sent[0]["status"] == 200 and sent[0]["headers"] == [(b"connection", b"keep-alive")]


def test_draining_serves_sessionless_calls_but_closes_the_connection_after() -> None:
    stats = WorkerStats(index=0)
    stats.start_draining()
    sent = asyncio.run(call(Drain(hosted, stats), scope()))
    assert sent[0]["status"] == 200
    assert sent[0]["headers"] == [(b"connection", b"close")]


def test_draining_ends_sessions_with_404_and_closes() -> None:
    stats = WorkerStats(index=0)
    stats.start_draining()
    sent = asyncio.run(call(Drain(hosted, stats), scope(session=True)))
    assert sent[0]["status"] == 404 and (b"connection", b"close") in sent[0]["headers"]
    assert b"Session not found" in sent[1]["body"]


def test_an_open_stream_ends_when_the_drain_starts() -> None:
    stats = WorkerStats(index=0)

    async def stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive())["type"] != "http.disconnect":  # an SSE stream waits for the client to go
            pass
        await send({"type": "http.response.body", "body": b""})

    async def main() -> list[dict[str, Any]]:
        never = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await never.wait()  # the client stays
            return {}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        task = asyncio.create_task(Drain(stream, stats)(scope("GET", session=True), receive, send))
        await asyncio.sleep(0.01)
        assert not task.done()
        stats.start_draining()
        await asyncio.wait_for(task, 5)
        return sent

    sent = asyncio.run(main())
    assert sent[-1] == {"type": "http.response.body", "body": b""}


def test_a_listen_stream_gets_its_request_then_ends_when_the_drain_starts() -> None:
    """A 2026-07-28 subscriptions/listen POST stays open like a GET stream, so a drain ends it too."""
    stats = WorkerStats(index=0)
    listen = scope()
    listen["headers"].append((b"mcp-method", b"subscriptions/listen"))
    received: list[dict[str, Any]] = []

    async def stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        received.append(await receive())  # the JSON-RPC request
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        never = asyncio.Event()
        bodies = [{"type": "http.request", "body": b'{"method":"subscriptions/listen"}', "more_body": False}]

        async def receive() -> dict[str, Any]:
            if bodies:
                return bodies.pop()
            await never.wait()  # the client stays
            return {}

        async def send(message: dict[str, Any]) -> None:
            pass

        task = asyncio.create_task(Drain(stream, stats)(listen, receive, send))
        await asyncio.sleep(0.01)
        assert not task.done()
        stats.start_draining()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert received == [{"type": "http.request", "body": b'{"method":"subscriptions/listen"}', "more_body": False}]
