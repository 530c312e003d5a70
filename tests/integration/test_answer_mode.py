"""The default answer mode (mcp.json_response = "auto"): plain 2026-07-28 calls get one JSON body from the
SDK's JSON path; calls that ask for progress still stream it; legacy sessions keep their streams."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from mcp import Client

from tests.harness import Appliance, http, new_appliance, running
from tests.integration.clients import LEGACY_VERSION, MODERN_VERSION, mcp_client, modern_request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    with running(new_appliance(1)) as app:  # every setting at its default
        yield app


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
def notes(appliance: Appliance) -> None:
    """Three notes: summarize_notes reports progress once per note."""
    for i in range(3):
        headers, body = modern_request("tools/call", "add_note", {"name": "add_note", "arguments": {
            "title": f"note {i}", "body": "alpha beta", "tags": ["t"]}}, request_id=i + 1)
        status, _, raw = http("POST", appliance.mcp_url, body, headers)
        assert status == 200, raw


def test_a_plain_2026_call_is_answered_by_the_sdks_json_path(appliance: Appliance) -> None:
    headers, body = modern_request("tools/call", "list_notes", {"name": "list_notes", "arguments": {}})
    status, answer_headers, raw = http("POST", appliance.mcp_url, body, headers)
    assert status == 200 and answer_headers["content-type"].startswith("application/json"), raw
    assert json.loads(raw)["result"]["isError"] is False
    # Only the JSON path serves a client that accepts JSON alone (the SSE path answers 406).
    status, answer_headers, raw = http("POST", appliance.mcp_url, body, {**headers, "Accept": "application/json"})
    assert status == 200 and answer_headers["content-type"].startswith("application/json"), raw


@pytest.mark.anyio
async def test_a_2026_call_with_a_progress_token_gets_its_progress_notifications(appliance: Appliance) -> None:
    progress: list[float] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async with Client(appliance.mcp_url, mode=MODERN_VERSION) as client:
        result = await client.call_tool("summarize_notes", {}, progress_callback=on_progress)
    assert not result.is_error and result.structured_content["matched"] >= 3
    assert len(progress) >= 3


def test_a_raw_2026_call_with_a_progress_token_is_answered_as_a_stream(appliance: Appliance) -> None:
    headers, body = modern_request("tools/call", "summarize_notes", {"name": "summarize_notes", "arguments": {}})
    message = json.loads(body)
    message["params"]["_meta"]["progressToken"] = "p-1"
    status, answer_headers, raw = http("POST", appliance.mcp_url, json.dumps(message).encode(), headers)
    assert status == 200 and answer_headers["content-type"].startswith("text/event-stream"), raw
    events = [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]
    assert [e["params"]["progressToken"] for e in events if e.get("method") == "notifications/progress"][:3] \
        == ["p-1"] * 3
    assert events[-1]["id"] == 1 and events[-1]["result"]["isError"] is False


@pytest.mark.anyio
async def test_calls_in_a_legacy_session_still_stream_their_progress(appliance: Appliance) -> None:
    progress: list[float] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async with mcp_client(appliance.mcp_url, "legacy") as (client, wire):
        assert client.protocol_version == LEGACY_VERSION
        result = await client.call_tool("summarize_notes", {}, progress_callback=on_progress)
    assert not result.is_error and len(progress) >= 3
