"""Behaviour of the built-in notes server, driven through the SDK's in-process client."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, LoggingMessageNotificationParams, TextResourceContents

from appliance.conditions import PROCESS_CONDITIONS
from appliance.servers import notes
from appliance.servers.notes import create_server
from tests.tmpfs import fill, tmpfs

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[2]
# summarize_notes logs via ctx.info(), which the SDK flags as deprecated (SEP-2577); expected here.
ignore_logging_deprecation = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")

ADD_FROM_ANOTHER_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from mcp import Client
    from appliance.servers.notes import create_server

    async def main() -> None:
        async with Client(create_server()) as client:
            result = await client.call_tool("add_note", {"title": sys.argv[1], "body": "from a worker"})
            assert not result.is_error, result.content
            print(result.structured_content["id"])

    asyncio.run(main())
    """
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MCP_APPLIANCE_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def server(data_dir: Path) -> MCPServer:
    # A fresh server per test: each has its own store, so no cached connection or path leaks.
    return create_server()


async def ok(client: Client, tool: str, args: dict[str, Any] | None = None) -> Any:
    result = await client.call_tool(tool, args or {})
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error
    return " ".join(block.text for block in result.content if block.type == "text")


def add_from_another_process(title: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-c", ADD_FROM_ANOTHER_PROCESS, title], env=env, stdout=subprocess.PIPE, text=True
    )


def test_module_exposes_a_server_named_notes_with_the_documented_tools() -> None:
    assert notes.server.name == "notes"


async def test_tools_are_named_exactly_as_the_policy_layer_expects(server: MCPServer) -> None:
    async with Client(server) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert names == {"add_note", "search_notes", "get_note", "list_notes", "delete_note", "summarize_notes",
                     "search_notes_asking", "abstract_note"}


async def test_database_lives_in_the_data_dir_from_the_environment(server: MCPServer, data_dir: Path) -> None:
    assert not (data_dir / "notes.db").exists()  # nothing is opened before first use
    async with Client(server) as client:
        await ok(client, "add_note", {"title": "t", "body": "b"})
    assert (data_dir / "notes.db").exists()


async def test_added_note_is_returned_with_id_and_utc_timestamp(server: MCPServer) -> None:
    async with Client(server) as client:
        note = await ok(client, "add_note", {"title": " Kafka ", "body": "partitions", "tags": ["Ops", "ops", "infra"]})
        fetched = await ok(client, "get_note", {"id": note["id"]})
    assert note["title"] == "Kafka"
    assert note["tags"] == ["ops", "infra"]
    assert note["created_at"].endswith("+00:00")
    assert fetched == note


async def test_added_note_is_found_by_search(server: MCPServer) -> None:
    async with Client(server) as client:
        await ok(client, "add_note", {"title": "Unrelated", "body": "nothing to see"})
        note = await ok(client, "add_note", {"title": "Rotating TLS certificates", "body": "Use certbot renew."})
        hits = (await ok(client, "search_notes", {"query": "certbot"}))["result"]
    assert [hit["id"] for hit in hits] == [note["id"]]
    assert "**certbot**" in hits[0]["snippet"]
    assert hits[0]["score"] > 0


async def test_title_matches_rank_above_body_matches(server: MCPServer) -> None:
    async with Client(server) as client:
        body_hit = await ok(client, "add_note", {"title": "misc", "body": "some words about postgres here"})
        title_hit = await ok(client, "add_note", {"title": "postgres", "body": "vacuum tuning"})
        hits = (await ok(client, "search_notes", {"query": "postgres"}))["result"]
    assert [hit["id"] for hit in hits] == [title_hit["id"], body_hit["id"]]


@pytest.mark.parametrize(
    "query", ['"unbalanced', "foo-bar", "(((", "a:b", "-", "*", "NEAR(", "AND OR NOT", 'x"y', "title:x", "^", ""]
)
async def test_fts_syntax_in_a_query_returns_results_not_an_error(server: MCPServer, query: str) -> None:
    async with Client(server) as client:
        await ok(client, "add_note", {"title": "foo-bar baz", "body": "a:b NEAR AND OR NOT"})
        result = await client.call_tool("search_notes", {"query": query})
    assert not result.is_error, result.content
    assert isinstance(result.structured_content["result"], list)


