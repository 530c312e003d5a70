"""Two nodes on one PostgreSQL: shared notes (search too), events across nodes, a database restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.harness import Appliance, cleanup, http, new_appliance, running, to_toml
from tests.integration.clients import mcp_client
from tests.integration.pg import Cluster, cluster

pytestmark = pytest.mark.integration

#: A password in the URL (trust auth ignores it): it must show nowhere.
PASSWORD = "pw-never-shown-7f3a91"
ADDS = 40  # bounded load across the restart


def text_of(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[Cluster, list[Appliance]]]:
    with cluster() as pg:
        pg.url_file.write_text(f"postgresql://postgres:{PASSWORD}@/postgres?host={pg.base}\n")
        nodes = [new_appliance(2, node={"ordinal": k}, notes={"database_url_file": str(pg.url_file)}) for k in range(2)]
        with running(nodes[0]), running(nodes[1]):
            yield pg, nodes


async def add_note(url: str, title: str, body: str) -> int:
    async with mcp_client(url, mode="2026-07-28") as (client, _):
        result = await client.call_tool("add_note", {"title": title, "body": body, "tags": ["shared"]})
        assert not result.is_error, text_of(result)
        return int(result.structured_content["id"])


@pytest.mark.anyio
async def test_a_note_added_through_node_0_is_found_by_get_and_search_through_node_1(
        two_nodes: tuple[Cluster, list[Appliance]]) -> None:
    _, nodes = two_nodes
    note_id = await add_note(nodes[0].mcp_url, "Sharded ledgers", "Ledgers are reconciled nightly across regions.")
    async with mcp_client(nodes[1].mcp_url, mode="2026-07-28") as (client, _):
        got = await client.call_tool("get_note", {"id": note_id})
        assert not got.is_error, text_of(got)
        assert got.structured_content["title"] == "Sharded ledgers"
        found = await client.call_tool("search_notes", {"query": "reconciled"})
        assert not found.is_error, text_of(found)
        hits = found.structured_content["result"]
        assert [h["id"] for h in hits] == [note_id]
        assert set(hits[0]) == {"id", "title", "snippet", "score"} and "**reconciled**" in hits[0]["snippet"]
        prefix = await client.call_tool("search_notes", {"query": "ledg*"})
        assert note_id in [h["id"] for h in prefix.structured_content["result"]]
        # tsquery syntax in the words is only text: no error, as with SQLite.
        hostile = await client.call_tool("search_notes", {"query": "O'Brien \\ '' :* & | ! <-> ("})
        assert not hostile.is_error, text_of(hostile)


def test_the_database_url_is_absent_from_config_logs_and_metrics(two_nodes: tuple[Cluster, list[Appliance]]) -> None:
    _, nodes = two_nodes
    node = nodes[0]
    status, _, config = http("GET", node.url + "/config")
    assert status == 200 and b"database_url_file" in config
    _, _, metrics = http("GET", node.url + "/metrics")
    places = {"/config": config.decode(), "/metrics": metrics.decode()}
    for path in Path(node.settings["log_dir"]).rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_text(errors="replace")
    assert [p for p, text in places.items() if PASSWORD in text] == []


@pytest.mark.anyio
async def test_a_listener_on_node_1_hears_a_note_deleted_through_node_0_within_1_s(
        two_nodes: tuple[Cluster, list[Appliance]]) -> None:
    _, nodes = two_nodes
    note_id = await add_note(nodes[0].mcp_url, "Short-lived", "Deleted soon.")
    uri = f"notes://{note_id}"
    async with mcp_client(nodes[1].mcp_url, mode="2026-07-28") as (listener, _), \
            mcp_client(nodes[0].mcp_url, mode="2026-07-28") as (writer, _):
        async with listener.listen(resource_subscriptions=[uri]) as subscription:
            deleted_at = time.monotonic()
            result = await writer.call_tool("delete_note", {"id": note_id})
            assert not result.is_error, text_of(result)
            with anyio.fail_after(1.0):  # the bound the issue sets for delivery across hosts
                async for event in subscription:
                    if getattr(event, "uri", None) == uri:
                        break
            latency = time.monotonic() - deleted_at
    assert type(event).__name__ == "ResourceUpdated"
    print(f"resources/updated from node 0 to a stream on node 1 after {latency * 1000:.1f} ms")


@pytest.mark.anyio
async def test_a_postgres_restart_mid_load_fails_calls_clearly_and_service_resumes_by_itself(
        two_nodes: tuple[Cluster, list[Appliance]]) -> None:
    pg, nodes = two_nodes
    saved: list[int] = []
    refused: list[str] = []
    async with mcp_client(nodes[0].mcp_url, mode="2026-07-28") as (client, _):
        for i in range(ADDS):
            if i == ADDS // 4:
                pg.stop()
            if i == ADDS // 2:
                pg.start()
            result = await client.call_tool("add_note", {"title": f"load {i}", "body": f"restart round {i}"})
            if result.is_error:
                refused.append(text_of(result))
            else:
                saved.append(int(result.structured_content["id"]))
        assert refused, "no call failed while the database was down"
        assert all("database unavailable" in text for text in refused), refused
        # Service resumed by itself: the calls after the restart were saved, without any restart of ours.
        assert len(saved) >= ADDS // 2

    async def read_back(url: str) -> None:
        async with mcp_client(url, mode="2026-07-28") as (reader, _):
            for note_id in saved:  # every saved note is whole on both nodes
                got = await reader.call_tool("get_note", {"id": note_id})
                assert not got.is_error, text_of(got)
                assert got.structured_content["body"].startswith("restart round ")
            found = await reader.call_tool("search_notes", {"query": "restart", "limit": 100})
            assert set(saved) <= {h["id"] for h in found.structured_content["result"]}

    for node in nodes:
        await read_back(node.mcp_url)
    for node in nodes:  # the health of both stayed ok: the database is the notes' concern, not the workers'
        assert node.health()[0] == 200


def test_check_and_run_exit_non_zero_naming_the_key_for_an_unreachable_database(tmp_path: Path) -> None:
    url_file = tmp_path / "database-url"
    url_file.write_text(f"postgresql://postgres:{PASSWORD}@/postgres?host={tmp_path}/no-such-dir\n")
    app = new_appliance(1, notes={"database_url_file": str(url_file)})
    try:
        app.config_path.write_text(to_toml(app.settings))
        for command in ("check", "run"):
            result = app.command(command, timeout=30)
            assert result.returncode != 0, (command, result.stdout)
            assert "notes.database_url_file" in result.stderr and "cannot connect" in result.stderr
            assert PASSWORD not in result.stderr + result.stdout
        assert not (Path(app.settings["run_dir"]) / "supervisord.conf").exists()  # nothing started
        app.settings["notes"]["database_url_file"] = str(tmp_path / "missing")
        app.config_path.write_text(to_toml(app.settings))
        result = app.command("check", timeout=30)
        assert result.returncode != 0 and "notes.database_url_file" in result.stderr
        assert "cannot read" in result.stderr
    finally:
        cleanup(app)


def test_check_warns_that_each_node_has_its_own_sqlite_notes() -> None:
    app = new_appliance(2, node={"peers": ["127.0.0.1:1", "127.0.0.1:2"]})
    try:
        app.config_path.write_text(to_toml(app.settings))
        result = app.command("check")
        assert result.returncode == 0, result.stderr
        assert "warning" in result.stderr and "own notes" in result.stderr
        assert "notes.database_url_file" in result.stderr
    finally:
        cleanup(app)
