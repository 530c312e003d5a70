"""Real third-party stdio servers through the bridge, with the SDK client, in both protocol eras."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest

from tests import third_party
from tests.harness import Appliance, running
from tests.integration.bridgekit import Host, bridged_appliance, hosted
from tests.integration.clients import MODERN_VERSION, mcp_client

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

ERAS = ["legacy", MODERN_VERSION]


@pytest.fixture(scope="module")
def everything() -> Iterator[Appliance]:
    """server-everything, one shared child per worker, behind nginx and the gate (N=2)."""
    with running(bridged_appliance(2, command=list(third_party.everything()), isolation="shared")) as app:
        yield app


@pytest.mark.parametrize("mode", ERAS)
async def test_everything_server_tools_resources_templates_prompts_and_completion(everything: Appliance,
                                                                                  mode: str) -> None:
    async with mcp_client(everything.mcp_url, mode) as (client, _):
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "get-sum", "trigger-long-running-operation"} <= tools
        echoed = await client.call_tool("echo", {"message": f"hello {mode}"})
        assert not echoed.is_error and echoed.content[0].text == f"Echo: hello {mode}"
        summed = await client.call_tool("get-sum", {"a": 20, "b": 22})
        assert "42" in summed.content[0].text

        resources = (await client.list_resources()).resources
        assert resources, "server-everything lists resources"
        read = await client.read_resource(str(resources[0].uri))
        assert read.contents and str(read.contents[0].uri) == str(resources[0].uri)
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
        text_template = next(t for t in templates if "/text/" in t)
        uri = text_template.replace("{resourceId}", "7")
        from_template = await client.read_resource(uri)
        assert str(from_template.contents[0].uri) == uri

        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert "simple-prompt" in prompts
        prompt = await client.get_prompt("simple-prompt")
        assert prompt.messages and prompt.messages[0].role == "user"
        completion = await client.complete(types.PromptReference(name="completable-prompt"),
                                           {"name": "department", "value": "E"})
        assert "Engineering" in completion.completion.values


@pytest.mark.parametrize("mode", ERAS)
async def test_progress_of_a_long_running_tool_reaches_the_client(everything: Appliance, mode: str) -> None:
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with mcp_client(everything.mcp_url, mode) as (client, _):
        result = await client.call_tool("trigger-long-running-operation", {"duration": 1, "steps": 4},
                                        progress_callback=on_progress)
    assert not result.is_error
    assert seen == [(1.0, 4.0), (2.0, 4.0), (3.0, 4.0), (4.0, 4.0)]


@pytest.mark.parametrize("mode", ERAS)
async def test_elicitation_from_the_child_reaches_the_client(everything: Appliance, mode: str) -> None:
    """Legacy: on the call's stream. 2026-07-28: as a multi-round-trip result, the retry on any worker."""
    asked: list[str] = []

    async def answer(context: object, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"color": "blue", "name": "Ada", "check": True,
                                                            "email": "ada@example.com", "integer": 3})

    async with mcp_client(everything.mcp_url, mode, elicitation_callback=answer) as (client, _):
        result = await client.call_tool("trigger-elicitation-request", {})
    assert asked, "the child's elicitation/create reached the client"
    assert not result.is_error and "accept" in json.dumps(result.model_dump(mode="json"))


@pytest.mark.parametrize("mode", ERAS)
async def test_sampling_from_the_child_reaches_the_client(everything: Appliance, mode: str) -> None:
    prompts: list[str] = []

    async def sample(context: object, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        prompts.append(json.dumps(params.model_dump(mode="json")))
        return types.CreateMessageResult(role="assistant", model="test-model",
                                         content=types.TextContent(type="text", text="sampled by the test"))

    async with mcp_client(everything.mcp_url, mode, sampling_callback=sample) as (client, _):
        result = await client.call_tool("trigger-sampling-request", {"prompt": "say hi", "maxTokens": 10})
    assert prompts and "say hi" in prompts[0]
    assert not result.is_error and "sampled by the test" in json.dumps(result.model_dump(mode="json"))


async def test_a_stateless_bridge_serves_legacy_clients_without_sessions() -> None:
    with hosted(command=list(third_party.everything()), sessions=False, json_response=True) as host:
        async with mcp_client(host.url, "legacy") as (client, wire):
            echoed = await client.call_tool("echo", {"message": "no session"})
        assert echoed.content[0].text == "Echo: no session"
        assert wire.session_id is None


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Path]]:
    root = tmp_path_factory.mktemp("files")
    with hosted(command=list(third_party.filesystem(str(root)))) as host:
        yield host, root


