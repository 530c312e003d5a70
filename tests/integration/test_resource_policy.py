"""Resource policy through nginx and a real worker: no spelling of a protected URI passes, listen is
policed like subscribe, and what the gate cannot classify is refused and counted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from mcp import MCPError

from tests.harness import Appliance, cleanup, http, new_appliance, wait_until
from tests.integration.clients import MODERN_VERSION, mcp_client, modern_request
from tests.integration.gatekit import add_key, bearer, call, write_config
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.integration

RULES = ["resource:notes://1 = secret", "tool:add_note = notes:write", "tool:delete_note = notes:write"]
#: What the notes server reads as note 1 (it parses the id as an integer) ...
READ_AS_NOTE_1 = ["notes://1", "notes://%31", "notes://01", "notes://+1", "notes://1%20", "notes://1.0"]
#: ... and, with the spellings RFC 3986 makes equal to them, what the rule must refuse.
SPELLINGS = [*READ_AS_NOTE_1, "NOTES://1", "Notes://%30%31"]


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[Appliance, dict[str, str]]]:
    app = new_appliance(1, auth={"mode": "api_keys"}, mcp={"allowed_hosts": ["127.0.0.1:*"]}, policy={"rules": RULES})
    try:
        app.settings["auth"]["keys_file"] = str(app.base / "keys.json")
        write_config(app)
        keys = {"keeper": add_key(app, "keeper", "secret", "notes:write"), "reader": add_key(app, "reader")}
        app.start()
        app.wait_healthy(timeout=60, workers=1)
        status, _, body = call(app, "tools/call", "add_note", {"arguments": {"title": "the secret", "body": "42"}},
                               bearer(keys["keeper"]))
        assert status == 200 and body["result"]["structuredContent"]["id"] == 1, body
        yield app, keys
    finally:
        cleanup(app)


def read(app: Appliance, key: str, uri: str) -> tuple[int, Any]:
    headers, body = modern_request("resources/read", uri, {"uri": uri})
    status, _, raw = http("POST", app.mcp_url, body, {**headers, **bearer(key)})
    return status, json.loads(raw)


@pytest.mark.anyio
@pytest.mark.parametrize("era", ["legacy", MODERN_VERSION])
async def test_no_spelling_of_a_protected_note_passes_and_its_holder_reads_every_one(guarded: Any, era: str) -> None:
    app, keys = guarded
    async with mcp_client(app.mcp_url, era, bearer(keys["reader"])) as (reader, _):
        for uri in SPELLINGS:
            with pytest.raises(MCPError, match="requires scope 'secret'"):
                await reader.read_resource(uri)
    async with mcp_client(app.mcp_url, era, bearer(keys["keeper"])) as (keeper, _):
        for uri in READ_AS_NOTE_1:
            contents = (await keeper.read_resource(uri)).contents
            assert "the secret" in contents[0].text, uri  # type: ignore[union-attr]


def test_raw_spellings_get_403_naming_the_scope(guarded: Any) -> None:
    app, keys = guarded
    for uri in SPELLINGS:
        status, body = read(app, keys["reader"], uri)
        assert status == 403 and body["error"]["data"]["required_scope"] == "secret", (uri, status, body)
    assert read(app, keys["reader"], "notes://2")[0] != 403  # other notes are not protected


def listen_request(key: str, notifications: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    headers, body = modern_request("subscriptions/listen", None, {"notifications": notifications}, request_id=7)
    return {**headers, **bearer(key)}, body


@pytest.mark.anyio
async def test_listening_to_a_protected_note_is_refused_like_subscribing(guarded: Any) -> None:
    app, keys = guarded
    async with mcp_client(app.mcp_url, MODERN_VERSION, bearer(keys["reader"])) as (reader, _):
        for uri in ("notes://1", "notes://01"):
            with pytest.raises(MCPError, match="requires scope 'secret'"):
                async with reader.listen(resource_subscriptions=["notes://2", uri]):
                    pass
    async with mcp_client(app.mcp_url, "legacy", bearer(keys["reader"])) as (legacy, _):
        with pytest.raises(MCPError, match="requires scope 'secret'"):
            await legacy.session.subscribe_resource("notes://1")
    # The field's own name is accepted by the SDK as well as its camelCase alias.
    headers, body = listen_request(keys["reader"], {"resource_subscriptions": ["notes://%31"]})
    status, _, raw = http("POST", app.mcp_url, body, headers)
    assert status == 403 and json.loads(raw)["error"]["data"]["required_scope"] == "secret"
    async with mcp_client(app.mcp_url, MODERN_VERSION, bearer(keys["keeper"])) as (keeper, _):
        async with keeper.listen(resource_subscriptions=["notes://1"]) as subscription:
            assert subscription.honored.resource_subscriptions == ["notes://1"]


UNCLASSIFIABLE = [
    [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_notes", "arguments": {"query": "a"}}}],
    {"jsonrpc": "2.0", "id": 2, "method": "notes/fetch", "params": {"uri": "notes://1"}},
    {"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": ["notes://1"]}},
]


@pytest.mark.parametrize("message", UNCLASSIFIABLE, ids=["batch", "unknown-method-with-uri", "uri-not-a-string"])
def test_requests_the_gate_cannot_classify_are_refused_with_a_json_rpc_error_and_counted(guarded: Any, message: Any) -> None:
    app, keys = guarded
    before = scrape(app)
    headers, _ = modern_request("tools/call", None, {})
    status, _, raw = http("POST", app.mcp_url, json.dumps(message).encode(), {**headers, **bearer(keys["reader"])})
    body = json.loads(raw)
    assert status == 400 and body["jsonrpc"] == "2.0" and "cannot apply policy.rules" in body["error"]["message"]

    def counted() -> bool:
        after = scrape(app)
        return (total(after, "mcp_appliance_security_violations_total", kind="policy")
                > total(before, "mcp_appliance_security_violations_total", kind="policy")
                and total(after, "mcp_appliance_authz_decisions_total", reason="unclassified")
                > total(before, "mcp_appliance_authz_decisions_total", reason="unclassified"))

    wait_until(counted, 10, "the refusal counted in /metrics")


def test_a_call_that_declares_another_content_type_is_policed_all_the_same(guarded: Any) -> None:
    app, keys = guarded
    headers, body = modern_request("tools/call", "delete_note", {"name": "delete_note", "arguments": {"id": 1}})
    for content_type in ("text/plain", "text/plain, application/json"):
        status, _, raw = http("POST", app.mcp_url, body, {**headers, "Content-Type": content_type,
                                                         **bearer(keys["reader"])})
        assert status == 403 and "requires scope 'notes:write'" in json.loads(raw)["error"]["message"], content_type
    assert read(app, keys["keeper"], "notes://1")[0] == 200  # the note is still there
