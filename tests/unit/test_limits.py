"""The workers' shared token buckets and the session registry, as pure pieces."""

from __future__ import annotations

from pathlib import Path

from appliance.gate.buckets import SharedBuckets, buckets_path
from appliance.gate.registry import ServerCaps, SessionRegistry


def test_two_workers_opening_the_table_share_one_bucket_per_key(tmp_path: Path) -> None:
    first = SharedBuckets(buckets_path(tmp_path), rate=1, burst=3, size_mb=1)
    second = SharedBuckets(buckets_path(tmp_path), rate=1, burst=3, size_mb=1)
    now = 1000.0
    taken = [worker.take(b"p:\0alice", now) for worker in (first, second) * 4]
    assert taken == [True] * 4 + [False] * 4  # burst + 1 in all, whichever worker answers
    assert first.take(b"p:\0bob", now)  # another principal has its own bucket
    assert second.take(b"p:\0alice", now + 1.0)  # refilled at the rate
    assert not first.take(b"p:\0alice", now + 1.0)


def test_a_full_group_forgets_the_least_recently_used_bucket(tmp_path: Path) -> None:
    buckets = SharedBuckets(tmp_path / "t", rate=1, burst=0, size_mb=0)  # one group of 8 slots
    assert buckets.groups == 1
    assert buckets.take(b"busy", 100.0) and not buckets.take(b"busy", 100.0)
    for k in range(20):  # newcomers fill the group; the busy key, used last, stays
        assert buckets.take(b"new-%d" % k, 99.0 - k * 0.001)
    assert not buckets.take(b"busy", 100.0)


def test_idle_sessions_are_swept_and_the_count_reported() -> None:
    counts: list[int] = []
    registry = SessionRegistry(idle_timeout=10, max_sessions=100, max_per_key=2, on_change=counts.append)
    registry.add(b"s1", ("", "alice"), b"p:alice")
    registry.add(b"s2", ("", "alice"), b"p:alice")
    assert len(registry) == 2 and registry.opened == 2
    assert registry.reserve(b"p:alice") == "principal_sessions"
    assert registry.reserve(b"p:alice", capped=False) is None  # an exempt client
    registry.release(b"p:alice")
    registry.get(b"s1").last_used -= 11  # type: ignore[union-attr]
    registry.sweep()
    assert len(registry) == 1 and counts[-1] == 1
    registry.forget(b"s2")
    assert len(registry) == 0 and counts[-1] == 0 and registry.per_key == {}


def test_a_full_worker_refuses_new_sessions_for_everyone() -> None:
    registry = SessionRegistry(idle_timeout=10, max_sessions=1, max_per_key=1)
    assert registry.reserve(b"a") is None
    assert registry.reserve(b"b") == "sessions"


def test_a_servers_own_caps_count_its_sessions_alone_and_come_back_when_they_end() -> None:
    registry = SessionRegistry(idle_timeout=10, max_sessions=100, max_per_key=100)
    calc = ServerCaps("calc", max_sessions=2, max_per_key=1)
    assert registry.reserve(b"alice", caps=calc) is None
    registry.add(b"s1", ("", "alice"), b"alice", "calc")
    registry.release(b"alice", "calc")
    assert registry.reserve(b"alice", caps=calc) == "server_principal_sessions"
    assert registry.reserve(b"alice", capped=False, caps=calc) is None  # an exempt client: no per-principal cap
    registry.release(b"alice", "calc")
    # Another server's sessions do not count against calc's caps, nor calc's against it.
    for k in range(3):
        assert registry.reserve(b"alice") is None
        registry.add(b"n%d" % k, ("", "alice"), b"alice")
        registry.release(b"alice")
    assert registry.reserve(b"bob", caps=calc) is None
    registry.add(b"s2", ("", "bob"), b"bob", "calc")
    registry.release(b"bob", "calc")
    assert registry.reserve(b"carol", caps=calc) == "server_sessions"
    assert registry.open_with("calc") == 2 and len(registry) == 5
    registry.forget(b"s1")
    registry.get(b"s2").last_used -= 11  # type: ignore[union-attr]
    registry.sweep()
    assert registry.open_with("calc") == 0
    assert registry.reserve(b"alice", caps=calc) is None
    registry.release(b"alice", "calc")
    assert registry.per_server_key == {("", b"alice"): 3} and registry.per_server == {"": 3}
