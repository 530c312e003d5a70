"""Request body limit inside the worker, for hosted apps that do not enforce one."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.exchange import flag
from appliance.gate.responses import header, send_jsonrpc_error


class BodyTooLarge(Exception):
    """Raised into the hosted app when a streamed body passes the limit."""


class BodyLimit:
    """413 for a declared Content-Length over the limit; cuts a streamed body that grows past it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope["headers"], b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await send_jsonrpc_error(send, 400, "Bad Content-Length")
                return
            if too_big:
                flag(scope, "oversize")
                await send_jsonrpc_error(send, 413, f"Request body larger than {self.max_bytes} bytes")
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def watch_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watch_send)
        except BodyTooLarge:
            flag(scope, "oversize")
            if not started:
                await send_jsonrpc_error(send, 413, f"Request body larger than {self.max_bytes} bytes")
