"""Each request's outcome, decided the moment it is answered and handed to the audit trail and metrics.

The record is made *before* the message that completes the answer is passed on (the
final body chunk, or the SSE event that carries the JSON-RPC response), so a client
never holds an answer that the audit trail lacks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.exchange import STATE_KEY, Exchange
from appliance.gate.jsonrpc import MessageScanner
from appliance.gate.responses import header

logger = logging.getLogger("appliance.gate")

#: Called once per request with its record and duration in seconds.
Sink = Callable[[Exchange, float], None]


class Outcome:
    """Creates the request's Exchange; calls every sink exactly once when the request is answered."""

    def __init__(self, app: ASGIApp, sinks: Sequence[Sink]) -> None:
        self.app = app
        self.sinks = tuple(sinks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        state = scope.setdefault("state", {})
        client = header(headers, b"x-real-ip")
        version = header(headers, b"mcp-protocol-version")
        ex = Exchange(
            started=time.perf_counter(),
            http_method=scope["method"],
            request_id=state.get("request_id", "-"),
            client=client.decode("latin-1")[:64] if client else (scope.get("client") or (None,))[0],
            protocol_version=version.decode("latin-1")[:64] if version else None,
        )
        session = header(headers, b"mcp-session-id")
        if session is not None:
            ex.session = session.decode("latin-1")[:128]
        state[STATE_KEY] = ex
        scanner: MessageScanner | None = None

        def finish() -> None:
            ex.done = True
            duration = time.perf_counter() - ex.started
            for sink in self.sinks:
                try:
                    sink(ex, duration)
                except Exception:  # a broken sink must not break the answer; it is logged loudly
                    logger.exception("recording the outcome of request %s failed", ex.request_id)

        async def recording_send(message: Message) -> None:
            nonlocal scanner
            if ex.done:
                await send(message)
                return
            kind = message["type"]
            if kind == "http.response.start":
                ex.status = message["status"]
                rpc = ex.rpc
                if rpc is not None and rpc.is_request and ex.status == 200:
                    scanner = MessageScanner(header(message.get("headers", []), b"content-type"))
            elif kind == "http.response.body":
                more = message.get("more_body", False)
                if scanner is not None and ex.rpc is not None:
                    answer = scanner.answer(message.get("body", b""), more, ex.rpc.id)
                    if answer is not None:
                        ex.answer = answer
                        finish()
                if not more and not ex.done:
                    finish()
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            if not ex.done:
                # The app ended (or failed, or the client left) before answering completely.
                ex.status = ex.status or 0
                finish()
