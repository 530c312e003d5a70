"""State that spans workers and hosts: multi-round-trip calls whose retries land anywhere."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.request_state import AESGCMRequestStateCodec
from mcp_types import CreateMessageResult, ElicitResult, TextContent

from tests.harness import Appliance, http, new_appliance, running
from tests.integration.clients import mcp_client, modern_request

pytestmark = pytest.mark.integration

CALLS = 50  # of each kind
CLIENTS = 10


async def answer_question(context: Any, params: Any) -> ElicitResult:
    """The user answers the notes server's question."""
    return ElicitResult(action="accept", content={"query": "rotation"})


async def answer_sampling(context: Any, params: Any) -> CreateMessageResult:
    """The client's model answers."""
    return CreateMessageResult(role="assistant", content=TextContent(type="text", text="An abstract."),
                               model="test-model")


def asking_client(url: str) -> Any:
    return mcp_client(url, mode="2026-07-28", elicitation_callback=answer_question, sampling_callback=answer_sampling)


async def seed_note(url: str) -> int:
    async with mcp_client(url, mode="2026-07-28") as (client, _):
        result = await client.call_tool("add_note", {"title": "Key rotation", "body": "Rotate keys in three phases."})
        assert not result.is_error, result
        return int(result.structured_content["id"])


async def asking_calls(url: str, note_id: int, calls: int = CALLS) -> tuple[int, list[str]]:
    """`calls` eliciting and `calls` sampling tool calls at once; (completed, failures)."""
    completed = 0
    failures: list[str] = []

    async def one(client: Client, tool: str, arguments: dict[str, Any]) -> None:
        nonlocal completed
        try:
            result = await client.call_tool(tool, arguments)
        except Exception as exc:  # a failed round surfaces as an MCPError from the client
            failures.append(f"{tool}: {exc!r}")
            return
        if result.is_error:
            failures.append(f"{tool}: {result.content}")
        else:
            completed += 1

    async with anyio.create_task_group() as outer:
        for c in range(CLIENTS):
            async def client_calls(c: int = c) -> None:
                async with asking_client(url) as (client, _):
                    async with anyio.create_task_group() as tg:
                        for k in range(c, calls, CLIENTS):
                            tg.start_soon(one, client, "search_notes_asking", {"topic": f"t{k}"})
                            tg.start_soon(one, client, "abstract_note", {"id": note_id})
            outer.start_soon(client_calls)
    return completed, failures


def tool_rounds_by_worker(appliance: Appliance, tool: str) -> dict[str, int]:
    """Audit records of `tool` per worker file (each round of a call is one request)."""
    counts: dict[str, int] = {}
    for path in sorted((Path(appliance.settings["log_dir"]) / "audit").glob("worker-*.jsonl")):
        counts[path.stem] = sum(1 for line in path.read_text().splitlines() if f'"{tool}"' in line)
    return counts


@pytest.fixture(scope="module")
def three_workers() -> Iterator[Appliance]:
    with running(new_appliance(3)) as app:
        yield app


@pytest.mark.anyio
async def test_multi_round_trip_calls_complete_through_three_workers(three_workers: Appliance) -> None:
    note_id = await seed_note(three_workers.mcp_url)
    completed, failures = await asking_calls(three_workers.mcp_url, note_id)
    assert failures == []
    assert completed == 2 * CALLS
    # The rounds really were spread: more than one worker served the eliciting tool.
    assert sum(1 for n in tool_rounds_by_worker(three_workers, "search_notes_asking").values() if n) >= 2


def ring_secrets(appliance: Appliance) -> list[str]:
    text = (Path(appliance.settings["data_dir"]) / "request-state.keys").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def expired_state(appliance: Appliance) -> str:
    """A requestState sealed with the appliance's own key whose time is up."""
    now = time.time()
    claims = {"v": 1, "iat": now - 1000, "exp": now - 400, "m": "tools/call", "t": "search_notes_asking", "s": "{}"}
    codec = AESGCMRequestStateCodec([s.encode() for s in ring_secrets(appliance)])
    return codec.seal(json.dumps(claims).encode())


def sse_or_json(raw: bytes) -> dict[str, Any]:
    text = raw.decode()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:") and line[5:].strip()]
    return json.loads(data[-1])


@pytest.mark.parametrize("state", ["expired", "v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "forged", ""])
def test_forged_or_expired_request_state_gets_the_sdks_invalid_params_error(three_workers: Appliance, state: str) -> None:
    headers, body = modern_request("tools/call", "search_notes_asking", {
        "name": "search_notes_asking", "arguments": {"topic": "x"}, "inputResponses": {},
        "requestState": expired_state(three_workers) if state == "expired" else state})
    doc = json.loads(body)
    doc["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = {"elicitation": {"form": {}}}
    status, _, raw = http("POST", three_workers.mcp_url, json.dumps(doc).encode(), headers)
    assert status < 500, raw
    error = sse_or_json(raw)["error"]
    assert (error["code"], error["message"]) == (-32602, "Invalid or expired requestState")
    assert three_workers.health()[0] == 200


def test_the_shared_key_is_absent_from_config_logs_and_audit(three_workers: Appliance) -> None:
    secrets = ring_secrets(three_workers)
    assert secrets and all(len(s) >= 32 for s in secrets)
    assert oct((Path(three_workers.settings["data_dir"]) / "request-state.keys").stat().st_mode & 0o777) == "0o640"
    status, _, config = http("GET", three_workers.url + "/config")
    assert status == 200
    _, _, metrics = http("GET", three_workers.url + "/metrics")
    places = {"/config": config.decode(), "/metrics": metrics.decode()}
    for path in Path(three_workers.settings["log_dir"]).rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_text(errors="replace")
    assert any("audit" in p for p in places)
    for secret in secrets:
        assert [p for p, text in places.items() if secret in text] == []
    # What the workers do log is the key's fingerprint.
    assert any(re.search(r"seals requestState with the shared ring \(key ids [0-9a-f]{8}\)", text) for text in places.values())
