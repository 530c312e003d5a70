"""The gate watches a request's body and answer only where something can happen: a body whose
length HTTP/1 does not fix is still cut at the limit, and only an initialize can open a session."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from appliance.gate.auth import Principal
from appliance.gate.binding import SessionBinding
from appliance.gate.exchange import STATE_KEY, Exchange
from appliance.gate.jsonrpc import parse_body
from appliance.gate.limits import BodyLimit
from appliance.gate.registry import SessionRegistry
from appliance.gate.sessions import SessionOwnership

LIMIT = 1000


async def reads_everything(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A hosted app that reads the whole body, then answers with its length."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps({"read": size}).encode()})


def run(app: Any, scope: dict[str, Any], chunks: list[bytes]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def http_scope(headers: dict[bytes, bytes], version: str = "1.1") -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/mcp", "http_version": version,
            "headers": list(headers.items()), "state": {}}


def test_a_body_within_its_declared_length_reaches_the_app_whole() -> None:
    sent = run(BodyLimit(reads_everything, LIMIT), http_scope({b"content-length": b"600"}), [b"x" * 300, b"y" * 300])
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"read": 600}


def test_a_chunked_body_with_a_small_declared_length_is_still_cut_at_the_limit() -> None:
    # Transfer-Encoding wins over Content-Length (RFC 9112 §6.3): the length declared proves nothing.
    scope = http_scope({b"content-length": b"10", b"transfer-encoding": b"chunked"})
    sent = run(BodyLimit(reads_everything, LIMIT), scope, [b"x" * 600, b"y" * 600])
    assert sent[0]["status"] == 413 and "larger than 1000 bytes" in json.loads(sent[1]["body"])["error"]["message"]


def test_an_http2_body_with_a_small_declared_length_is_still_cut_at_the_limit() -> None:
    sent = run(BodyLimit(reads_everything, LIMIT), http_scope({b"content-length": b"10"}, "2"), [b"x" * 600] * 2)
    assert sent[0]["status"] == 413


def request(method: str, session: bytes | None = None) -> dict[str, Any]:
    """A scope as the gate's inner layers get it: parsed body and principal on the record."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}).encode()
    ex = Exchange(started=0.0, http_method="POST")
    ex.rpc = parse_body(body)
    ex.principal = Principal("alice", frozenset({"*"}))
    headers = [(b"content-type", b"application/json")]
    if session is not None:
        headers.append((b"mcp-session-id", session))
    return {"type": "http", "method": "POST", "path": "/mcp", "headers": headers, "state": {STATE_KEY: ex}}


def issues_a_session(sid: bytes) -> Any:
    """A hosted app that hands out session `sid` on every answer, whatever the request."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"mcp-session-id", sid)]})
        await send({"type": "http.response.body", "body": b'{"jsonrpc":"2.0","id":1,"result":{}}'})

    return app


def test_only_an_initialize_opens_a_session_others_issued_are_refused_on_use() -> None:
    registry = SessionRegistry()
    gate = SessionOwnership(SessionBinding(issues_a_session(b"opened"), registry, False, lambda _: None), 0, 3)
    sent = run(gate, request("initialize"), [b""])
    assert dict(sent[0]["headers"])[b"mcp-session-id"] == b"n0w3-opened" and registry.get(b"opened") is not None

    gate = SessionOwnership(SessionBinding(issues_a_session(b"sneaked"), registry, False, lambda _: None), 0, 3)
    sent = run(gate, request("tools/list"), [b""])
    # Neither tagged (nginx cannot route it to this worker) nor bound to anyone: it can never be used.
    assert dict(sent[0]["headers"])[b"mcp-session-id"] == b"sneaked" and registry.get(b"sneaked") is None
    sent = run(gate, request("tools/list", b"sneaked"), [b""])
    assert sent[0]["status"] == 404
    sent = run(gate, request("tools/list", b"n0w3-sneaked"), [b""])
    assert sent[0]["status"] == 404 and json.loads(sent[1]["body"])["error"]["message"] == "Session not found"
