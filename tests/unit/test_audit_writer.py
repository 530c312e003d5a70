"""The audit writer: whole lines, rotation by the writer itself without losing or splitting a line."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from appliance.conditions import Conditions
from appliance.config import AuditSettings
from appliance.gate.audit import RESERVE, AuditRecorder, AuditWriter, arguments_digest
from appliance.gate.auth import Principal
from appliance.gate.exchange import Exchange
from appliance.gate.jsonrpc import RpcCall
from tests.tmpfs import fill, remount, tmpfs


def lines(directory: Path) -> list[dict[str, object]]:
    out = []
    for path in directory.glob("worker-00.jsonl*"):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


@pytest.mark.parametrize("fsync", ["none", "every"])
def test_rotation_keeps_every_record_whole(tmp_path: Path, fsync: str) -> None:
    writer = AuditWriter(tmp_path / "worker-00.jsonl", AuditSettings(max_bytes=4096, backups=100, fsync=fsync))  # type: ignore[arg-type]
    for n in range(500):
        writer.write({"n": n, "pad": "x" * (n % 50)})
    writer.close()
    files = sorted(tmp_path.glob("worker-00.jsonl*"))
    assert len(files) >= 4 and all(f.stat().st_size <= 4096 for f in files)
    assert sorted(r["n"] for r in lines(tmp_path)) == list(range(500))


def test_rotation_keeps_at_most_backups_files(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path / "worker-00.jsonl", AuditSettings(max_bytes=4096, backups=3, fsync="none"))
    for n in range(500):
        writer.write({"n": n, "pad": "x" * 40})
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"worker-00.jsonl{s}" for s in ("", ".1", ".2", ".3")]
    newest = [r["n"] for r in lines(tmp_path)]
    assert max(newest) == 499 and len(newest) < 500  # the newest records are kept, the oldest files go


def test_a_reopened_file_is_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "worker-00.jsonl"
    AuditWriter(path, AuditSettings()).write({"n": 1})
    AuditWriter(path, AuditSettings()).write({"n": 2})  # the restarted worker
    assert [r["n"] for r in lines(tmp_path)] == [1, 2]


@pytest.mark.anyio
async def test_interval_fsync_runs_off_the_event_loop(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path / "worker-00.jsonl", AuditSettings(fsync="interval", fsync_interval=0.05))
    writer.write({"n": 1})
    assert writer.dirty
    with anyio.fail_after(5):
        while writer.dirty or writer._syncing:
            await anyio.sleep(0.01)
    writer.close()


def test_arguments_digest_is_of_canonical_json() -> None:
    assert arguments_digest({"b": 1, "a": "é"}) == arguments_digest({"a": "é", "b": 1})
    assert arguments_digest({"a": 1}) != arguments_digest({"a": 2})
    assert arguments_digest({"a": 1}).startswith("sha256:")


def _counting(tmp_path: Path) -> tuple[AuditWriter, list[int], Conditions]:
    failures: list[int] = []
    conditions = Conditions()
    writer = AuditWriter(tmp_path / "worker-00.jsonl", AuditSettings(fsync="none"),
                         on_failure=lambda: failures.append(1), conditions=conditions, refuse=True)
    return writer, failures, conditions


def test_a_full_disk_fails_the_writer_while_running_calls_still_have_room(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "audit", "256k") as audit:
        writer, failures, conditions = _counting(audit)
        assert writer.ready() and writer.reserved_to - writer.size == RESERVE
        fill(audit, 8 * 1024)
        written = 0
        while writer.ready() and written < 10_000:  # records until the space cannot be renewed
            writer.write({"n": written, "pad": "x" * 200})
            written += 1
        assert not writer.ready() and failures and writer.failure
        assert any("cannot be written" in r for r in conditions.reasons())
        # Calls that passed ready() before the failure still get their records: the reserve holds them.
        for n in range(RESERVE // 2 // 300):
            writer.write({"late": n, "pad": "x" * 200})
        writer.close()
        records = [json.loads(line) for line in (audit / "worker-00.jsonl").read_text().splitlines()]
        assert len(records) == written + RESERVE // 2 // 300


def test_the_writer_recovers_by_itself_once_space_is_freed(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "audit", "256k") as audit:
        writer, failures, conditions = _counting(audit)
        ballast = fill(audit, 8 * 1024)
        while writer.ready():
            writer.write({"pad": "x" * 200})
        counted = len(failures)
        assert not writer.ready() and len(failures) > counted  # every retry that fails is counted
        ballast.unlink()
        assert writer.ready() and writer.failure is None and conditions.reasons() == []
        writer.write({"after": True})
        writer.close()
        assert json.loads((audit / "worker-00.jsonl").read_text().splitlines()[-1]) == {"after": True}


def test_a_read_only_directory_at_start_fails_the_writer_until_it_is_writable(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "audit", "256k") as audit:
        remount(audit, "ro")
        writer, failures, conditions = _counting(audit)
        assert writer.failure and not writer.ready() and len(failures) == 2
        writer.write({"lost": True})  # logged with the record, counted
        assert len(failures) == 3 and "Read-only" in conditions.reasons()[0]
        remount(audit, "rw")
        assert writer.ready()
        writer.write({"kept": True})
        writer.close()
        assert [json.loads(line) for line in (audit / "worker-00.jsonl").read_text().splitlines()] == [{"kept": True}]


def test_a_rotated_file_gives_back_its_reserved_space(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path / "worker-00.jsonl", AuditSettings(max_bytes=4096, backups=3, fsync="none"))
    for n in range(100):
        writer.write({"n": n, "pad": "x" * 40})
    writer.close()
    rotated = tmp_path / "worker-00.jsonl.1"
    assert rotated.stat().st_blocks * 512 < RESERVE  # only its records, not the space reserved ahead


def _as_dict(ex: Exchange, duration: float, worker: int, server: str, raw: bool) -> dict[str, object]:
    """The record as the recorder built it before it wrote one f-string: a dict through json."""
    rpc = ex.rpc
    record: dict[str, object] = {
        "type": "mcp", "request_id": ex.request_id, "worker": worker, "server": server,
        "principal": ex.principal.name if ex.principal else None, "client": ex.client, "session": ex.session,
        "protocol_version": ex.protocol_version, "http_method": ex.http_method,
        "method": rpc.method if rpc else None, "jsonrpc_id": rpc.id if rpc else None,
        "name": rpc.name if rpc else None, "outcome": ex.outcome, "status": ex.status,
        "duration_ms": round(duration * 1000, 3)}
    if rpc is not None and rpc.batch:
        record["batch"] = [{"method": c.method, "name": c.name, "jsonrpc_id": c.id} for c in rpc.batch]
    if rpc is not None and rpc.kind is not None:
        record["kind"] = rpc.kind
    if rpc is not None and rpc.has_arguments:
        record["arguments_sha256"] = arguments_digest(rpc.arguments)
        if raw:
            record["arguments"] = rpc.arguments
    for key, value in (("reason", ex.denied), ("violation", ex.violation), ("trace_id", ex.trace_id)):
        if value:
            record[key] = value
    return record


EXCHANGES = [
    Exchange(started=0.0, http_method="POST"),
    Exchange(started=0.0, http_method="POST", request_id="r-1", client="127.0.0.1", protocol_version="2026-07-28",
             rpc=RpcCall(method="tools/call", id=7, kind="tool", name="add", arguments={"b": 2, "a": 1}),
             status=200, answer=("result", True)),
    Exchange(started=0.0, http_method="POST", request_id="r-2", session="s\"\\é",
             principal=Principal(name="ci-bot ✓", scopes=frozenset()),
             rpc=RpcCall(method="resources/read", id="id \"x\"", kind="resource", name="notes://1\n"),
             status=403, denied="policy", violation="policy", trace_id="ab" * 16),
    Exchange(started=0.0, http_method="POST", rpc=RpcCall(method="tools/call", id=1.5, kind="tool", name="\ud800",
                                                         arguments=["☃", None, 1e300])),
    Exchange(started=0.0, http_method="POST", rpc=RpcCall(
        method="batch", batch=(RpcCall(method="ping", id=None), RpcCall(method="tools/call", id=2, name="x"))),
        status=400),
]


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("ex", EXCHANGES, ids=range(len(EXCHANGES)))
def test_each_record_is_one_json_line_with_the_members_of_the_exchange(tmp_path: Path, ex: Exchange,
                                                                       raw: bool) -> None:
    writer = AuditWriter(tmp_path / "worker-00.jsonl", AuditSettings(fsync="none"))
    AuditRecorder(writer, 3, raw, "notes")(ex, 0.0123456)
    writer.close()
    (line,) = (tmp_path / "worker-00.jsonl").read_text().splitlines()
    record = json.loads(line)
    stamp = record.pop("time")
    assert datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) <= datetime.now(UTC)
    assert len(stamp) == len("2026-12-02T02:19:04.921Z")
    assert record == _as_dict(ex, 0.0123456, 3, "notes", raw)
