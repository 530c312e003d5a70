"""Faults under constant load: kill -9 of a worker, of nginx, of the admin app; a crash-looping worker.

One appliance serves the module. Its hosted app is the notes server, except that a worker
starting while `<data_dir>/crash-on-start` exists exits at once (tests/integration/crashing_app.py).
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from appliance.health import worker_process_name
from tests.harness import Appliance, cleanup, http, new_appliance, wait_until
from tests.integration.clients import eventually, modern_request
from tests.integration.crashing_app import MARKER
from tests.integration.gatekit import audit_records
from tests.integration.load import LegacyLoad, ModernLoad

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NOTES = 12


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    app = new_appliance(2, env={"PYTHONPATH": str(REPO)}, mcp={"app": "tests.integration.crashing_app:server"})
    try:
        app.start().wait_healthy(timeout=60, workers=2)
        yield app
    finally:
        cleanup(app)


@pytest.fixture(scope="module")
def notes(appliance: Appliance) -> str:
    """A tag on NOTES notes written before any fault: they must all survive."""
    tag = "fault-" + uuid.uuid4().hex[:8]
    for i in range(NOTES):
        status, doc = call(appliance, "add_note", {"title": f"note {i}", "body": "kept", "tags": [tag]})
        assert status == 200 and not doc["result"]["isError"], doc
    return tag


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def call(appliance: Appliance, tool: str, arguments: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One 2026-07-28 tools/call through nginx."""
    headers, body = modern_request("tools/call", tool, {"name": tool, "arguments": arguments})
    status, _, raw = http("POST", appliance.mcp_url, body, headers)
    return status, json.loads(raw)


def program(appliance: Appliance, name: str) -> Any:
    return {p.name: p for p in appliance.supervisor.processes()}[name]


def restarted(appliance: Appliance, name: str, old_pid: int) -> bool:
    info = program(appliance, name)
    return info.state == "RUNNING" and info.pid not in (0, old_pid)


def health_ok(appliance: Appliance, workers: int) -> bool:
    status, doc = appliance.health()
    return status == 200 and doc["status"] == "ok" and doc["workers"]["serving"] == workers


def notes_intact(appliance: Appliance, tag: str) -> None:
    status, doc = call(appliance, "list_notes", {"tag": tag, "limit": 100})
    assert status == 200, doc
    assert len(doc["result"]["structuredContent"]["result"]) == NOTES, doc


@pytest.mark.anyio
async def test_killed_worker_fails_only_the_calls_it_was_running_and_loses_no_record(
    appliance: Appliance, notes: str,
) -> None:
    kills = 3
    modern = ModernLoad(appliance.mcp_url, loops=4)
    legacy = LegacyLoad(appliance.mcp_url, sessions=4, pause=0.05)
    async with modern.running(), legacy.running():
        await modern.wait_for_calls(100)
        for _ in range(kills):
            old = appliance.worker_pid(1)
            os.kill(old, signal.SIGKILL)  # our appliance's worker
            await eventually(lambda: restarted(appliance, worker_process_name(1), old), 30, "worker-01 restarted")  # noqa: B023
            await eventually(lambda: health_ok(appliance, 2), 30, "both workers serving again")
            await modern.wait_for_calls(50)

    # Requests that never reached the dead worker were retried on the other one; only calls it
    # was handling failed: a 502 that says they may or may not have run, or (when it had begun
    # to answer) an answer cut off. Each load loop has one call in flight at a time.
    assert set(modern.outcomes.failures) <= {"502", "cut off"}, str(modern.outcomes)
    assert len(modern.interrupted) <= modern.loops * kills, str(modern.outcomes)
    assert legacy.outcomes.failed == 0, str(legacy.outcomes)  # its sessions ended with 404, re-initialized

    # Nothing lost: one audit record per answered call (an interrupted call may have one too).
    records = [r for r in audit_records(appliance) if r["request_id"].startswith(f"load-{modern.tag}-")]
    ids = [r["request_id"] for r in records]
    assert len(ids) == len(set(ids)), "a call recorded twice"
    assert set(modern.answered) <= set(ids), len(set(modern.answered) - set(ids))
    assert set(ids) - set(modern.answered) <= set(modern.interrupted)
    await anyio.to_thread.run_sync(notes_intact, appliance, notes)


def test_killed_nginx_is_restarted_without_leftovers_and_health_answers(appliance: Appliance, notes: str) -> None:
    master = program(appliance, "nginx").pid
    workers = psutil.Process(master).children()
    os.kill(master, signal.SIGKILL)  # our appliance's nginx master; its workers are orphaned

    wait_until(lambda: restarted(appliance, "nginx", master), 30, "nginx restarted by supervisord")
    wait_until(lambda: health_ok(appliance, 2), 30, "/health answers ok through the new nginx")
    # The orphaned workers of the killed master were stopped, so the new one could bind the port.
    wait_until(lambda: not any(w.is_running() for w in workers), 10, "old nginx workers gone")
    notes_intact(appliance, notes)


def test_killed_admin_app_is_restarted_and_health_answers(appliance: Appliance) -> None:
    admin = program(appliance, "admin").pid
    os.kill(admin, signal.SIGKILL)  # our appliance's admin app
    wait_until(lambda: restarted(appliance, "admin", admin), 30, "admin restarted by supervisord")
    wait_until(lambda: health_ok(appliance, 2), 30, "/health answers ok again")


def test_crash_looping_worker_is_reported_not_restarted_forever_and_recovers_on_request(
    appliance: Appliance, notes: str,
) -> None:
    marker = Path(appliance.settings["data_dir"]) / MARKER
    marker.touch()
    try:
        old = appliance.worker_pid(1)
        os.kill(old, signal.SIGKILL)  # restarts now fail: a crash loop
        # supervisord retries with growing back-off, then gives up (startretries).
        wait_until(lambda: program(appliance, "worker-01").state == "FATAL", 90, "worker-01 FATAL")

        status, doc = appliance.health()
        assert status == 200 and doc["status"] == "degraded", doc
        assert any("worker-01 is FATAL" in reason for reason in doc["reasons"]), doc
        status, _, body = http("GET", appliance.url + "/metrics")
        assert status == 200 and 'mcp_appliance_process_up{program="worker-01"} 0.0' in body.decode()
        events = (Path(appliance.settings["log_dir"]) / "events.log").read_text()
        assert any(json.loads(line).get("event") == "PROCESS_STATE_FATAL" and json.loads(line).get("program") == "worker-01"
                   for line in events.splitlines() if line.startswith("{"))
        for _ in range(20):  # the other worker serves everything meanwhile
            status, doc = call(appliance, "search_notes", {"query": "kept"})
            assert status == 200, doc
    finally:
        marker.unlink(missing_ok=True)

    # The operator's recovery: fix the cause, then restart the worker (or `mcp-appliance reload`).
    token = (appliance.run_dir / "admin.token").read_text().strip()
    status, _, raw = http("POST", appliance.url + "/admin/workers/1/restart", {},
                          {"Authorization": f"Bearer {token}"}, timeout=120)
    assert status == 200, raw
    wait_until(lambda: health_ok(appliance, 2), 30, "both workers serving after the restart")
    notes_intact(appliance, notes)
