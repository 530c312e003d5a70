"""The audit writer: whole lines, rotation by the writer itself without losing or splitting a line."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from appliance.config import AuditSettings
from appliance.gate.audit import AuditWriter, arguments_digest


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
