"""Same-origin requests pass the Origin check (foreign ones do not); client request ids only in a safe form."""

from __future__ import annotations

import re
from typing import Any

import pytest

from appliance.gate.hosts import HostOriginCheck, same_origin
from appliance.gate.requests import request_id_of


@pytest.mark.parametrize(("origin", "host", "scheme"), [
    ("http://localhost:8080", "localhost:8080", "http"), ("http://LocalHost", "localhost:80", "http"),
    ("https://localhost", "localhost:443", "https"), ("http://127.0.0.1:9000", "127.0.0.1:9000", "http"),
    ("http://[::1]:8080", "[::1]:8080", "http"), ("https://mcp.example.com:8443", "MCP.example.com:8443", "https"),
])
def test_the_origin_of_the_host_itself_is_same_origin(origin: str, host: str, scheme: str) -> None:
    assert same_origin(origin, host, scheme)


@pytest.mark.parametrize(("origin", "host", "scheme"), [
    ("http://evil.example", "localhost", "http"), ("https://localhost:8080", "localhost:8080", "http"),
    ("http://localhost:8081", "localhost:8080", "http"), ("null", "localhost", "http"),
    ("http://localhost:8080/", "localhost:8080", "http"), ("http://user@localhost", "localhost", "http"),
    ("http://localhost.evil.example", "localhost", "http"), ("http://localhost", "localhost:443", "https"),
])
def test_other_origins_are_not_same_origin(origin: str, host: str, scheme: str) -> None:
    assert not same_origin(origin, host, scheme)


async def check(headers: dict[str, str], allowed_hosts: tuple[str, ...] = ("*",),
                allowed_origins: tuple[str, ...] = ()) -> int:
    statuses: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        statuses.append(200)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "scheme": "http", "method": "POST", "path": "/mcp", "state": {},
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await HostOriginCheck(app, allowed_hosts, allowed_origins)(scope, None, send)  # type: ignore[arg-type]
    return statuses[0]


@pytest.mark.anyio
async def test_same_origin_passes_with_the_default_empty_allowed_origins() -> None:
    assert await check({"Host": "localhost:8080", "Origin": "http://localhost:8080"}) == 200
    assert await check({"Host": "localhost", "Origin": "https://localhost", "X-Forwarded-Proto": "https"}) == 200
    assert await check({"Host": "localhost:8080", "Origin": "http://evil.example"}) == 403
    assert await check({"Host": "localhost", "Origin": "https://localhost"}) == 403  # nginx saw http


@pytest.mark.anyio
async def test_same_origin_of_a_name_only_the_wildcard_allows_is_refused_as_dns_rebinding() -> None:
    # A rebinding page is same-origin to the browser: Host and Origin both name the attacker's domain.
    assert await check({"Host": "rebind.example:8080", "Origin": "http://rebind.example:8080"}) == 403
    assert await check({"Host": "mcp.example.com", "Origin": "http://mcp.example.com"},
                       allowed_hosts=("mcp.example.com",)) == 200


@pytest.mark.parametrize("value", [b"abc", b"req-1.2_3:4", b"A" * 64])
def test_a_safe_client_request_id_is_kept(value: bytes) -> None:
    assert request_id_of(value) == value.decode()


@pytest.mark.parametrize("value", [None, b"", b"A" * 65, b"bad id", b"x\"}", b"\xff", b"a\r\nb", b"a/b"])
def test_an_unsafe_client_request_id_is_replaced_by_a_fresh_one(value: bytes | None) -> None:
    made = request_id_of(value)
    assert re.fullmatch(r"[0-9a-f]{32}", made) and made != request_id_of(value)
