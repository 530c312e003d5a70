"""Request id and in-flight accounting for every request that reaches the worker."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.gate.responses import header
from appliance.gate.stats import WorkerStats

#: The id of the request being served, for log records (nginx's X-Request-ID when present).
request_id: ContextVar[str] = ContextVar("request_id", default="-")
#: The principal and the (client-visible) session id of the request being served, for log records.
principal_name: ContextVar[str | None] = ContextVar("principal_name", default=None)
session_id: ContextVar[str | None] = ContextVar("session_id", default=None)

#: A request id the client may choose: what nginx's map accepts too (conf/nginx.conf.j2).
SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def request_id_of(value: bytes | None) -> str:
    """The client's X-Request-ID when it is in the safe format, else a fresh id."""
    if value is not None and SAFE_REQUEST_ID.fullmatch(value):
        return value.decode("ascii")
    return uuid.uuid4().hex


class RequestContext:
    """Takes nginx's X-Request-ID (or makes one when it is missing or unsafe) and counts requests in flight."""

    def __init__(self, app: ASGIApp, stats: WorkerStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        value = request_id_of(header(scope["headers"], b"x-request-id"))
        token = request_id.set(value)
        scope.setdefault("state", {})["request_id"] = value
        self.stats.requests += 1
        self.stats.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.stats.in_flight -= 1
            request_id.reset(token)
