"""A legacy MCP session belongs to the principal that opened it; anyone else gets 404.

The SDK binds sessions to `scope["user"]` itself, but the gate must hold for any hosted
app, so it records the owner of every session id the app issues (in the worker's one
`SessionRegistry`, gate/registry.py) and checks it on use. An unknown id is answered
404, exactly like an expired one. A new session (an `initialize` without a session id)
is refused while the worker is full (`mcp.max_sessions`: 503) or while its principal
holds its share (`mcp.max_sessions_per_principal`: 429; not for limits.exempt clients),
so no caller can take every slot; likewise while the server it is for has its own caps
full ([servers.<name>] max_sessions: 503, max_sessions_per_principal: 429).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.exchange import exchange, flag
from appliance.gate.jsonrpc import send_rpc_error
from appliance.gate.limits import LIMITED, is_exempt, limit_key
from appliance.gate.registry import NO_CAPS, ServerCaps, SessionRegistry
from appliance.gate.requests import session_id
from appliance.gate.responses import INVALID_REQUEST

SESSION_HEADER = b"mcp-session-id"


class SessionBinding:
    """Records which principal opened each session; refuses the session to anyone else."""

    def __init__(self, app: ASGIApp, registry: SessionRegistry, by_address: bool,
                 refused: Callable[[str], None], retry_after: int = 1, caps: ServerCaps = NO_CAPS) -> None:
        self.app = app
        self.registry = registry
        #: The hosted server's own caps.
        self.caps = caps
        self.by_address = by_address
        self.refused = refused
        self.retry_after = [(b"retry-after", str(retry_after).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = exchange(scope)
        if scope["type"] != "http" or ex is None or ex.principal is None:
            await self.app(scope, receive, send)
            return
        identity = ex.principal.identity
        sid = next((v for k, v in scope["headers"] if k == SESSION_HEADER), None)
        if sid is None:
            await self._without_session(scope, receive, send, identity)
            return
        ex.session = sid.decode("latin-1")[:128]
        owner = self.registry.get(sid)
        if owner is None or owner.identity != identity:
            if owner is not None:
                flag(scope, "session_owner")
                ex.authz = ("denied", "session_owner")
            await send_rpc_error(send, 404, INVALID_REQUEST, "Session not found", ex.rpc.id if ex.rpc else None)
            return
        owner.active += 1
        status = 0

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = session_id.set(ex.session)
        try:
            await self.app(scope, receive, watching_send)
        finally:
            session_id.reset(token)
            owner.active -= 1
            owner.last_used = time.monotonic()
            # A DELETE ends the session; a 404 means the app no longer knows it.
            if status == 404 or (scope["method"] == "DELETE" and 200 <= status < 300):
                self.registry.forget(sid)

    async def _without_session(self, scope: Scope, receive: Receive, send: Send, identity: tuple[str, str]) -> None:
        ex = exchange(scope)
        assert ex is not None
        if not ex.opens_session:
            # An id the app issued anyway stays unknown here, so its use gets 404.
            await self.app(scope, receive, send)
            return
        key = limit_key(ex, self.by_address)
        refusal = self.registry.reserve(key, capped=not is_exempt(scope), caps=self.caps)
        if refusal is not None:
            await self._refuse(scope, send, refusal)
            return

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                issued = next((v for k, v in message.get("headers", []) if k.lower() == SESSION_HEADER), None)
                if issued is not None:
                    self.registry.add(issued, identity, key, self.caps.server)
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.registry.release(key, self.caps.server)

    async def _refuse(self, scope: Scope, send: Send, refusal: str) -> None:
        ex = exchange(scope)
        assert ex is not None
        self.refused(refusal)
        ex.denied = refusal + "_limit"
        request_id = ex.rpc.id if ex.rpc else None
        if refusal in ("sessions", "server_sessions"):
            # Full for everyone: a server condition, worth retrying elsewhere.
            cap = (f"mcp.max_sessions = {self.registry.max_sessions}" if refusal == "sessions"
                   else f"{self.caps.table}.max_sessions = {self.caps.max_sessions}")
            whose = "" if refusal == "sessions" else f" with server {self.caps.server!r}"
            await send_rpc_error(send, 503, LIMITED, f"Too many open sessions{whose} on this worker ({cap}); retry later",
                                 request_id, headers=self.retry_after)
            return
        at_most = (f"at most {self.registry.max_per_key} per worker" if refusal == "principal_sessions"
                   else f"at most {self.caps.max_per_key} with server {self.caps.server!r} per worker, "
                   f"{self.caps.table}.max_sessions_per_principal")
        await send_rpc_error(send, 429, LIMITED, f"Too many open sessions for this caller ({at_most}): close one "
                             "(DELETE) or let an idle one expire", request_id, headers=self.retry_after)
