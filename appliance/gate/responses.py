"""JSON-RPC error answers the gate sends without bothering the hosted app (the one sender of them)."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

# JSON-RPC codes the MCP spec uses for transport-level refusals.
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603


async def send_rpc_error(send: Send, status: int, code: int, message: str, request_id: Any = None,
                         data: Any = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON-RPC error answer with the request's id (null when unknown)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode()
    await send_json(send, status, body, headers)


async def send_jsonrpc_error(
    send: Send,
    status: int,
    message: str,
    *,
    code: int = INVALID_REQUEST,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with `status` and a JSON-RPC error body that has no request id."""
    await send_rpc_error(send, status, code, message, headers=headers)


async def send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a complete JSON response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def header(scope_headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes), or None."""
    for key, value in scope_headers:
        if key == name:
            return value
    return None
