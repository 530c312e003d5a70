"""DNS-rebinding protection that works behind nginx: Host and Origin checked against config.

An Origin passes when mcp.allowed_origins lists it, or when it is the origin of the very
Host the request was sent to (same-origin: a page served by this host calling its own
endpoint). The scheme is what nginx received (X-Forwarded-Proto, which nginx always
sets), default ports are implied (80 for http, 443 for https), and names compare
without regard to case. A foreign Origin, or "null", needs an allowed_origins entry.

Same-origin is trusted only for a Host that DNS rebinding cannot forge: an IP address,
localhost, or a name mcp.allowed_hosts lists (not just "*"). A rebinding page's requests
are same-origin to the browser (Host and Origin both name the attacker's domain), so with
allowed_hosts = ["*"] such a name still needs its origin in allowed_origins.
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.gate.exchange import flag
from appliance.gate.responses import header, send_jsonrpc_error

_DEFAULT_PORTS = {"http": "80", "https": "443"}


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """True when `host` matches an entry: exact, "*" (any), or "name:*" (any port of name)."""
    if "*" in allowed:
        return True
    if host in allowed:
        return True
    return any(a.endswith(":*") and (host == a[:-2] or host.startswith(a[:-1])) for a in allowed)


def _authority(scheme: str, hostport: str) -> str | None:
    """`host:port` in lower case with the scheme's default port made explicit (None: malformed)."""
    hostport = hostport.lower()
    bracket = hostport.rfind("]")
    colon = hostport.rfind(":")
    if colon > bracket:
        host, port = hostport[:colon], hostport[colon + 1 :]
        if not port.isascii() or not port.isdigit():
            return None
        port = str(int(port))
    else:
        host, port = hostport, _DEFAULT_PORTS[scheme]
    if not host or any(c in host for c in "/?#@ \\"):
        return None
    return f"{host}:{port}"


def _host_name(hostport: str) -> str:
    bracket = hostport.rfind("]")
    colon = hostport.rfind(":")
    name = hostport[:colon] if colon > bracket else hostport
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def rebinding_proof(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether a browser can send this Host only from a page really on it (see the module docstring)."""
    name = _host_name(host).lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return host_allowed(host, tuple(a for a in allowed_hosts if a != "*"))
    return True


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether `origin` (an Origin header) is the origin of `host` reached over `scheme`."""
    if scheme not in _DEFAULT_PORTS:
        return False
    origin_scheme, sep, rest = origin.partition("://")
    if not sep or origin_scheme.lower() != scheme or not rest:
        return False
    mine, theirs = _authority(scheme, host), _authority(scheme, rest)
    return mine is not None and mine == theirs


class HostOriginCheck:
    """421 for a Host that is not allowed, 403 for an Origin that is neither same-origin nor allowed.

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
        if origin is not None:
            text = origin.decode("latin-1")
            # nginx sets X-Forwarded-Proto to its own $scheme; without nginx, the worker's.
            proto = header(headers, b"x-forwarded-proto")
            scheme = proto.decode("latin-1").lower() if proto else scope.get("scheme", "http")
            same = same_origin(text, host, scheme) and rebinding_proof(host, self.allowed_hosts)
            if not same and not host_allowed(text, self.allowed_origins):
                flag(scope, "bad_origin")
                await send_jsonrpc_error(send, 403, "Forbidden: Origin not allowed")
                return
        await self.app(scope, receive, send)
