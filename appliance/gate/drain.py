"""Draining: how a worker that is about to stop lets go of its work without failing a request.

An operation (scale down, rolling reload, worker restart) first points nginx's pool away
from the worker (appliance/pool.py), then signals it (SIGUSR1; SIGTERM does the same).
From then on the worker:

- still serves every request without a session (a 2026-07-28 call, a legacy initialize)
  that nginx sends it on a connection it already had: failing one would fail a client;
- answers requests of its legacy sessions with 404, the spec's "session expired,
  re-initialize": the sessions end with this process anyway, and the clients move on now;
- ends open streams — GET streams and 2026-07-28 `subscriptions/listen` streams, once
  their request body is in — so they do not hold the worker until its graceful timeout;
- closes each connection after its response (`Connection: close`), so nginx stops reusing
  it. Idle connections are left for nginx to close (pool.UPSTREAM_IDLE_TIMEOUT): a worker
  that closed one could race with nginx sending a request on it, and nginx never re-sends
  a POST.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.responses import header, send_jsonrpc_error
from appliance.gate.stats import WorkerStats

_CLOSE = (b"connection", b"close")
#: A POST whose answer is a stream that stays open until the client goes (MCP 2026-07-28).
_LISTEN = b"subscriptions/listen"


class Drain:
    """Behaviour of a draining worker; a no-op until the drain starts."""

    def __init__(self, app: ASGIApp, stats: WorkerStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.stats.draining and header(scope["headers"], b"mcp-session-id") is not None:
            await send_jsonrpc_error(send, 404, "Session not found", headers=[_CLOSE])
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.stats.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        if scope["method"] == "GET" or header(scope["headers"], b"mcp-method") == _LISTEN:
            receive = self._until_drained(receive, body_read=scope["method"] == "GET")
        await self.app(scope, receive, closing_send)

    def _until_drained(self, receive: Receive, body_read: bool) -> Receive:
        """`receive` that reports a client disconnect once the drain starts (ends an SSE stream).

        The request body comes through first (`body_read`: it is in already, as for a GET).
        """
        drained = self.stats.drain_started

        async def drained_receive() -> Message:
            nonlocal body_read
            if not body_read:  # the app gets the whole request first, drain or not
                message = await receive()
                body_read = message["type"] != "http.request" or not message.get("more_body", False)
                return message
            if drained.is_set():
                return {"type": "http.disconnect"}
            incoming = asyncio.ensure_future(receive())
            waiter = asyncio.ensure_future(drained.wait())
            try:
                await asyncio.wait({incoming, waiter}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                incoming.cancel()
                raise
            finally:
                waiter.cancel()
            if incoming.done():
                return incoming.result()
            incoming.cancel()
            return {"type": "http.disconnect"}

        return drained_receive
