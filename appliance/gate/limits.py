"""Limits inside the worker: the request body size, and the request rate per verified principal.

nginx limits every request per client address (it cannot verify a credential); here,
after authentication, each principal gets one share of `limits.rate` on this host, in
buckets all workers share (gate/buckets.py), however its credential was spelled. With
auth.mode = "none" nobody is verified: the share is per client address instead.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.buckets import SharedBuckets
from appliance.gate.exchange import Exchange, exchange, flag
from appliance.gate.jsonrpc import send_rpc_error
from appliance.gate.responses import header, send_jsonrpc_error

#: The JSON-RPC code of a refusal by a limit (as nginx's own 429 body).
LIMITED = -32000
#: Set by nginx for clients in limits.exempt ("1"), replacing whatever a client sent.
EXEMPT_HEADER = b"x-appliance-limit-exempt"


def limit_key(ex: Exchange, by_address: bool) -> bytes:
    """What a limit counts against: the verified principal, or (by_address) the client address."""
    if by_address or ex.principal is None:
        return b"a:" + (ex.client or "unknown").encode("latin-1", "replace")
    issuer, name = ex.principal.identity
    return b"p:" + issuer.encode("utf-8", "surrogatepass") + b"\0" + name.encode("utf-8", "surrogatepass")


def is_exempt(scope: Scope) -> bool:
    """Whether nginx said this client is in limits.exempt."""
    return header(scope["headers"], EXEMPT_HEADER) == b"1"


class RateLimit:
    """429 with Retry-After once the caller's shared bucket is empty; 503 when the table is unusable."""

    def __init__(self, app: ASGIApp, buckets: SharedBuckets, retry_after: int, by_address: bool,
                 refused: Callable[[str], None]) -> None:
        self.app = app
        self.buckets = buckets
        self.by_address = by_address
        self.refused = refused
        self.retry_after = [(b"retry-after", str(retry_after).encode())]
        self.message = f"Too many requests: retry after {retry_after}s"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = exchange(scope)
        if scope["type"] != "http" or ex is None or is_exempt(scope):
            await self.app(scope, receive, send)
            return
        key = limit_key(ex, self.by_address)
        try:
            allowed = self.buckets.take(key)
        except (OSError, ValueError) as exc:
            # Cannot tell whether the caller is over its share: refuse rather than pass (fail closed).
            self.refused("limiter_error")
            ex.denied = "rate_limiter_unavailable"
            await send_rpc_error(send, 503, LIMITED, f"Rate limiter unavailable: {exc}", headers=self.retry_after)
            return
        if not allowed:
            limit = "client" if key.startswith(b"a:") else "principal"
            self.refused(limit)
            ex.denied = "rate_limited"
            await send_rpc_error(send, 429, LIMITED, self.message, headers=self.retry_after)
            return
        await self.app(scope, receive, send)


#: HTTP versions whose body, without Transfer-Encoding, is exactly its Content-Length (RFC 9112 §6.3).
_FRAMED_BY_LENGTH = frozenset({"1.0", "1.1"})


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
            if scope.get("http_version") in _FRAMED_BY_LENGTH and header(scope["headers"], b"transfer-encoding") is None:
                # HTTP/1 without Transfer-Encoding (which would win over the length): hypercorn's h11
                # hands the app exactly the declared bytes, never more, so there is nothing to watch.
                await self.app(scope, receive, send)
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
