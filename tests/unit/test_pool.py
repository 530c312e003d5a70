"""nginx's worker pool as slot symlinks: balanced, atomic re-pointing, readable back."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

from appliance import pool


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 7, 64])
def test_slots_spread_evenly_over_any_worker_count(workers: int) -> None:
    shares = collections.Counter(pool.spread(list(range(workers))))
    assert set(shares) == set(range(workers))
    assert max(shares.values()) - min(shares.values()) <= 1


def test_spread_needs_a_worker() -> None:
    with pytest.raises(ValueError):
        pool.spread([])


def test_assign_points_every_slot_at_a_worker_socket_and_re_points_in_place(tmp_path: Path) -> None:
    pool.prepare(tmp_path, [0, 1])
    assert pool.members(tmp_path) == {0, 1}
    link = pool.slot_path(tmp_path, 0)
    assert link.is_symlink() and (link.parent / os.readlink(link)).resolve() == pool.worker_socket(tmp_path, 0)

    pool.assign(tmp_path, [1])  # worker 0 drains: no slot may lead to it
    assert pool.members(tmp_path) == {1}
    assert {Path(os.readlink(pool.slot_path(tmp_path, j))).name for j in range(pool.SLOTS)} == {"worker-01.sock"}
    assert not list(pool.pool_dir(tmp_path).glob(".*"))  # no temporary link left behind

    pool.assign(tmp_path, range(3))
    assert pool.members(tmp_path) == {0, 1, 2}


def test_unresponsive_worker_leaves_the_slots_and_an_operation_does_not_bring_it_back(tmp_path: Path) -> None:
    pool.prepare(tmp_path, [0, 1])
    pool.set_unresponsive(tmp_path, [1])  # the watchdog
    assert pool.members(tmp_path) == {0}
    pool.assign(tmp_path, range(3))  # a scale meanwhile: the new worker joins, the hung one stays out
    assert pool.members(tmp_path) == {0, 2}
    pool.set_unresponsive(tmp_path, [])  # it answers again
    assert pool.members(tmp_path) == {0, 1, 2}
    assert pool.read_state(tmp_path) == {"serving": [0, 1, 2], "unresponsive": [], "servers": {}}


def test_pool_never_empties_when_no_worker_answers(tmp_path: Path) -> None:
    pool.prepare(tmp_path, [0, 1])
    pool.set_unresponsive(tmp_path, [0, 1])
    assert pool.members(tmp_path) == {0, 1}


def own_members(run_dir: Path, server: str) -> set[str]:
    return {Path(os.readlink(pool.slot_path(run_dir, j, server))).name for j in range(pool.SLOTS)}


def test_a_server_with_a_worker_count_has_slots_among_its_first_workers_only(tmp_path: Path) -> None:
    pool.prepare(tmp_path, [0, 1, 2], servers={"files": 2, "one": 1})
    assert own_members(tmp_path, "files") == {"worker-00.sock", "worker-01.sock"}
    assert own_members(tmp_path, "one") == {"worker-00.sock"}
    assert pool.members(tmp_path) == {0, 1, 2}  # every other server keeps every worker
    pool.set_unresponsive(tmp_path, [1])  # the watchdog: out of every pool it was in
    assert own_members(tmp_path, "files") == {"worker-00.sock"} and pool.members(tmp_path) == {0, 2}
    pool.assign(tmp_path, [1, 2])  # worker 0 restarts (an operation): files has only the silent 1 left
    assert own_members(tmp_path, "files") == {"worker-01.sock"}
    # Its only worker is restarting: the slots stay on it (nginx's tries fail, the client gets 503).
    assert own_members(tmp_path, "one") == {"worker-00.sock"}
    pool.limit_servers(tmp_path, {"files": 3})  # a reload changed the count
    assert own_members(tmp_path, "files") == {"worker-02.sock"}