async def test_hyphenated_query_still_finds_the_note(server: MCPServer) -> None:
    async with Client(server) as client:
        note = await ok(client, "add_note", {"title": "state-machine design", "body": "x"})
        hits = (await ok(client, "search_notes", {"query": 'state-machine "design'}))["result"]
    assert [hit["id"] for hit in hits] == [note["id"]]


async def test_get_of_unknown_id_is_a_tool_error_naming_the_id(server: MCPServer) -> None:
    async with Client(server) as client:
        result = await client.call_tool("get_note", {"id": 42})
    assert "note 42 not found" in error_text(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"title": "", "body": "b"}, "title must be 1..200"),
        ({"title": "x" * 201, "body": "b"}, "title must be 1..200"),
        ({"title": "t", "body": "x" * 100_001}, "body must be at most 100000"),
        ({"title": "t", "body": "b", "tags": [f"t{i}" for i in range(21)]}, "at most 20 tags"),
    ],
)
async def test_invalid_note_is_rejected_with_a_clear_message(
    server: MCPServer, args: dict[str, Any], message: str
) -> None:
    async with Client(server) as client:
        result = await client.call_tool("add_note", args)
        listed = (await ok(client, "list_notes"))["result"]
    assert message in error_text(result)
    assert listed == []


async def test_deleted_note_disappears_from_search_and_get(server: MCPServer) -> None:
    async with Client(server) as client:
        note = await ok(client, "add_note", {"title": "ephemeral", "body": "soon gone"})
        assert await ok(client, "delete_note", {"id": note["id"]}) == {"deleted": note["id"]}
        hits = (await ok(client, "search_notes", {"query": "ephemeral"}))["result"]
        get_result = await client.call_tool("get_note", {"id": note["id"]})
        again = await client.call_tool("delete_note", {"id": note["id"]})
    assert hits == []
    assert f"note {note['id']} not found" in error_text(get_result)
    assert f"note {note['id']} not found" in error_text(again)


async def test_list_filters_by_tag_and_pages_newest_first(server: MCPServer) -> None:
    async with Client(server) as client:
        ids = []
        for i in range(5):
            tag = "even" if i % 2 == 0 else "odd"
            ids.append((await ok(client, "add_note", {"title": f"n{i}", "body": "", "tags": [tag]}))["id"])
        even = (await ok(client, "list_notes", {"tag": "EVEN"}))["result"]
        page = (await ok(client, "list_notes", {"limit": 2, "offset": 1}))["result"]
    assert [n["id"] for n in even] == [ids[4], ids[2], ids[0]]
    assert [n["id"] for n in page] == [ids[3], ids[2]]
    assert "body" not in page[0]


