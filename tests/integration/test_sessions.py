"""Legacy sessions when a worker dies, and the switch that turns sessions off.

Each test owns its appliance: one kills a worker, the other runs with different settings.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import anyio
import psutil
import pytest
from mcp.shared.exceptions import MCPError

from appliance.health import worker_process_name
from tests.harness import Appliance, http, wait_until
from tests.integration.clients import (
    access_log,
    eventually,
    legacy_request_headers,
    mcp_client,
    probes,
    sessions_on_two_workers,
)

pytestmark = pytest.mark.integration


class HealthWatch:
    """Polls /health in a thread and remembers every overall status it saw, in order."""

    def __init__(self, appliance: Appliance) -> None:
        self.appliance = appliance
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _, doc = self.appliance.health()
            except (OSError, ValueError):
                self.seen.append("unreachable")
            else:
                if not self.seen or self.seen[-1] != doc["status"]:
                    self.seen.append(doc["status"])
            self._stop.wait(0.05)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        wait_until(lambda: self.seen, 10, "first /health answer")  # the baseline, before anything happens
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def raw_list_tools(appliance: Appliance, session_id: str) -> tuple[int, dict[str, Any]]:
    """tools/list inside `session_id`, sent as plain HTTP (no SDK between us and the answer)."""
    body = {"jsonrpc": "2.0", "id": 99, "method": "tools/list", "params": {}}
    status, _, raw = http("POST", appliance.mcp_url, body, legacy_request_headers(session_id))
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}


def assert_session_not_found(status: int, doc: dict[str, Any]) -> None:
    assert status == 404, (status, doc)  # the spec's "re-initialize", never 502
    assert doc["jsonrpc"] == "2.0" and "error" in doc, doc
    assert "not found" in doc["error"]["message"].lower(), doc


@pytest.mark.anyio
async def test_killed_worker_sessions_get_404_and_others_keep_working(
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(workers=2).start()
    await anyio.to_thread.run_sync(lambda: appliance.wait_healthy(timeout=60, workers=2))

    async with sessions_on_two_workers(appliance.mcp_url) as (survivor_session, doomed_session):
        survivor, survivor_wire = survivor_session.client, survivor_session.wire
        doomed, doomed_wire = doomed_session.client, doomed_session.wire
        assert (survivor_session.owner, doomed_session.owner) == (0, 1)
        for client in (doomed, survivor):
            await client.call_tool("add_note", {"title": "before the crash", "body": "x"})
        old_pid = appliance.worker_pid(1)

        with HealthWatch(appliance) as watch:
            os.kill(old_pid, signal.SIGKILL)  # we started this appliance; its worker 1 dies hard
            await eventually(lambda: not is_alive(old_pid), 10, "killed worker gone")

            # Every request of the dead worker's session is answered 404 + JSON-RPC error,
            # while the worker is down and after supervisord brought it back (it forgot the session).
            status, doc = await anyio.to_thread.run_sync(raw_list_tools, appliance, doomed_wire.session_id)
            assert_session_not_found(status, doc)
            with pytest.raises(MCPError):
                await doomed.call_tool("list_notes", {})

            # The other worker's session is untouched: same session id, still served.
            result = await survivor.call_tool("list_notes", {})
            assert not result.is_error
            assert survivor_wire.exchanges[-1] == ("POST", survivor_wire.session_id, 200)

            # supervisord restarts the worker under a new pid.
            def restarted() -> bool:
                info = {p.name: p for p in appliance.supervisor.processes()}[worker_process_name(1)]
                return info.state == "RUNNING" and info.pid not in (0, old_pid)

            await eventually(restarted, 30, "worker 1 restarted by supervisord")
            await anyio.to_thread.run_sync(lambda: appliance.wait_healthy(timeout=30, workers=2))
            status, doc = await anyio.to_thread.run_sync(raw_list_tools, appliance, doomed_wire.session_id)
            assert_session_not_found(status, doc)

        # nginx itself answered 404 while the owner was down (its upstream failed), and the
        # restarted worker answered 404 for the session it never knew.
        def refused() -> list[dict[str, Any]] | None:
            entries = [e for e in access_log(appliance) if e["session"] == doomed_wire.session_id]
            posts = [e for e in entries if e["method"] == "POST" and e["status"] not in (200, 202)]
            # Three: the raw one while down, the SDK client's call, the raw one after the restart.
            return posts if len(posts) >= 3 else None

        gone = await eventually(refused, 10, "refused POSTs in nginx's access log")
        assert {e["status"] for e in gone} == {404}, gone
        assert "502" in gone[0]["upstream_status"], gone[0]
        assert "404" in gone[-1]["upstream_status"], gone[-1]

        assert "degraded" in watch.seen, f"/health statuses seen: {watch.seen}"
        assert watch.seen[0] == "ok" and watch.seen[-1] == "ok", watch.seen
        assert "unreachable" not in watch.seen, watch.seen

        # The client of the lost session re-initializes and gets a new session that works.
        async with mcp_client(appliance.mcp_url) as (again, again_wire):
            assert again_wire.session_id not in (None, doomed_wire.session_id)
            notes = (await again.call_tool("list_notes", {})).structured_content["result"]
            assert len(notes) == 2  # the data written before the crash is all there

        result = await survivor.call_tool("list_notes", {})
        assert not result.is_error


@pytest.mark.anyio
async def test_stateless_switch_serves_legacy_clients_without_sessions(
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(workers=2, mcp={"sessions": False}).start()
    await anyio.to_thread.run_sync(lambda: appliance.wait_healthy(timeout=60, workers=2))

    async with mcp_client(appliance.mcp_url, "legacy") as (client, wire):
        note = (await client.call_tool("add_note", {"title": "stateless", "body": "no session"})).structured_content
        hits = (await client.call_tool("search_notes", {"query": "stateless"})).structured_content["result"]
        assert [h["id"] for h in hits] == [note["id"]]
        tools = await client.list_tools()
        assert "add_note" in {t.name for t in tools.tools}

    assert wire.issued_session_ids == set()
    assert all(sid is None for _, sid, _ in wire.exchanges)
    assert {method for method, _, _ in wire.exchanges} == {"POST"}  # no GET stream, no DELETE
    assert all(status in (200, 202) for _, _, status in wire.exchanges), wire.exchanges
    now = await anyio.to_thread.run_sync(probes, appliance)
    assert all(p["sessions_opened"] == 0 for p in now.values())
    assert sum(p["requests"] for p in now.values()) >= len(wire.exchanges)
    assert wait_until(lambda: appliance.health()[1]["status"] == "ok", 10, "still healthy")
