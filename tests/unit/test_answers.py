"""mcp.json_response = "auto": which requests the hosted MCPServer answers as one JSON body."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp.server.mcpserver import MCPServer

from appliance.answers import _answer_json, answer_per_request, answers_json
from appliance.gate.exchange import STATE_KEY, Exchange
from appliance.gate.jsonrpc import parse_body
from tests.integration.clients import LEGACY_VERSION, MODERN_VERSION, modern_request


def scope_of(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The scope the hosted app gets from the gate: its record holds the parsed body."""
    ex = Exchange(started=0.0, http_method="POST")
    ex.rpc = parse_body(body)
    return {"type": "http", "method": "POST", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "state": {STATE_KEY: ex}}


def with_meta(body: bytes, **meta: Any) -> bytes:
    message = json.loads(body)
    message["params"]["_meta"].update(meta)
    return json.dumps(message).encode()


def test_a_plain_2026_call_is_answered_as_json() -> None:
    assert answers_json(scope_of(*modern_request("tools/call", "add", {"name": "add", "arguments": {}})))


@pytest.mark.parametrize("meta", [{"progressToken": "p1"}, {"progressToken": 7},
                                  {"io.modelcontextprotocol/logLevel": "info"}])
def test_a_2026_call_that_asks_for_progress_or_log_messages_streams(meta: dict[str, Any]) -> None:
    headers, body = modern_request("tools/call", "add", {"name": "add", "arguments": {}})
    assert not answers_json(scope_of(headers, with_meta(body, **meta)))


def test_a_listen_streams() -> None:
    assert not answers_json(scope_of(*modern_request("subscriptions/listen", None, {"notifications": {}})))


def test_legacy_requests_and_requests_without_a_version_header_stream() -> None:
    headers, body = modern_request("tools/call", "add", {"name": "add", "arguments": {}})
    assert not answers_json(scope_of({**headers, "MCP-Protocol-Version": LEGACY_VERSION}, body))
    without = {k: v for k, v in headers.items() if k != "MCP-Protocol-Version"}
    # A legacy initialize naming the 2026 version in its body opens a session: its mode is the header's era.
    init = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"protocolVersion": MODERN_VERSION, "capabilities": {},
                                  "clientInfo": {"name": "t", "version": "1"}}}).encode()
    assert not answers_json(scope_of(without, init))


def test_notifications_and_requests_the_gate_did_not_parse_stream() -> None:
    headers, _ = modern_request("tools/call", "add", {"name": "add", "arguments": {}})
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}).encode()
    assert not answers_json(scope_of(headers, note))
    assert not answers_json({"type": "http", "method": "POST", "headers": [], "state": {}})


def test_the_session_manager_reads_the_choice_of_the_request_being_served() -> None:
    server = MCPServer("t")
    server.streamable_http_app(json_response=False)
    manager = server.session_manager
    answer_per_request(manager)
    assert manager.json_response is False  # legacy sessions and every request not chosen: streams
    token = _answer_json.set(True)
    try:
        assert manager.json_response is True
    finally:
        _answer_json.reset(token)
