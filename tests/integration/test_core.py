"""The core appliance with N=3: started by `mcp-appliance run`, used by the official MCP SDK client.

One appliance serves the whole module; the test that restarts every worker runs last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from appliance.config import load_settings, redacted
from appliance.health import worker_process_name
from tests.harness import Appliance, http, new_appliance, running, wait_until
from tests.integration.clients import (
    LEGACY_VERSION,
    MODERN_VERSION,
    Wire,
    access_log,
    eventually,
    mcp_client,
    modern_request,
    owner_upstream,
    probes,
    sessions_on_two_workers,
)

pytestmark = pytest.mark.integration

WORKERS = 3
SESSIONS = 60
SUPERVISORCTL = str(Path(sys.executable).parent / "supervisorctl")


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    with running(new_appliance(WORKERS)) as app:
        yield app


def supervisorctl(app: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    """The real supervisorctl against the rendered supervisord.conf."""
    return subprocess.run([SUPERVISORCTL, "-c", str(app.run_dir / "supervisord.conf"), *args],
                          capture_output=True, text=True, timeout=60)


def structured(result: Any) -> Any:
    assert not result.is_error, result
    return result.structured_content


def test_supervisorctl_status_shows_every_program_running(appliance: Appliance) -> None:
    # Workers serve before supervisord calls them RUNNING: they stay STARTING for startsecs
    # (5 s, so that a worker that dies while importing its app counts as a failed start).
    def settled() -> subprocess.CompletedProcess[str] | None:
        result = supervisorctl(appliance, "status")
        return result if "STARTING" not in result.stdout else None

    result = wait_until(settled, 30, "no program STARTING any more")
    assert result.returncode == 0, result.stdout + result.stderr
    states = dict(line.split()[:2] for line in result.stdout.splitlines() if line.strip())
    expected = {worker_process_name(k) for k in range(WORKERS)} | {"admin", "nginx", "events"}
    assert set(states) == expected
    assert set(states.values()) == {"RUNNING"}, result.stdout


def test_health_says_ok_with_three_workers(appliance: Appliance) -> None:
    status, doc = appliance.health()
    assert status == 200 and doc["status"] == "ok"
    assert {k: doc["workers"][k] for k in ("configured", "serving", "min_ready")} == {
        "configured": WORKERS, "serving": WORKERS, "min_ready": 1}
    assert {name: p["state"] for name, p in doc["programs"].items()} == {
        **{worker_process_name(k): "RUNNING" for k in range(WORKERS)}, "admin": "RUNNING", "nginx": "RUNNING",
        "events": "RUNNING",
    }
    assert [p["worker"] for p in doc["probes"]] == list(range(WORKERS))
    assert all(p["ok"] and p["pid"] == appliance.worker_pid(p["worker"]) for p in doc["probes"])
    assert doc["service"] == "mcp-appliance" and doc["environment"] == "development"


@pytest.mark.parametrize(
    ("path", "body"),
    [("/health/live", {"status": "alive"}),
     ("/health/ready", {"status": "ready", "serving": WORKERS, "min_ready": 1}),
     ("/health/startup", {"status": "started"})],
)
def test_probe_endpoints_answer_through_nginx(appliance: Appliance, path: str, body: dict[str, Any]) -> None:
    status, _, raw = http("GET", appliance.url + path)
    assert (status, json.loads(raw)) == (200, body)


def test_config_endpoint_shows_effective_settings_redacted(appliance: Appliance) -> None:
    status, headers, raw = http("GET", appliance.url + "/config")
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = json.loads(raw)
    expected = redacted(load_settings(appliance.config_path, {}))
    # Workers and the admin app also get data_dir as MCP_APPLIANCE_DATA_DIR (same value).
    assert doc.pop("source").startswith(expected.pop("source"))
    assert doc == expected
    assert doc["workers"]["count"] == WORKERS and doc["http"]["port"] == appliance.port


async def seed_notes(url: str, count: int) -> None:
    async with Client(url, mode=MODERN_VERSION) as client:
        for i in range(count):
            structured(await client.call_tool("add_note", {"title": f"seed {i}", "body": "alpha beta gamma",
                                                           "tags": ["seed"]}))


@pytest.mark.anyio
async def test_sixty_concurrent_legacy_sessions_spread_over_all_workers(appliance: Appliance) -> None:
    await seed_notes(appliance.mcp_url, 3)  # summarize_notes reports progress once per note
    before = await anyio.to_thread.run_sync(probes, appliance)
    wires: list[Wire] = []
    progress: dict[int, list[float]] = {}
    errors: list[str] = []

    async def one_session(i: int) -> None:
        try:
            async with mcp_client(appliance.mcp_url, "legacy") as (client, wire):
                wires.append(wire)
                assert client.protocol_version == LEGACY_VERSION
                tools = await client.list_tools()
                assert "summarize_notes" in {t.name for t in tools.tools}

                async def on_progress(done: float, total: float | None, message: str | None) -> None:
                    progress.setdefault(i, []).append(done)

                summary = structured(await client.call_tool("summarize_notes", {}, progress_callback=on_progress))
                assert summary["matched"] >= 3
                # The SDK opens the standalone GET stream by itself after initialize;
                # stay in the session until it is open, so the DELETE comes after it.
                with anyio.fail_after(30):
                    await wire.get_stream_opened.wait()
        except Exception as exc:  # collected: the assertion below reports every failed session
            errors.append(f"session {i}: {exc!r}")

    async with anyio.create_task_group() as tg:
        for i in range(SESSIONS):
            tg.start_soon(one_session, i)

    assert errors == []
    assert len(progress) == SESSIONS and all(len(p) >= 3 for p in progress.values())
    sessions = {w.session_id: w for w in wires}
    assert len(sessions) == SESSIONS and None not in sessions

    # The workers' own counters: every worker opened sessions, all of them are closed again.
    def all_closed() -> dict[int, dict[str, Any]] | None:
        now = probes(appliance)
        return now if all(p["sessions_open"] == 0 for p in now.values()) else None

    after = await eventually(all_closed, 30, "every session closed by its DELETE")
    opened = {k: after[k]["sessions_opened"] - before[k]["sessions_opened"] for k in range(WORKERS)}
    assert all(n > 0 for n in opened.values()), f"sessions per worker: {opened}"
    assert sum(opened.values()) == SESSIONS

    # nginx saw each session's GET stream and DELETE, and sent every request of a
    # session to the worker that owns it.
    def logged() -> list[dict[str, Any]] | None:
        entries = [e for e in access_log(appliance) if e["session"] in sessions]
        done = {(e["session"], e["method"]) for e in entries if e["status"] == 200}
        return entries if all((sid, m) in done for sid in sessions for m in ("GET", "DELETE")) else None

    entries = await eventually(logged, 30, "GET and DELETE of every session in nginx's access log")
    for entry in entries:
        owner = sessions[entry["session"]].owner
        assert entry["upstream"] == owner_upstream(appliance, owner), entry
        assert entry["status"] in (200, 202), entry


@pytest.mark.anyio
async def test_modern_requests_succeed_and_spread_over_workers(appliance: Appliance) -> None:
    before = await anyio.to_thread.run_sync(probes, appliance)
    marker = uuid.uuid4().hex

    async def one_client(i: int) -> None:
        async with mcp_client(appliance.mcp_url, MODERN_VERSION, headers={"User-Agent": f"modern-{marker}"}) as (
            client, wire,
        ):
            assert client.protocol_version == MODERN_VERSION
            for j in range(5):
                note = structured(await client.call_tool("add_note", {"title": f"modern {i}.{j}", "body": marker}))
                assert note["body"] == marker
            assert wire.session_id is None

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(one_client, i)

    after = await anyio.to_thread.run_sync(probes, appliance)
    grew = {k: after[k]["requests"] - before[k]["requests"] for k in range(WORKERS)}
    assert all(n > 0 for n in grew.values()), f"requests per worker: {grew}"
    # Sessionless: no worker opened a session for these requests.
    assert all(after[k]["sessions_opened"] == before[k]["sessions_opened"] for k in range(WORKERS))

    def calls() -> list[dict[str, Any]] | None:
        mine = [e for e in access_log(appliance) if e["user_agent"] == f"modern-{marker}"]
        found = [e for e in mine if e["mcp_method"] == "tools/call"]
        return found if len(found) >= 30 else None

    logged = await eventually(calls, 10, "the 30 tools/call requests in nginx's access log")
    assert all(e["status"] == 200 and e["session"] == "" for e in logged), logged


def test_public_host_header_passes_behind_nginx_by_default(appliance: Appliance) -> None:
    headers, body = modern_request("tools/call", "list_notes", {"name": "list_notes", "arguments": {"limit": 1}})
    for host in ("mcp.example.com", "mcp.example.com:443", f"203.0.113.7:{appliance.port}"):
        status, _, raw = http("POST", appliance.mcp_url, body, {**headers, "Host": host})
        assert status == 200, (host, raw)


@pytest.mark.anyio
async def test_note_written_through_one_worker_is_read_through_another(appliance: Appliance) -> None:
    word = "x" + uuid.uuid4().hex[:12]
    async with sessions_on_two_workers(appliance.mcp_url) as (writer, reader):
        assert writer.owner != reader.owner
        note = structured(await writer.client.call_tool(
            "add_note", {"title": f"written by worker {writer.owner}", "body": word, "tags": ["cross"]}))
        hits = structured(await reader.client.call_tool("search_notes", {"query": word}))["result"]
        assert [h["id"] for h in hits] == [note["id"]]
        assert structured(await reader.client.call_tool("get_note", {"id": note["id"]})) == note


@pytest.mark.anyio
async def test_notes_survive_a_restart_of_all_workers(appliance: Appliance) -> None:
    word = "y" + uuid.uuid4().hex[:12]
    async with mcp_client(appliance.mcp_url, "legacy") as (client, _):
        note = structured(await client.call_tool("add_note", {"title": "before restart", "body": word}))
    old_pids = {k: appliance.worker_pid(k) for k in range(WORKERS)}

    result = supervisorctl(appliance, "restart", *(worker_process_name(k) for k in range(WORKERS)))
    assert result.returncode == 0, result.stdout + result.stderr
    await anyio.to_thread.run_sync(lambda: appliance.wait_healthy(timeout=60, workers=WORKERS))
    new_pids = {k: appliance.worker_pid(k) for k in range(WORKERS)}
    assert all(new_pids[k] != old_pids[k] for k in range(WORKERS))

    async with mcp_client(appliance.mcp_url, "legacy") as (client, _):
        assert structured(await client.call_tool("get_note", {"id": note["id"]})) == note
        hits = structured(await client.call_tool("search_notes", {"query": word}))["result"]
        assert [h["id"] for h in hits] == [note["id"]]
