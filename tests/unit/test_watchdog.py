"""The watchdog's decisions over a fake fleet whose processes are real child processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from appliance.watchdog import FAILURES, Target, Watchdog, WatchdogMetrics
from tests.harness import wait_until


class Fleet:
    """Two processes whose probe answers what the test says."""

    kind = "worker"

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.answering = {name: True for name in pids}
        self.out: set[str] = set()
        self.cuts: list[str] = []

    async def targets(self) -> list[Target]:
        def probe(name: str):  # type: ignore[no-untyped-def]
            async def answer(timeout: float) -> bool:
                return self.answering[name]
            return answer

        return [Target(name, name[-1], pid, probe(name)) for name, pid in self.pids.items()]

    async def set_out(self, names: set[str]) -> None:
        self.out = set(names)

    async def already_out(self) -> set[str]:
        return set(self.out)

    async def cut(self, target: Target) -> int:
        self.cuts.append(target.name)
        return 1


def state(pid: int) -> str:
    """The kernel's one-letter state of `pid` (S asleep, R running, Z zombie, …)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def sleeping(pid: int) -> bool:
    return state(pid) == "S"


@pytest.fixture
def children() -> Iterator[dict[str, int]]:
    procs = {f"w-{k}": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for k in (0, 1)}
    try:
        # Idle, as a stopped or blocked worker is: past the interpreter's start-up, asleep.
        for p in procs.values():
            wait_until(lambda: sleeping(p.pid), 10, "child asleep")
        yield {name: p.pid for name, p in procs.items()}
    finally:
        for p in procs.values():  # ours, by pid
            p.kill()
            p.wait()


def dog(fleet: Fleet, hang_timeout: float) -> Watchdog:
    return Watchdog(fleet, hang_timeout, WatchdogMetrics("worker", registry=CollectorRegistry()))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_silent_process_goes_out_after_failures_in_a_row_and_back_when_it_answers(children: dict[str, int]) -> None:
    fleet = Fleet(children)
    watchdog = dog(fleet, hang_timeout=60)
    await watchdog.round()
    fleet.answering["w-1"] = False
    for _ in range(FAILURES - 1):
        await watchdog.round()
    assert fleet.out == set()  # one missed probe is not enough
    await watchdog.round()
    assert fleet.out == {"w-1"}
    assert fleet.cuts == ["w-1"]  # what it holds is ended as it goes out, and every round while out
    await watchdog.round()
    assert fleet.cuts == ["w-1", "w-1"]
    assert any("w-1" in reason and "out of nginx's pool" in reason for reason in watchdog.reasons())
    fleet.answering["w-1"] = True
    await watchdog.round()
    assert fleet.out == set()


@pytest.mark.anyio
async def test_process_that_never_answered_is_starting_not_hung(children: dict[str, int]) -> None:
    fleet = Fleet(children)
    fleet.answering["w-0"] = False
    watchdog = dog(fleet, hang_timeout=60)
    for _ in range(FAILURES + 2):
        await watchdog.round()
    assert fleet.out == set()


@pytest.mark.anyio
async def test_process_silent_for_hang_timeout_is_killed_and_its_successor_stays_out_until_it_answers(
    children: dict[str, int],
) -> None:
    fleet = Fleet(children)
    watchdog = dog(fleet, hang_timeout=0.2)
    await watchdog.round()
    fleet.answering["w-1"] = False
    old = children["w-1"]
    deadline = time.monotonic() + 10
    while not watchdog.restarts and time.monotonic() < deadline:
        await watchdog.round()
    assert [name for _, name, _ in watchdog.restarts] == ["w-1"]
    while time.monotonic() < deadline and subprocess.run(["kill", "-0", str(old)], capture_output=True).returncode == 0:
        # Popen has not reaped it yet: a zombie counts as gone; poll /proc for its state.
        if state(old) == "Z":
            break
        await watchdog.round()
    # The supervisor started a new process under the same name: out until it answers.
    fleet.pids["w-1"] = children["w-0"] + 10**6
    await watchdog.round()
    assert fleet.out == {"w-1"}
    fleet.answering["w-1"] = True
    await watchdog.round()
    assert fleet.out == set()


@pytest.mark.anyio
async def test_a_new_watchdog_keeps_out_what_its_predecessor_took_out_until_it_answers(children: dict[str, int]) -> None:
    fleet = Fleet(children)
    fleet.out = {"w-1"}
    fleet.answering["w-1"] = False
    watchdog = dog(fleet, hang_timeout=60)  # the admin app restarted meanwhile
    await watchdog.round()
    assert fleet.out == {"w-1"}
    fleet.answering["w-1"] = True
    await watchdog.round()
    assert fleet.out == set()


@pytest.mark.anyio
async def test_a_silent_process_that_is_busy_computing_goes_out_but_what_it_holds_is_not_ended() -> None:
    """An overloaded worker answers its probe late while it serves what it holds: cutting that would turn
    slowness into errors. A silent one that uses no CPU (stopped, deadlocked, blocked in sleep) is cut."""
    import anyio

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_until(lambda: sleeping(idle.pid), 10, "idle child asleep")
        fleet = Fleet({"w-0": idle.pid, "w-1": busy.pid})
        watchdog = dog(fleet, hang_timeout=60)
        await watchdog.round()
        fleet.answering = {"w-0": False, "w-1": False}
        for _ in range(FAILURES + 2):
            await anyio.sleep(0.2)  # CPU time accrues between rounds, as between real ones
            await watchdog.round()
        assert fleet.out == {"w-0", "w-1"}
        assert "w-0" in fleet.cuts
        assert "w-1" not in fleet.cuts
    finally:
        for p in (busy, idle):  # ours, by pid
            p.kill()
            p.wait()