@ignore_logging_deprecation
async def test_summarize_reports_progress_and_logs_to_the_client(server: MCPServer) -> None:
    progress: list[tuple[float, float | None, str | None]] = []
    logs: list[LoggingMessageNotificationParams] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def on_log(params: LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async with Client(server, logging_callback=on_log, log_level="info") as client:
        for i, tags in enumerate([["a", "b"], ["a"], ["c"]]):
            await ok(client, "add_note", {"title": f"note {i}", "body": "one two three", "tags": tags})
        result = await client.call_tool("summarize_notes", {}, progress_callback=on_progress)
    assert not result.is_error, result.content
    summary = result.structured_content
    assert summary["matched"] == 3
    assert summary["total_words"] == 9
    assert summary["top_tags"][0] == {"tag": "a", "count": 2}
    assert [(p, t) for p, t, _ in progress] == [(1, 3), (2, 3), (3, 3)]
    assert all(message and message.startswith("note ") for _, _, message in progress)
    assert logs and all(log.level == "info" for log in logs)
    assert "summarizing 3 note(s)" in str(logs[0].data)


@ignore_logging_deprecation
async def test_summarize_with_a_query_covers_only_matching_notes(server: MCPServer) -> None:
    async with Client(server) as client:
        match = await ok(client, "add_note", {"title": "redis", "body": "cache", "tags": ["db"]})
        await ok(client, "add_note", {"title": "nginx", "body": "proxy"})
        summary = await ok(client, "summarize_notes", {"query": "redis"})
    assert summary["note_ids"] == [match["id"]]
    assert summary["top_tags"] == [{"tag": "db", "count": 1}]


async def test_resource_template_returns_the_note_as_markdown(server: MCPServer) -> None:
    async with Client(server) as client:
        note = await ok(client, "add_note", {"title": "Runbook", "body": "Restart the worker.", "tags": ["ops"]})
        result = await client.read_resource(f"notes://{note['id']}")
        with pytest.raises(MCPError, match="note 999 not found"):
            await client.read_resource("notes://999")
    [content] = result.contents
    assert isinstance(content, TextResourceContents)
    assert content.mime_type == "text/markdown"
    assert content.text.startswith("# Runbook\n\nRestart the worker.")
    assert f"id: {note['id']}" in content.text


async def test_research_prompt_asks_to_search_and_cite_note_ids(server: MCPServer) -> None:
    async with Client(server) as client:
        prompt = await client.get_prompt("research_prompt", {"topic": "backups"})
    text = prompt.messages[0].content.text
    assert "backups" in text and "search_notes" in text and "note id" in text


async def test_note_written_by_another_process_is_visible_immediately(server: MCPServer) -> None:
    async with Client(server) as client:
        await ok(client, "add_note", {"title": "local", "body": "opens this process's connection first"})
        worker = add_from_another_process("zeppelin maintenance")
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0
        hits = (await ok(client, "search_notes", {"query": "zeppelin"}))["result"]
    assert [hit["id"] for hit in hits] == [int(out.strip())]


async def test_workers_starting_together_share_one_database(server: MCPServer) -> None:
    workers = [add_from_another_process(f"concurrent {i}") for i in range(4)]
    ids = []
    for worker in workers:
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0
        ids.append(int(out.strip()))
    async with Client(server) as client:
        listed = (await ok(client, "list_notes"))["result"]
    assert sorted(n["id"] for n in listed) == sorted(ids)
    assert len(set(ids)) == 4


async def test_notes_survive_recreating_the_server(data_dir: Path) -> None:
    async with Client(create_server()) as client:
        note = await ok(client, "add_note", {"title": "durable", "body": "still here"})
    async with Client(create_server()) as client:
        assert await ok(client, "get_note", {"id": note["id"]}) == note
        hits = (await ok(client, "search_notes", {"query": "durable"}))["result"]
    assert [hit["id"] for hit in hits] == [note["id"]]


async def test_explicit_path_resolver_overrides_the_environment(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "kb.db"
    async with Client(create_server(lambda: db)) as client:
        await ok(client, "add_note", {"title": "t", "body": "b"})
    assert db.exists()


async def test_a_full_disk_makes_add_note_say_storage_full_and_reads_keep_working(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with tmpfs(tmp_path / "data", "1m") as data:
        monkeypatch.setenv("MCP_APPLIANCE_DATA_DIR", str(data))
        async with Client(create_server()) as client:
            kept = await ok(client, "add_note", {"title": "kept", "body": "written before the disk filled"})
            ballast = fill(data, 64 * 1024)
            for n in range(50):  # 50 x 20 KB is far more than the space left
                result = await client.call_tool("add_note", {"title": f"filler {n}", "body": "x" * 20_000})
                if result.is_error:
                    break
            assert "storage full" in error_text(result) and "reading notes still works" in error_text(result)
            assert any("notes database" in r and "storage full" in r for r in PROCESS_CONDITIONS.reasons())
            assert (await ok(client, "get_note", {"id": kept["id"]}))["title"] == "kept"
            ballast.unlink()
            await ok(client, "add_note", {"title": "after", "body": "space again"})
            assert not any("notes database" in r for r in PROCESS_CONDITIONS.reasons())



def _add_first_note(path: str, barrier: Any, errors: Any) -> None:
    from appliance.servers.notes_storage import SqliteNotes

    store = SqliteNotes(lambda: Path(path))
    barrier.wait()
    try:
        store.add(f"from {os.getpid()}", "b", [])
    except Exception as exc:  # the test reports what a worker's first call would have answered
        errors.put(repr(exc))


def test_workers_opening_a_new_notes_database_at_once_all_save_their_first_note(tmp_path: Path) -> None:
    """Two workers' first calls on a fresh host used to race SQLite's switch to WAL ("database is locked")."""
    import multiprocessing
    import sqlite3

    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    for round_ in range(60):
        path = str(tmp_path / f"notes-{round_}.db")
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_add_first_note, args=(path, barrier, errors)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert errors.empty(), errors.get()
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM notes").fetchone()[0] == 3
