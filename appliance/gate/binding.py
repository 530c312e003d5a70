"""A legacy MCP session belongs to the principal that opened it; anyone else gets 404.

The SDK binds sessions to `scope["user"]` itself, but the gate must hold for any hosted
app, so it records the owner of every session id the app issues and checks it on use.
Entries idle longer than the session idle timeout are forgotten (the app has expired
those sessions too); an unknown id is answered 404, exactly like an expired one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.exchange import exchange, flag
from appliance.gate.jsonrpc import send_rpc_error
from appliance.gate.requests import session_id
from appliance.gate.responses import INVALID_REQUEST

SESSION_HEADER = b"mcp-session-id"
#: How often idle entries are swept out, in seconds.
SWEEP_EVERY = 60.0


class _Owner:
    __slots__ = ("identity", "last_used", "active")

    def __init__(self, identity: tuple[str, str]) -> None:
        self.identity = identity
        self.last_used = time.monotonic()
        self.active = 0


class SessionBinding:
    """Remembers which principal opened each session; refuses the session to anyone else."""

    def __init__(self, app: ASGIApp, idle_timeout: float, max_sessions: int,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.on_change = on_change or (lambda count: None)
        self.owners: dict[bytes, _Owner] = {}
        self.swept = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = exchange(scope)
        if scope["type"] != "http" or ex is None or ex.principal is None:
            await self.app(scope, receive, send)
            return
        identity = ex.principal.identity
        sid = next((v for k, v in scope["headers"] if k == SESSION_HEADER), None)
        if sid is None:
            await self.app(scope, receive, self._recording_send(send, identity))
            return
        ex.session = sid.decode("latin-1")[:128]
        owner = self.owners.get(sid)
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
                self._forget(sid)

    def _recording_send(self, send: Send, identity: tuple[str, str]) -> Send:
        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                issued = next((v for k, v in message.get("headers", []) if k.lower() == SESSION_HEADER), None)
                if issued is not None:
                    self._remember(issued, identity)
            await send(message)

        return recording_send

    def _remember(self, sid: bytes, identity: tuple[str, str]) -> None:
        now = time.monotonic()
        if now - self.swept > SWEEP_EVERY or len(self.owners) >= self.max_sessions:
            self._sweep(now)
        self.owners[sid] = _Owner(identity)
        self.on_change(len(self.owners))

    def _forget(self, sid: bytes) -> None:
        if self.owners.pop(sid, None) is not None:
            self.on_change(len(self.owners))

    def _sweep(self, now: float) -> None:
        """Forget sessions idle past the timeout; at the limit also the least recently used idle ones."""
        self.swept = now
        idle = [(o.last_used, sid) for sid, o in self.owners.items() if o.active == 0]
        for last_used, sid in idle:
            if now - last_used > self.idle_timeout:
                del self.owners[sid]
        excess = len(self.owners) - self.max_sessions + 1
        if excess > 0:
            for _, sid in sorted(p for p in idle if p[1] in self.owners)[:excess]:
                del self.owners[sid]
        self.on_change(len(self.owners))
