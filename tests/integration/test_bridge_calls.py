"""One call through the stdio bridge: what reaches the child, and what the bridge checks on the way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import http, wait_until
from tests.integration.bridgekit import Host, hosted
from tests.integration.clients import modern_request

pytestmark = [pytest.mark.integration]

TINY = str(Path(__file__).with_name("tiny_stdio_server.mjs"))
#: What the tiny server writes to stderr for each tools/list it answers.
LISTED = "tiny: tools/list"


@pytest.fixture
def tiny() -> Iterator[Host]:
    """The tiny server, one shared child (a fresh one per test: `change` alters its tools)."""
    with hosted(command=["node", TINY], isolation="shared") as host:
        yield host


def call(host: Host, tool: str, arguments: dict[str, object], headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request_headers, body = modern_request("tools/call", tool, {"name": tool, "arguments": arguments})
    status, _, answer = http("POST", host.url, body, {**request_headers, **(headers or {})})
    text = answer.decode()
    # An SSE answer carries the JSON-RPC message on its data: line.
    data = next((line[5:] for line in text.splitlines() if line.startswith("data:")), text)
    return status, json.loads(data)


def listings_after_a_marker(host: Host) -> int:
    """tools/list answers the child wrote so far, counted once a last listing (a marker) has reached the log.

    The child's stderr is one ordered pipe: every listing before the marker is in the log once it is."""
    before = host.log.count(LISTED)
    headers, body = modern_request("tools/list", None, {})
    assert http("POST", host.url, body, headers)[0] == 200
    return wait_until(lambda: host.log.count(LISTED) > before and host.log.count(LISTED), 10,
                      "the marker listing reached the log") - 1


def test_a_2026_call_reaches_the_child_without_a_tools_list_before_it(tiny: Host) -> None:
    before = listings_after_a_marker(tiny)  # the child is up (a listing waits for it)
    for _ in range(5):
        status, answer = call(tiny, "ping", {"n": 1})
        assert status == 200 and answer["result"]["content"][0]["text"].startswith("pong"), answer
    # The one listing after `before` is the first marker itself: the calls listed nothing.
    assert listings_after_a_marker(tiny) == before + 1


def test_a_2026_call_whose_mcp_param_header_disagrees_with_its_argument_gets_400(tiny: Host) -> None:
    status, answer = call(tiny, "change", {})  # the child now lists `routed`, and says its tools changed
    assert status == 200, answer

    def refused() -> dict:
        # The SDK checks Mcp-Param-* headers against the child's listing, which the bridge reads again
        # once the child says its tools changed (until then `routed` is not known to declare one).
        status, answer = call(tiny, "routed", {"region": "eu"}, {"Mcp-Param-Region": "us"})
        assert status in (200, 400), answer
        return answer if status == 400 else {}

    answer = wait_until(refused, 10, "a call with a disagreeing Mcp-Param-Region header refused")
    assert answer["error"]["code"] == -32020, answer
    status, answer = call(tiny, "routed", {"region": "eu"}, {"Mcp-Param-Region": "eu"})
    assert status == 200 and "result" in answer, answer
