"""A full or read-only disk under a real appliance: the audit trail refuses calls it cannot record,
the notes server says its storage is full, both are counted and named in /health, and both recover.

The disks are tiny tmpfs mounts (root only), filled with a ballast file that the test then deletes.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Appliance, running, wait_until
from tests.integration.clients import mcp_client
from tests.integration.gatekit import audit_records, call
from tests.integration.test_metrics import scrape, total
from tests.tmpfs import fill, remount, tmpfs

pytestmark = pytest.mark.integration

#: Upper bound of calls the fill loop sends (the audit tmpfs is full after a few hundred).
MAX_CALLS = 2000


def add_note(app: Appliance, title: str, body: str = "b") -> tuple[int, str, Any]:
    """One add_note through nginx: (HTTP status, request id, parsed body)."""
    rid = uuid.uuid4().hex
    status, _, answer = call(app, "tools/call", "add_note", {"arguments": {"title": title, "body": body}},
                             headers={"X-Request-ID": rid})
    return status, rid, answer


def note_titles(app: Appliance) -> set[str]:
    """Every title in the notes database, read straight from the file."""
    db = sqlite3.connect(f"file:{Path(app.settings['data_dir']) / 'notes.db'}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT title FROM notes")}
    finally:
        db.close()


def health_reasons(app: Appliance) -> tuple[str, list[str]]:
    status, doc = app.health()
    assert status == 200, doc
    return doc["status"], doc.get("reasons", [])


def degraded_because(app: Appliance, words: str) -> bool:
    status, reasons = health_reasons(app)
    return status == "degraded" and any(words in r for r in reasons)


def until_healthy(app: Appliance, poke: Callable[[], object]) -> None:
    """Poke every worker (a call recovers the worker it reaches) until /health says ok."""

    def ok() -> bool:
        poke()
        return health_reasons(app)[0] == "ok"

    wait_until(ok, 30, "/health back to ok", interval=0.1)


def assert_refusal(answer: Any) -> None:
    assert isinstance(answer, dict) and answer["jsonrpc"] == "2.0", answer
    assert "audit trail cannot be written" in answer["error"]["message"], answer


def test_a_full_audit_disk_refuses_calls_with_503_before_they_run_and_recovers(make_appliance: Any) -> None:
    app = make_appliance(2, audit={"on_error": "refuse", "fsync": "none"})
    audit = Path(app.settings["log_dir"]) / "audit"
    with tmpfs(audit, "1m"), running(app):
        ballast = fill(audit, 96 * 1024)
        errors_before = total(scrape(app), "mcp_appliance_audit_write_errors_total")
        sent: list[tuple[int, str, str, Any]] = []
        lock = threading.Lock()

        def client(c: int) -> None:
            for n in range(MAX_CALLS // 4):
                with lock:
                    if sum(1 for s in sent if s[0] == 503) >= 40:
                        return
                title = f"audited {c}-{n} {uuid.uuid4().hex}"
                status, rid, answer = add_note(app, title)
                with lock:
                    sent.append((status, rid, title, answer))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        refused = [s for s in sent if s[0] == 503]
        answered = [s for s in sent if s[0] == 200]
        assert refused and answered and {s[0] for s in sent} <= {200, 503}, {s[0] for s in sent}
        for s in refused:
            assert_refusal(s[3])
        # A call that ran answers with its note, never with a tool error (the notes disk is not full).
        failed_tools = [s[3] for s in answered if not isinstance(s[3], dict) or s[3].get("result", {}).get("isError")]
        assert not failed_tools, failed_tools[:3]
        # Nothing ran unaudited: every note in the database was added by an answered, recorded call.
        by_id = {r["request_id"] for r in audit_records(app)}
        assert all(s[1] in by_id for s in answered), "an answered call has no audit record"
        titles = note_titles(app)
        assert {s[2] for s in answered} <= titles
        assert not titles & {s[2] for s in refused}, "a refused call was run"
        wait_until(lambda: total(scrape(app), "mcp_appliance_audit_write_errors_total") > errors_before, 10,
                   "audit write errors counted")
        assert degraded_because(app, "audit trail")

        ballast.unlink()
        wait_until(lambda: add_note(app, "after space is freed")[0] == 200, 30, "a call succeeds again")
        until_healthy(app, lambda: add_note(app, "poke"))


def test_a_read_only_audit_directory_refuses_every_call_until_it_is_writable(make_appliance: Any) -> None:
    app = make_appliance(2, audit={"on_error": "refuse"})
    audit = Path(app.settings["log_dir"]) / "audit"
    with tmpfs(audit, "1m"), running(app):
        # No process may hold a file open for writing while the tmpfs turns read-only: stop the workers.
        for k in range(2):
            app.supervisor.stop(f"worker-{k:02d}")
        remount(audit, "ro")
        try:
            for k in range(2):
                app.supervisor.start(f"worker-{k:02d}")
            wait_until(lambda: app.health()[1]["workers"]["serving"] == 2, 30, "both workers serving")
            errors_before = total(scrape(app), "mcp_appliance_audit_write_errors_total")
            for n in range(6):
                status, _, answer = add_note(app, f"refused {n}")
                assert status == 503, answer
                assert_refusal(answer)
            assert not {f"refused {n}" for n in range(6)} & note_titles_or_none(app)
            wait_until(lambda: total(scrape(app), "mcp_appliance_audit_write_errors_total") >= errors_before + 6, 10,
                       "every failed write counted")
            assert degraded_because(app, "Read-only file system")
        finally:
            remount(audit, "rw")
        until_healthy(app, lambda: add_note(app, "writable again"))
        assert add_note(app, "kept")[0] == 200


def note_titles_or_none(app: Appliance) -> set[str]:
    """Titles in the notes database (none when no call ever created it)."""
    if not (Path(app.settings["data_dir"]) / "notes.db").exists():
        return set()
    return note_titles(app)


def test_with_on_error_continue_calls_go_on_unaudited_and_are_counted(make_appliance: Any) -> None:
    app = make_appliance(2, audit={"on_error": "continue"})
    audit = Path(app.settings["log_dir"]) / "audit"
    with tmpfs(audit, "1m"), running(app):
        ballast = fill(audit, 0)
        errors_before = total(scrape(app), "mcp_appliance_audit_write_errors_total")
        titles = [f"unaudited {n} {uuid.uuid4().hex}" for n in range(400)]  # records beyond the space reserved
        assert all(add_note(app, t)[0] == 200 for t in titles)
        assert set(titles) <= note_titles(app)
        wait_until(lambda: total(scrape(app), "mcp_appliance_audit_write_errors_total") > errors_before, 10,
                   "audit write errors counted")
        assert degraded_because(app, "served unaudited")
        ballast.unlink()
        until_healthy(app, lambda: add_note(app, "poke"))


@pytest.mark.anyio
async def test_a_full_data_disk_makes_add_note_say_storage_full_while_reads_work(make_appliance: Any) -> None:
    app = make_appliance(2)
    data = Path(app.settings["data_dir"])
    with tmpfs(data, "2m"), running(app):
        async with mcp_client(app.mcp_url) as (client, _):
            kept = await client.call_tool("add_note", {"title": "kept", "body": "before the disk filled"})
            assert not kept.is_error
            ballast = fill(data, 96 * 1024)
            before = total(scrape(app), "mcp_appliance_storage_errors_total", reason="full")
            for n in range(60):  # 60 x 20 KB: far beyond the space left
                result = await client.call_tool("add_note", {"title": f"filler {n}", "body": "x" * 20_000})
                if result.is_error:
                    break
            text = " ".join(block.text for block in result.content if block.type == "text")
            # Not the SDK's bare "Error executing tool add_note": what failed, and that reads still work.
            assert result.is_error and "storage full" in text and "reading notes still works" in text, text
            got = await client.call_tool("get_note", {"id": kept.structured_content["id"]})
            assert not got.is_error and got.structured_content["title"] == "kept"
            found = await client.call_tool("search_notes", {"query": "kept"})
            assert not found.is_error
            wait_until(lambda: total(scrape(app), "mcp_appliance_storage_errors_total", reason="full") > before,
                       10, "storage errors counted")
            assert degraded_because(app, "storage full")

            ballast.unlink()
            after = await client.call_tool("add_note", {"title": "after", "body": "space again"})
            assert not after.is_error
        until_healthy(app, lambda: add_note(app, "poke"))
