"""mcp.json_response = "auto": each 2026-07-28 request answered as one JSON body unless it can stream.

The SDK answers a POST either as an SSE stream (json_response false) or as one JSON body
(true), for the whole app. A stream carries what a call sends before its result:
progress, log messages, a subscriptions/listen's events. A 2026-07-28 request gets those
only when it asks for them in params._meta (a progressToken, or a log level: log
delivery is opt-in per request in that revision) or is a listen; its server cannot ask
the client anything mid-call (multi-round-trip requests answer an InputRequiredResult,
which is a plain result). Every other 2026-07-28 request has nothing to stream, and the
JSON answer costs the SDK far less (no stream, no second task per call: bench/RESULTS.md).

So with "auto" the hosted MCPServer runs in SSE mode, and its session manager takes the
JSON path for just those requests, chosen here per request (a context variable the
manager's `json_response` reads, in the request's own task). Legacy requests (2025-11-25
and earlier) always stream: in those revisions a tool may log, report progress or send
requests to the client (elicitation, sampling) over its POST's stream without asking
first, and a session's mode is fixed when it opens.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.gate.exchange import exchange
from appliance.gate.responses import header

#: True while the hosted app serves a request that is to be answered as one JSON body.
_answer_json: ContextVar[bool] = ContextVar("answer_json", default=False)


class _PerRequestAnswers(StreamableHTTPSessionManager):
    """The SDK's session manager with `json_response` read per request (see the module docstring)."""

    @property  # type: ignore[override]
    def json_response(self) -> bool:
        return _answer_json.get()

    @json_response.setter
    def json_response(self, value: bool) -> None:
        pass  # set by the SDK's __init__: the choice is made per request instead


def answer_per_request(manager: StreamableHTTPSessionManager) -> None:
    """Make `manager` (the hosted MCPServer's, built with json_response=False) choose per request."""
    if type(manager) is not StreamableHTTPSessionManager:
        raise TypeError(f"cannot choose answers per request for a {type(manager).__name__}")
    manager.__class__ = _PerRequestAnswers


def answers_json(scope: Scope) -> bool:
    """Whether the request is a 2026-07-28 request that asked for nothing to be streamed.

    Unknown (no record of the gate, no parsed body): it streams, as the SDK would.
    """
    ex = exchange(scope)
    rpc = ex.rpc if ex is not None else None
    if rpc is None or not rpc.is_request or rpc.notified:
        return False
    # The SDK's own era routing: the header alone (never the body), not a handshake version.
    version = header(scope["headers"], b"mcp-protocol-version")
    return version is not None and version.decode("latin-1") not in HANDSHAKE_PROTOCOL_VERSIONS


class AutoAnswers:
    """ASGI wrapper of the hosted app: sets the per-request choice for the request's own task."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        if scope["type"] != "http" or scope["method"] != "POST" or not answers_json(scope):
            await self.app(scope, receive, send)
            return
        token = _answer_json.set(True)
        try:
            await self.app(scope, receive, send)
        finally:
            _answer_json.reset(token)