@pytest.mark.parametrize("mode", ERAS)
async def test_filesystem_server_reads_a_file_the_test_wrote(files: tuple[Host, Path], mode: str) -> None:
    host, root = files
    note = root / f"note-{mode}.txt"
    note.write_text(f"written by the test for {mode}\n")
    async with mcp_client(host.url, mode) as (client, _):
        tools = {tool.name for tool in (await client.list_tools()).tools}
        tool = "read_text_file" if "read_text_file" in tools else "read_file"
        result = await client.call_tool(tool, {"path": str(note)})
    assert not result.is_error, result
    assert f"written by the test for {mode}" in result.content[0].text


@pytest.fixture(scope="module")
def clock() -> Iterator[Host]:
    with hosted(command=list(third_party.time_server())) as host:
        yield host


@pytest.mark.parametrize("mode", ERAS)
async def test_time_server_from_pypi_answers_in_both_eras(clock: Host, mode: str) -> None:
    async with mcp_client(clock.url, mode) as (client, _):
        result = await client.call_tool("get_current_time", {"timezone": "Europe/Paris"})
    assert not result.is_error, result
    assert json.loads(result.content[0].text)["timezone"] == "Europe/Paris"


async def test_a_shared_childs_elicitation_never_reaches_another_client() -> None:
    with hosted(command=list(third_party.everything()), isolation="shared") as host:
        asked_bystander: list[str] = []

        async def bystander_answer(context: object, params: types.ElicitRequestParams) -> types.ElicitResult:
            asked_bystander.append(params.message)
            return types.ElicitResult(action="decline")

        asked_asker: list[str] = []

        async def asker_answer(context: object, params: types.ElicitRequestParams) -> types.ElicitResult:
            asked_asker.append(params.message)  # with two callers on the child, the bridge cannot tell whose
            return types.ElicitResult(action="decline")

        in_flight = anyio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            in_flight.set()

        async with mcp_client(host.url, "legacy", elicitation_callback=bystander_answer) as (bystander, _), \
                mcp_client(host.url, "legacy", elicitation_callback=asker_answer) as (asker, _):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: bystander.call_tool("trigger-long-running-operation", {"duration": 4, "steps": 4},
                                                          progress_callback=on_progress))
                with anyio.fail_after(10):
                    await in_flight.wait()  # the bystander's call is in flight on the shared child
                try:
                    result = await asker.call_tool("trigger-elicitation-request", {})
                except Exception as exc:  # the child may fail the call on the refused elicitation
                    result = exc
        assert asked_bystander == [], "another client's elicitation reached the bystander"
        assert asked_asker == [], "a guess: the bridge cannot know the elicitation is the asker's"
        assert isinstance(result, Exception) or result.is_error, result


def roots_of(owner: str, asked: list[str]) -> Any:
    """A client's list_roots callback: one root named after `owner`; notes each time it is asked."""
    async def list_roots(context: object) -> types.ListRootsResult:
        asked.append(owner)
        return types.ListRootsResult(roots=[types.Root(uri=f"file:///srv/{owner}", name=owner)])
    return list_roots


async def test_a_shared_child_never_takes_one_clients_roots_for_every_client() -> None:
    # server-everything keeps the roots it is given for every later call (server-filesystem narrows its
    # directories to them): asked of the client whose call is in flight, they would rule the others too.
    with hosted(command=list(third_party.everything()), isolation="shared") as host:
        asked: list[str] = []
        async with mcp_client(host.url, MODERN_VERSION, list_roots_callback=roots_of("first", asked)) as (first, _):
            mine = await first.call_tool("get-roots-list", {})
        async with mcp_client(host.url, "legacy", list_roots_callback=roots_of("second", asked)) as (second, _):
            theirs = await second.call_tool("get-roots-list", {})
    assert asked == [], "a shared child's roots/list reached a client"
    for result in (mine, theirs):
        text = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
        assert "file:///srv/" not in text, text
