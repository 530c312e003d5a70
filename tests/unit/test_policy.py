"""Tool policy and the JSON-RPC plumbing it stands on: rules, decisions, spellings of URIs, what the gate
must classify, list filtering (JSON and SSE)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import ConfigError, PolicySettings, load_settings, split_rule
from appliance.gate.auth import Principal
from appliance.gate.exchange import STATE_KEY, Exchange
from appliance.gate.jsonrpc import BodyRewriter, JsonRpcBody, MessageScanner, RpcError, parse_body, response_to
from appliance.gate.policy import Policy, PolicyCheck
from appliance.gate.resources import CanonicalOnly, SdkResources, Unresolvable
from appliance.servers.notes import create_server
from appliance.uris import canonical_uri
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


# --- spelling does not matter: canonical and resolved resource URIs -----------------------



UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


@pytest.mark.parametrize(("spelled", "canonical"), [
    ("notes://%31", "notes://1"), ("NOTES://1", "notes://1"), ("Notes://%4e%6f%74%65", "notes://note"),
    ("HTTP://Example.COM:80", "http://example.com/"), ("https://h:443/a/./b/../c", "https://h/a/c"),
    ("notes://1/%7e%2f", "notes://1/~%2F"), ("notes://a b", "notes://a%20b"), ("notes://%zz", "notes://%25zz"),
    ("%6Eotes://1", "notes://1"), ("notes://1:", "notes://1"), ("notes://1", "notes://1"),
])
def test_canonical_uri_follows_rfc3986_normalisation(spelled: str, canonical: str) -> None:
    assert canonical_uri(spelled) == canonical


uris = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) \
    | st.builds(lambda s, h, p: f"{s}://{h}/{p}", st.sampled_from(["notes", "http", "HTTPS", "x+y"]),
                st.text(alphabet=UNRESERVED + "%:@", max_size=12), st.text(alphabet=UNRESERVED + "/.%?#=&", max_size=20))


@given(uris)
def test_canonical_uri_is_idempotent(uri: str) -> None:
    once = canonical_uri(uri)
    assert canonical_uri(once) == once


@given(uris, st.randoms(use_true_random=False))
def test_percent_encoding_unreserved_characters_or_changing_scheme_case_does_not_change_the_canonical_uri(
        uri: str, rnd: Any) -> None:
    # The hex digits of a triplet already in the URI are not characters of their own: encoding
    # one would change what the URI says ('%00' into '%%300'), so only characters outside triplets.
    in_triplet = set()
    for match in re.finditer(r"%[0-9A-Fa-f]{2}", uri):
        in_triplet.update(range(match.start(), match.end()))
    respelled = "".join(f"%{ord(c):02{'x' if rnd.random() < 0.5 else 'X'}}"
                        if c in UNRESERVED and i not in in_triplet and rnd.random() < 0.5 else c
                        for i, c in enumerate(uri))
    scheme, sep, rest = uri.partition("://")
    if sep and scheme.isascii() and scheme.isalpha():
        assert canonical_uri(scheme.swapcase() + sep + rest) == canonical_uri(uri)
    assert canonical_uri(respelled) == canonical_uri(uri)


#: The notes server's resources (nothing is read: resolving a URI never opens the database).
NOTES_RESOURCES = SdkResources(create_server(lambda: Path("/nonexistent/notes.db")))


@pytest.fixture(scope="module")
def notes_resources() -> SdkResources:
    return NOTES_RESOURCES


SPELLINGS_OF_NOTE_1 = ["notes://1", "notes://%31", "notes://01", "notes://+1", "notes://1%20", "NOTES://1",
                       "notes://%2B1", "notes://1.0", "notes://%20%31", "notes://0001"]


@pytest.mark.parametrize("spelled", SPELLINGS_OF_NOTE_1)
def test_a_resource_rule_holds_for_every_spelling_the_notes_server_reads_as_that_note(
        notes_resources: SdkResources, spelled: str) -> None:
    p = Policy(PolicySettings(rules=("resource:notes://1 = secret",)), notes_resources)
    refused = p.decide(who(), "resource", spelled)
    assert not refused.allowed and refused.missing == "secret", (spelled, refused)
    assert p.decide(who("secret"), "resource", spelled).allowed
    assert p.decide(who(), "resource", "notes://2").allowed


note_1_spellings = st.builds(
    lambda scheme, sign, zeros, digit, pad: f"{scheme}://{sign}{zeros}{digit}{pad}",
    st.sampled_from(["notes", "NOTES", "Notes", "%6Eotes"]), st.sampled_from(["", "+", "%2B", "%2b"]),
    st.sampled_from(["", "0", "00", "%30", "0%30"]), st.sampled_from(["1", "%31"]),
    st.sampled_from(["", "%20", " ", ".0", "%2E0"]))


@given(note_1_spellings)
def test_no_generated_spelling_of_note_1_escapes_its_rule(spelled: str) -> None:
    p = Policy(PolicySettings(rules=("resource:notes://1 = secret",)), NOTES_RESOURCES)
    assert not p.decide(who(), "resource", spelled).allowed, spelled


def test_the_notes_template_resolves_what_the_server_would_read(notes_resources: SdkResources) -> None:
    assert notes_resources.resolve("notes://+7") == "notes://7"
    assert notes_resources.resolve("notes://abc") is None  # the server cannot read it either
    assert notes_resources.resolve("elsewhere://1") is None


def test_for_other_apps_only_the_canonical_spelling_is_vouched_for() -> None:
    p = Policy(PolicySettings(rules=("resource:notes://1 = secret",)), CanonicalOnly())
    decision = p.decide(who("other"), "resource", "NOTES://1")
    assert not decision.allowed and decision.reason == "uncanonical" and "'notes://1'" in (decision.detail or "")
    assert isinstance(CanonicalOnly().resolve("notes://%31"), Unresolvable)
    assert p.decide(who("secret", "other"), "resource", "notes://1").allowed
    assert p.decide(who("*"), "resource", "NOTES://1").allowed  # nothing could be refused to "*"


def test_a_resource_rule_not_in_canonical_form_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml({"policy": {"rules": ["resource:notes://* = r", "resource:NOTES://%31 = s"]}}))
    with pytest.raises(ConfigError, match=r"'policy.rules\[1\]'.*canonical form.*'notes://1'"):
        load_settings(path, {})


# --- what the gate must classify ----------------------------------------------------------


def listen(notifications: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 5, "method": "subscriptions/listen",
                       "params": {"notifications": notifications}}).encode()


def test_subscriptions_listen_names_every_resource_it_subscribes_to() -> None:
    call = parse_body(listen({"resourceSubscriptions": ["notes://1", "notes://2"], "resource_subscriptions": ["notes://3"],
                              "toolsListChanged": True}))
    assert call.kind == "resource" and call.subjects == ("notes://1", "notes://2", "notes://3")
    only_lists = parse_body(listen({"toolsListChanged": True}))
    assert only_lists.kind is None and only_lists.unclassified is None


@pytest.mark.parametrize("body", [
    {"method": "tools/call", "params": {"arguments": {}}},
    {"method": "resources/read", "params": {"uri": 5}},
    {"method": "subscriptions/listen", "params": {"notifications": {"resourceSubscriptions": "notes://1"}}},
    {"method": "completion/complete", "params": {"ref": {"type": "ref/other"}}},
    {"method": "x/read", "params": {"target": {"uri": "notes://1"}}},
    {"method": "x/get", "params": {"toolName": "delete_note"}},
    {"method": "x/get", "params": ["notes://1"]},
])
def test_calls_whose_subject_the_gate_cannot_tell_are_marked_unclassified(body: dict[str, Any]) -> None:
    assert parse_body(json.dumps({"jsonrpc": "2.0", "id": 1, **body}).encode()).unclassified


def test_an_unknown_method_naming_nothing_is_left_to_the_app() -> None:
    meta = {"io.modelcontextprotocol/clientInfo": {"name": "x", "version": "1"}}
    call = parse_body(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x/ping", "params": {"_meta": meta, "n": 1}}).encode())
    assert call.unclassified is None and call.kind is None


def test_completion_refs_are_decided_as_the_prompt_or_resource_they_name() -> None:
    call = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":'
                      b'{"ref":{"type":"ref/prompt","name":"research_prompt"},"argument":{"name":"topic","value":"a"}}}')
    assert (call.kind, call.subjects) == ("prompt", ("research_prompt",))


@pytest.mark.parametrize("body", [b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}', b'{"jsonrpc":"2.0","id":Infinity,"method":"ping"}',
                                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":-Infinity}}}'])
def test_nan_and_infinity_are_not_json_and_are_refused_as_invalid_requests(body: bytes) -> None:
    with pytest.raises(RpcError) as err:
        parse_body(body)
    assert err.value.code == -32600 and "not a JSON value" in err.value.message


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 50_000, b"[" * 129 + b"]" * 129])
def test_deeply_nested_bodies_are_parse_errors_not_crashes(body: bytes) -> None:
    with pytest.raises(RpcError) as err:
        parse_body(body)
    assert err.value.code == -32700 and "nested deeper" in err.value.message


# --- the policy layer refuses what it cannot classify (ASGI, as the gate runs it) ----------



async def through_gate(p: Policy, principal: Principal, body: bytes,
                       content_type: bytes = b"application/json") -> tuple[int, Any, Exchange, bool]:
    """POST `body` through JsonRpcBody and PolicyCheck: status, JSON answer, the record, whether the app ran."""
    reached = False

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal reached
        reached = True
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"jsonrpc":"2.0","id":1,"result":{}}'})

    ex = Exchange(started=0.0, http_method="POST", principal=principal)
    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": [(b"content-type", content_type)],
             "state": {STATE_KEY: ex}}
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await JsonRpcBody(PolicyCheck(app, p), "/mcp")(scope, receive, send)
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body_out), ex, reached


NOTE_RULES = ("resource:notes://* = notes:read", "tool:delete_note = notes:write")


@pytest.mark.anyio
async def test_listen_with_a_protected_resource_is_refused_like_subscribe(notes_resources: SdkResources) -> None:
    p = Policy(PolicySettings(rules=NOTE_RULES), notes_resources)
    subscribe = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "resources/subscribe",
                            "params": {"uri": "notes://1"}}).encode()
    for body in (subscribe, listen({"resourceSubscriptions": ["notes://01"]}),
                 listen({"resource_subscriptions": ["other://x", "notes://%31"]})):
        status, answer, ex, reached = await through_gate(p, who(), body)
        assert (status, reached) == (403, False) and answer["error"]["data"]["required_scope"] == "notes:read", body
        assert ex.denied == "missing_scope"
    assert (await through_gate(p, who("notes:read"), listen({"resourceSubscriptions": ["notes://1"]})))[3]


@pytest.mark.anyio
@pytest.mark.parametrize("body", [
    b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_notes"}}]',
    b'{"jsonrpc":"2.0","id":1,"method":"x/delete","params":{"name":"delete_note"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"id":1}}}',
])
async def test_requests_the_gate_cannot_classify_are_refused_and_counted_while_rules_apply(
        notes_resources: SdkResources, body: bytes) -> None:
    p = Policy(PolicySettings(rules=NOTE_RULES), notes_resources)
    status, answer, ex, reached = await through_gate(p, who(), body)
    assert (status, reached) == (400, False) and answer["error"]["message"].startswith("Refused: the gate cannot apply")
    assert ex.violation == "policy" and ex.denied == "unclassified" and ex.authz == ("denied", "unclassified")
    assert (await through_gate(p, who("*"), body))[3]  # no rule can refuse "*": nothing to classify for


@pytest.mark.anyio
async def test_a_json_body_is_policed_whatever_content_type_it_declares() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_note","arguments":{"id":1}}}'
    for content_type in (b"text/plain", b"text/plain, application/json", b""):
        status, _, _, reached = await through_gate(Policy(PolicySettings()), who(), body, content_type)
        assert (status, reached) == (403, False), content_type
