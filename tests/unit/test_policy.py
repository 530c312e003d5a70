"""Tool policy and the JSON-RPC plumbing it stands on: rules, decisions, list filtering (JSON and SSE)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, PolicySettings, load_settings, split_rule
from appliance.gate.auth import Principal
from appliance.gate.jsonrpc import BodyRewriter, MessageScanner, RpcError, parse_body, response_to
from appliance.gate.policy import Policy
from tests.harness import to_toml


def who(*scopes: str) -> Principal:
    return Principal("agent", frozenset(scopes))


def policy(*rules: str, default: str = "allow") -> Policy:
    return Policy(PolicySettings(rules=rules, default=default))  # type: ignore[arg-type]


# --- rules --------------------------------------------------------------------------------


def test_rule_syntax_is_kind_pattern_and_scopes() -> None:
    assert split_rule("tool:delete_* = notes:write notes:admin") == ("tool", "delete_*", ("notes:write", "notes:admin"))
    assert split_rule("resource:notes://*=notes:read") == ("resource", "notes://*", ("notes:read",))


@pytest.mark.parametrize("rule", ["delete_note = x", "tool:delete_note", "tool:a b = x", "widget:x = y", "tool:x ="])
def test_malformed_rules_are_config_errors_naming_the_rule(tmp_path: Path, rule: str) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml({"policy": {"rules": ["tool:ok = s", rule]}}))
    with pytest.raises(ConfigError, match=r"'policy.rules\[1\]'"):
        load_settings(path, {})


def test_default_rules_make_the_notes_write_tools_need_notes_write() -> None:
    default = Policy(PolicySettings())
    refused = default.decide(who(), "tool", "delete_note")
    assert not refused.allowed and refused.missing == "notes:write"
    assert not default.decide(who(), "tool", "add_note").allowed
    assert default.decide(who("notes:write"), "tool", "delete_note").allowed
    assert default.decide(who(), "tool", "search_notes").allowed


def test_first_matching_rule_decides() -> None:
    p = policy("tool:delete_everything = root", "tool:delete_* = writer")
    assert not p.decide(who("writer"), "tool", "delete_everything").allowed
    assert p.decide(who("writer"), "tool", "delete_note").allowed


def test_every_scope_of_a_rule_is_required_and_the_first_missing_is_named() -> None:
    decision = policy("prompt:research_* = a b c").decide(who("a", "c"), "prompt", "research_prompt")
    assert not decision.allowed and decision.missing == "b" and decision.required == ("a", "b", "c")


def test_kinds_do_not_cross() -> None:
    p = policy("tool:secret = s")
    assert p.decide(who(), "prompt", "secret").allowed


def test_resources_match_on_their_uri() -> None:
    p = policy("resource:notes://* = notes:read")
    assert not p.decide(who(), "resource", "notes://7").allowed
    assert p.decide(who("notes:read"), "resource", "notes://7").allowed


def test_default_deny_refuses_what_no_rule_names_but_not_the_all_scopes_principal() -> None:
    p = policy("tool:get_* = r", default="deny")
    assert p.decide(who("r"), "tool", "get_note").allowed
    assert p.decide(who("r"), "tool", "search").reason == "default_deny"
    assert p.decide(who("*"), "tool", "search").allowed


# --- JSON-RPC parsing ---------------------------------------------------------------------


def test_tools_call_is_parsed_once_into_method_id_name_and_arguments() -> None:
    call = parse_body(b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}')
    assert (call.method, call.id, call.kind, call.name, call.arguments) == ("tools/call", 7, "tool", "add", {"a": 1})
    assert call.is_request


def test_resources_read_names_the_uri_and_initialize_the_version() -> None:
    assert parse_body(b'{"jsonrpc":"2.0","id":"r","method":"resources/read","params":{"uri":"notes://1"}}').name == "notes://1"
    init = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}')
    assert init.protocol_version == "2025-11-25"


def test_notifications_and_client_responses_are_not_requests() -> None:
    assert not parse_body(b'{"jsonrpc":"2.0","method":"notifications/initialized"}').is_request
    answer = parse_body(b'{"jsonrpc":"2.0","id":3,"result":{}}')
    assert answer.method is None and not answer.is_request


def test_batches_are_parsed_member_by_member() -> None:
    call = parse_body(b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}},'
                      b'{"jsonrpc":"2.0","method":"notifications/initialized"}]')
    assert call.method == "batch" and [c.name for c in call.batch] == ["x", None]


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"{", -32700), (b"\xff\xfe", -32700), (b"", -32700), (b"[]", -32600), (b"42", -32600), (b'"x"', -32600),
     (b'{"id":1,"method":"ping"}', -32600), (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', -32600),
     (b'{"jsonrpc":"2.0","id":1,"method":5}', -32600), (b'{"jsonrpc":"2.0","id":{},"method":"ping"}', -32600),
     (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":3}', -32600), (b'{"jsonrpc":"2.0","id":1}', -32600),
     (b"[1]", -32600)],
)
def test_malformed_bodies_are_rejected_with_the_json_rpc_code(body: bytes, code: int) -> None:
    with pytest.raises(RpcError) as err:
        parse_body(body)
    assert err.value.code == code


# --- responses: scanning and rewriting ----------------------------------------------------

TOOLS = {"jsonrpc": "2.0", "id": 4, "result": {"tools": [{"name": "add_note"}, {"name": "delete_note"},
                                                        {"name": "search_notes"}]}}


def sse(*messages: Any, newline: bytes = b"\r\n") -> bytes:
    return b"".join(b"event: message" + newline + b"data: " + json.dumps(m).encode() + newline + newline
                    for m in messages)


def test_scanner_finds_the_response_in_json_and_in_sse_split_anywhere() -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}
    answer = {"jsonrpc": "2.0", "id": 9, "result": {"content": [], "isError": True}}
    stream = sse(progress, answer)
    for cut in range(1, len(stream)):
        scanner = MessageScanner(b"text/event-stream")
        found = scanner.feed(stream[:cut], True) + scanner.feed(stream[cut:], False)
        assert [response_to(m, 9) for m in found] == [None, ("result", True)]
    json_scanner = MessageScanner(b"application/json")
    assert json_scanner.feed(json.dumps(answer)[:10].encode(), True) == []
    assert json_scanner.feed(json.dumps(answer)[10:].encode(), False) == [answer]


def test_response_to_tells_errors_and_tool_errors_apart() -> None:
    assert response_to({"jsonrpc": "2.0", "id": 1, "error": {"code": -1}}, 1) == ("error", False)
    assert response_to({"jsonrpc": "2.0", "id": 1, "result": {"isError": False}}, 1) == ("result", False)
    assert response_to({"jsonrpc": "2.0", "id": 2, "result": {}}, 1) is None


async def rewrite(policy_: Policy, principal: Principal, content_type: bytes, chunks: list[bytes]) -> tuple[dict[str, Any], bytes]:
    out: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    rewriter = BodyRewriter(send, lambda m: policy_.filtered(principal, "tools/list", m))
    await rewriter({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", b"999")]})
    for i, chunk in enumerate(chunks):
        await rewriter({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
    body = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    return out[0], body


@pytest.mark.anyio
async def test_tools_list_json_hides_tools_the_caller_may_not_call() -> None:
    body = json.dumps(TOOLS).encode()
    start, out = await rewrite(Policy(PolicySettings()), who(), b"application/json", [body[:20], body[20:]])
    assert [t["name"] for t in json.loads(out)["result"]["tools"]] == ["search_notes"]
    assert dict(start["headers"])[b"content-length"] == str(len(out)).encode()


@pytest.mark.anyio
@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
async def test_tools_list_sse_is_filtered_event_by_event(newline: bytes) -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "hi"}}
    stream = sse(progress, TOOLS, newline=newline)
    start, out = await rewrite(Policy(PolicySettings()), who("notes:write"), b"text/event-stream",
                               [stream[:7], stream[7:50], stream[50:]])
    assert b"content-length" not in dict(start["headers"])
    events = [e for e in out.split(newline * 2) if e]
    datas = [json.loads(line[6:]) for e in events for line in e.split(newline) if line.startswith(b"data: ")]
    assert datas[0] == progress
    assert [t["name"] for t in datas[1]["result"]["tools"]] == ["add_note", "delete_note", "search_notes"]
    assert all(e.startswith(b"event: message") for e in events)


def test_restricts_is_false_when_nothing_could_be_hidden() -> None:
    p = Policy(PolicySettings())
    assert p.restricts(who()) and not p.restricts(who("notes:write")) and not p.restricts(who("*"))
