"""Session ownership: the ids a hosted app issues are tagged with the worker that owns them.

The hosted app issues `abc…`; the client sees `n<node>w<worker>-abc…`; nginx routes on
the tag; the hosted app gets `abc…` back. The unguessable part is kept, the tag is
visible ASCII, and the hosted app never knows, so this works for any ASGI MCP app.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.exchange import exchange
from appliance.gate.responses import header, send_jsonrpc_error

SESSION_HEADER = b"mcp-session-id"
_TAG = re.compile(r"^n(\d+)w(\d+)-")


def owner_prefix(node: int, worker: int) -> str:
    """The tag that marks a session as owned by `worker` of `node`."""
    return f"n{node}w{worker}-"


def parse_owner(session_id: str) -> tuple[int, int] | None:
    """(node, worker) named by a tagged session id, or None for an untagged one."""
    match = _TAG.match(session_id)
    return (int(match[1]), int(match[2])) if match else None


class SessionOwnership:
    """Strips this worker's tag from incoming session ids and adds it to issued ones."""

    def __init__(self, app: ASGIApp, node: int, worker: int) -> None:
        self.app = app
        self.prefix = owner_prefix(node, worker).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = header(scope["headers"], SESSION_HEADER)
        if incoming is not None:
            if not incoming.startswith(self.prefix):
                # Owned by another worker or pod (or forged): this process cannot know it.
                await send_jsonrpc_error(send, 404, "Session not found")
                return
            scope = dict(scope)
            scope["headers"] = [
                (k, v[len(self.prefix) :] if k == SESSION_HEADER else v) for k, v in scope["headers"]
            ]
        elif (ex := exchange(scope)) is not None and not ex.opens_session:
            # No session in, none to come out (an untagged id an app issued anyway would reach
            # no worker, whose tag check answers 404).
            await self.app(scope, receive, send)
            return

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = []
                for key, value in message.get("headers", []):
                    if key.lower() == SESSION_HEADER:
                        value = self.prefix + value
                    out.append((key, value))
                message = {**message, "headers": out}
            await send(message)

        await self.app(scope, receive, tagging_send)
