"""DNS-rebinding protection that works behind nginx: Host and Origin checked against config."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.gate.exchange import flag
from appliance.gate.responses import header, send_jsonrpc_error


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """True when `host` matches an entry: exact, "*" (any), or "name:*" (any port of name)."""
    if "*" in allowed:
        return True
    if host in allowed:
        return True
    return any(a.endswith(":*") and (host == a[:-2] or host.startswith(a[:-1])) for a in allowed)


class HostOriginCheck:
    """421 for a Host that is not allowed, 403 for an Origin that is not allowed.

    nginx forwards the client's Host unchanged, so the check sees what the client sent
    (the SDK's own check would only ever see loopback addresses or refuse everything).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        host = (header(headers, b"host") or b"").decode("latin-1")
        if not host or not host_allowed(host, self.allowed_hosts):
            flag(scope, "bad_host")
            await send_jsonrpc_error(send, 421, "Misdirected request: Host not allowed")
            return
        origin = header(headers, b"origin")
        if origin is not None and not host_allowed(origin.decode("latin-1"), self.allowed_origins):
            flag(scope, "bad_origin")
            await send_jsonrpc_error(send, 403, "Forbidden: Origin not allowed")
            return
        await self.app(scope, receive, send)
