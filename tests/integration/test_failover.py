"""Failover: a worker that is alive but does not answer leaves nginx's pool, comes back or is restarted.

One appliance serves the module, with a short `workers.hang_timeout` and `workers.read_timeout`.
Its hosted app is the notes server plus a tool that blocks its worker's event loop
(tests/integration/blocking_app.py). A worker is frozen with SIGSTOP (always SIGCONT in
`finally`) or with that tool, under constant load of 2026-07-28 tool calls whose clients give
up after CALL_TIMEOUT (as a load generator with a timeout does); every call is recorded with
the moment it was sent. Calls the frozen worker already held end when their client gives up,
when it thaws, or when it is restarted: the single worker's capacity is compared from FREE_AT on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from appliance import pool
from appliance.gate.sessions import parse_owner
from tests.harness import Appliance, http, new_appliance, running
from tests.integration.clients import eventually, legacy_request_headers, modern_request, probes
from tests.integration.gatekit import audit_records
from tests.integration.load import BackgroundLoad, Outcomes, RawSession, first_error

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HANG_TIMEOUT = 16
READ_TIMEOUT = 2
#: Seconds a load client waits for an answer before it gives up and sends its next call.
CALL_TIMEOUT = 2.5
#: From nginx's side a frozen worker must be out this soon: its pool slots re-pointed, and
#: nginx's idle connections to it (idle since before it froze) closed (pool.UPSTREAM_IDLE_TIMEOUT).
OUT_OF_POOL = 2.0
#: Slack for nginx's timers and the test's own polling on a busy machine.
SLACK = 0.5
WINDOW = 6.0
#: When every client is free of the calls the frozen worker held: the watchdog ends them when it
#: takes the worker out (appliance/sockets.py), at most OUT_OF_POOL after the freeze. The single
#: worker's capacity is compared from then on (the issue's "from 3 s after the freeze").
FREE_AT = OUT_OF_POOL + SLACK + 0.5


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    app = new_appliance(2, env={"PYTHONPATH": str(REPO)}, mcp={"app": "tests.integration.blocking_app:server"})
    app.settings["workers"].update(hang_timeout=HANG_TIMEOUT, read_timeout=READ_TIMEOUT)
    with running(app):
        yield app


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class Call:
    """One call of the load: when it was sent (time.monotonic()), and how it ended."""

    request_id: str
    sent: float
    ok: bool
    status: str
    body: str = ""
    done: float = 0.0


class CallLoad(BackgroundLoad):
    """`loops` clients sending 2026-07-28 requests back to back, each call recorded."""

    def __init__(self, url: str, loops: int = 8, method: str = "tools/call", tool: str = "search_notes",
                 limit: float = 90, timeout: float = CALL_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self.loops = loops
        self.method = method
        self.tool = tool
        self.limit = limit
        self.outcomes = Outcomes()
        self.calls: list[Call] = []
        self.tag = uuid.uuid4().hex[:12]
        self._stop = anyio.Event()

    async def _loop(self, n: int) -> None:
        deadline = time.monotonic() + self.limit
        async with httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(self.timeout)) as client:
            i = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                i += 1
                if self.method == "tools/call":
                    headers, body = modern_request("tools/call", self.tool,
                                                   {"name": self.tool, "arguments": {"query": "failover"}}, n * 10**6 + i)
                else:
                    headers, body = modern_request(self.method, None, {}, n * 10**6 + i)
                rid = headers["X-Request-ID"] = f"failover-{self.tag}-{n}-{i}"
                sent = time.monotonic()
                try:
                    response = await client.post(self.url, headers=headers, content=body)
                except httpx2.HTTPError as exc:
                    # A worker that died after it began to answer: nginx had passed the headers on.
                    kind = "cut off" if "complete message body" in str(exc) else type(exc).__name__
                    self.calls.append(Call(rid, sent, False, kind, done=time.monotonic()))
                    self.outcomes.fail(kind, repr(exc))
                    continue
                ok = response.status_code == 200 and '"result"' in response.text and '"isError":true' not in response.text
                self.calls.append(Call(rid, sent, ok, str(response.status_code), response.text[:500], time.monotonic()))
                if ok:
                    self.outcomes.ok += 1
                else:
                    self.outcomes.fail(str(response.status_code), response.text)

    def _tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [functools.partial(self._loop, n) for n in range(self.loops)]

    def succeeded(self, start: float, end: float) -> int:
        """Calls sent in [start, end) that were answered with a result."""
        return sum(1 for c in self.calls if c.ok and start <= c.sent < end)

    def failed_after(self, moment: float) -> list[Call]:
        return [c for c in self.calls if c.sent >= moment and not c.ok]


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[float]:
    """SIGSTOP `pid` (a worker of our appliance) for the block; SIGCONT whatever happens. Yields the moment."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def out_of_pool(appliance: Appliance, index: int, since: float) -> float:
    """Seconds from `since` until no pool slot leads to worker `index` (nginx connects to the slots)."""
    await eventually(lambda: index not in pool.members(appliance.run_dir), 10, f"worker {index} out of the pool",
                     interval=0.02)
    return time.monotonic() - since


def back_in_pool(appliance: Appliance, index: int) -> bool:
    return index in pool.members(appliance.run_dir) and probes(appliance)[index].get("ok") is True


def worker_records(appliance: Appliance, tag: str, index: int) -> set[str]:
    return {r["request_id"] for r in audit_records(appliance)
            if r["request_id"].startswith(f"failover-{tag}-") and r.get("worker") == index}


def metric(appliance: Appliance, sample: str) -> float:
    _, _, body = http("GET", appliance.url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.asynccontextmanager
async def sessions_on_both(appliance: Appliance) -> AsyncIterator[dict[int, RawSession]]:
    """Open legacy sessions (plain HTTP) until each worker owns one; closed after the block."""
    async with httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30)) as client:
        found: dict[int, RawSession] = {}
        for n in range(20):
            if n and n % 8 == 0:
                # nginx's pooled connections opened while a worker was out still lead to the other
                # until idle this long (see clients.sessions_on_two_workers).
                await anyio.sleep(pool.UPSTREAM_IDLE_TIMEOUT + 0.5)
            session = RawSession(client, appliance.mcp_url, n)
            await session.open()
            owner = parse_owner(session.sid)
            assert owner is not None, session.sid
            found.setdefault(owner[1], session)
            if len(found) == 2:
                break
        assert len(found) == 2, f"20 sessions all on worker(s) {sorted(found)}"
        yield found


async def single_worker_rate(appliance: Appliance) -> int:
    """Calls answered in WINDOW under the same load with worker 1 out of the pool and nginx's connections to it gone."""
    pool.assign(appliance.run_dir, [0])
    try:
        await anyio.sleep(pool.UPSTREAM_IDLE_TIMEOUT + 1)  # no load: nginx's idle connections to worker 1 close
        alone = CallLoad(appliance.mcp_url)
        async with alone.running():
            await alone.wait_for_calls(200)
            served_by_1 = probes(appliance)[1]["requests"]
            start = time.monotonic()
            await anyio.sleep(WINDOW)
            assert probes(appliance)[1]["requests"] == served_by_1, "the baseline was not one worker alone"
            return alone.succeeded(start, start + WINDOW)
    finally:
        pool.assign(appliance.run_dir, [0, 1])


@pytest.mark.anyio
async def test_frozen_worker_leaves_the_pool_within_2s_and_rejoins_without_restart_when_it_thaws(
    appliance: Appliance,
) -> None:
    load = CallLoad(appliance.mcp_url)
    cut_before = metric(appliance, 'mcp_appliance_worker_requests_cut_total{worker="1"}')
    with first_error():
        async with sessions_on_both(appliance) as sessions:
            # First what a healthy single worker answers under this load, as for a drain.
            before = await single_worker_rate(appliance)
            served_by_1 = probes(appliance)[1]["requests"]
            # Both workers again, and (no load) nginx's connections to worker 0 alone closed.
            await anyio.sleep(pool.UPSTREAM_IDLE_TIMEOUT + 1)
            async with load.running():
                await load.wait_for_calls(200)
                await eventually(lambda: probes(appliance)[1]["requests"] > served_by_1 + 50, 20,
                                 "worker 1 taking its share")
                pid = appliance.worker_pid(1)
                with frozen(pid) as froze:
                    took = await out_of_pool(appliance, 1, froze)
                    assert took <= OUT_OF_POOL, f"out of the pool after {took:.2f}s"
                    await sessions[0].call(1)  # a session on the healthy worker keeps working
                    await anyio.sleep(max(0.0, froze + FREE_AT + WINDOW - time.monotonic()))
                    during = load.succeeded(froze + FREE_AT, froze + FREE_AT + WINDOW)
                    status, doc = appliance.health()
                    assert doc["status"] == "degraded" and any(
                        "worker-01" in r and "out of nginx's pool" in r for r in doc["reasons"]), doc
                    assert pid == appliance.worker_pid(1)  # not restarted before workers.hang_timeout
                    thawed = time.monotonic()
                # It answers again: back in the pool, same process, its session intact.
                await eventually(lambda: back_in_pool(appliance, 1), 10, "worker 1 back in the pool")
                assert appliance.worker_pid(1) == pid
                await sessions[1].call(2)
            # nginx's connections opened while it was out lead to worker 0 until idle; then new work reaches it.
            await anyio.sleep(pool.UPSTREAM_IDLE_TIMEOUT + 1)
            serving = probes(appliance)[1]["requests"]
            await anyio.to_thread.run_sync(reads, appliance, 20)
            assert probes(appliance)[1]["requests"] > serving, "worker 1 gets no new work after it thawed"
            # The single worker's rate once more, after: this machine's load drifts (other jobs share it),
            # and a healthy single worker did at least the lower of the two.
            after = await single_worker_rate(appliance)
    # From FREE_AT on the clients see a healthy single worker: every one of them is answered all along
    # (no client waits on the frozen worker), at the single worker's rate. That rate is compared with
    # the lower of the windows before and after; on this shared 2-core machine two such windows of a
    # healthy worker alone differ by up to a third, hence the margin (the figures: bench/failover.py).
    start = froze + FREE_AT
    for k in range(int(WINDOW // 2)):
        answered = {c.request_id.rsplit("-", 2)[1] for c in load.calls
                    if c.ok and start + 2 * k <= c.sent < start + 2 * (k + 1)}
        assert len(answered) == load.loops, f"clients {answered} alone were answered in [{FREE_AT + 2 * k:g}s, +2s)"
    assert during >= 0.6 * min(before, after), (during, before, after, str(load.outcomes))

    # No call sent once it was out reached the frozen worker: each one it ever ran was sent before.
    sent = {c.request_id: c.sent for c in load.calls}
    ran_frozen = [rid for rid in worker_records(appliance, load.tag, 1) if froze <= sent.get(rid, 0) < thawed]
    late = [rid for rid in ran_frozen if sent[rid] > froze + OUT_OF_POOL + SLACK]
    assert not late, f"{len(late)} calls sent after it left the pool reached it: {late[:5]}"
    # Nothing else lost: every answered call has its audit record, and no call has two.
    records = [r["request_id"] for r in audit_records(appliance) if r["request_id"].startswith(f"failover-{load.tag}-")]
    assert len(records) == len(set(records)), "a call recorded twice"
    answered = {c.request_id for c in load.calls if c.ok}
    assert answered <= set(records), len(answered - set(records))
    # The only failures are calls the frozen worker held when it was taken out: the watchdog ended
    # them with the "worker stopped" JSON-RPC error (their clients did not wait for CALL_TIMEOUT).
    held = [c for c in load.calls if not c.ok]
    assert all(c.status == "502" and "may or may not have taken effect" in c.body
               and c.sent < froze + OUT_OF_POOL + SLACK for c in held), held[:5]
    assert all(c.done - froze < OUT_OF_POOL + SLACK for c in held), [round(c.done - froze, 2) for c in held]
    assert metric(appliance, 'mcp_appliance_worker_requests_cut_total{worker="1"}') >= cut_before + len(held)


@pytest.mark.anyio
async def test_worker_frozen_longer_than_hang_timeout_is_restarted_and_its_calls_end_with_an_error(
    appliance: Appliance,
) -> None:
    hangs_before = metric(appliance, 'mcp_appliance_worker_hang_restarts_total{worker="1"}')
    load = CallLoad(appliance.mcp_url)
    with first_error():
        async with sessions_on_both(appliance) as sessions, load.running():
            await load.wait_for_calls(200)
            pid = appliance.worker_pid(1)
            async with httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(60)) as client:
                with frozen(pid) as froze:
                    took = await out_of_pool(appliance, 1, froze)
                    assert took <= OUT_OF_POOL, f"out of the pool after {took:.2f}s"
                    # A session request sent to the frozen owner waits: not 404 before it is declared gone.
                    async with anyio.create_task_group() as tg:
                        answers: list[httpx2.Response] = []

                        async def session_call() -> None:
                            body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                                    "params": {"name": "search_notes", "arguments": {"query": "x"}}}
                            answers.append(await client.post(appliance.mcp_url, json=body,
                                                             headers=legacy_request_headers(sessions[1].sid)))

                        tg.start_soon(session_call)
                        await sessions[0].call(1)  # the healthy worker's session keeps working
                        new_pid = await eventually(lambda: (p := appliance.worker_pid(1)) not in (0, pid) and p,
                                                   HANG_TIMEOUT + 20, "worker 1 restarted with a new pid")
                    restarted = time.monotonic() - froze
                    assert restarted >= HANG_TIMEOUT, f"restarted after {restarted:.1f}s"
            # The call held by the frozen owner ended when it was restarted: its session is gone (404).
            assert answers[0].status_code == 404 and "Session not found" in answers[0].text, answers[0].text
            await eventually(lambda: back_in_pool(appliance, 1), 30, "the new worker 1 in the pool")
            assert appliance.worker_pid(1) == new_pid
            await sessions[0].call(2)
            rejoined = time.monotonic()
            await eventually(lambda: load.succeeded(rejoined, time.monotonic()) > 100, 30, "load flowing after")

    # Calls sent once it was out all succeeded; those it held ended with the "worker stopped" JSON-RPC error
    # at the restart, or the client had given up on them before.
    assert not load.failed_after(froze + OUT_OF_POOL + SLACK), load.failed_after(froze + OUT_OF_POOL + SLACK)[:5]
    for c in load.calls:
        if not c.ok:
            assert c.status == "ReadTimeout" or (c.status == "502" and "may or may not have taken effect" in c.body), c
    records = [r["request_id"] for r in audit_records(appliance) if r["request_id"].startswith(f"failover-{load.tag}-")]
    assert len(records) == len(set(records)), "a call recorded twice"
    assert {c.request_id for c in load.calls if c.ok} <= set(records)
    # Reported: metric, /health, the event log.
    assert metric(appliance, 'mcp_appliance_worker_hang_restarts_total{worker="1"}') == hangs_before + 1
    _, doc = appliance.health()
    assert any(f"pid {pid}) was restarted by the watchdog" in r for r in doc.get("reasons", [])), doc
    log = (Path(appliance.settings["log_dir"]) / "admin.log").read_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"watchdog_restart"' in line]
    assert any(e["pid"] == pid and e["target"] == "worker-01" for e in events), events


@pytest.mark.anyio
async def test_reads_sent_to_a_frozen_worker_are_answered_by_the_other(appliance: Appliance) -> None:
    load = CallLoad(appliance.mcp_url, loops=4, method="tools/list")
    pid = appliance.worker_pid(1)
    with first_error():
        async with load.running():
            await load.wait_for_calls(100)
            with frozen(pid) as froze:
                await out_of_pool(appliance, 1, froze)
                # Reads it held were retried elsewhere after workers.read_timeout.
                await anyio.sleep(READ_TIMEOUT + 1)
                await load.wait_for_calls(100)
            await eventually(lambda: back_in_pool(appliance, 1), 10, "worker 1 back in the pool")
            await load.wait_for_calls(50)
    assert load.outcomes.failed == 0, str(load.outcomes)
    assert appliance.worker_pid(1) == pid


@pytest.mark.anyio
async def test_reads_in_flight_on_a_worker_killed_by_the_kernel_are_retried(appliance: Appliance) -> None:
    load = CallLoad(appliance.mcp_url, loops=8, method="tools/list")
    with first_error():
        async with load.running():
            await load.wait_for_calls(200)
            for _ in range(3):
                old = appliance.worker_pid(1)
                os.kill(old, signal.SIGKILL)  # our appliance's worker
                await eventually(lambda: appliance.worker_pid(1) not in (0, old), 30, "worker 1 restarted")  # noqa: B023
                await eventually(lambda: back_in_pool(appliance, 1), 30, "worker 1 serving again")
                await load.wait_for_calls(200)
    # None failed with 502: each was sent to another worker. Left: a read whose worker died after it
    # had begun to answer (nginx had passed the headers on; nobody can resend half an answer).
    assert set(load.outcomes.failures) <= {"cut off"}, str(load.outcomes)
    assert load.outcomes.failed <= load.loops * 3, str(load.outcomes)


def blocking_call(appliance: Appliance, seconds: float) -> tuple[int, dict[str, Any]]:
    headers, body = modern_request("tools/call", "block_event_loop",
                                   {"name": "block_event_loop", "arguments": {"seconds": seconds}})
    status, _, raw = http("POST", appliance.mcp_url, body, headers, timeout=120)
    text = raw.decode()
    data = [line[5:] for line in text.splitlines() if line.startswith("data:")]
    return status, json.loads(data[-1] if data else text)


def reads(appliance: Appliance, count: int) -> None:
    """`count` tools/list requests one after the other, each answered."""
    for _ in range(count):
        headers, body = modern_request("tools/list", None, {})
        status, _, raw = http("POST", appliance.mcp_url, body, headers)
        assert status == 200, raw


def pool_without_one(appliance: Appliance) -> int:
    """The index of the worker the watchdog took out (none: -1)."""
    missing = {0, 1} - pool.members(appliance.run_dir)
    return missing.pop() if missing else -1


@pytest.mark.anyio
async def test_tool_blocking_the_event_loop_takes_its_worker_out_until_it_answers(appliance: Appliance) -> None:
    await eventually(lambda: pool.members(appliance.run_dir) == {0, 1}, 30, "both workers in the pool")
    pids = {k: appliance.worker_pid(k) for k in (0, 1)}
    async with anyio.create_task_group() as tg:
        result: list[tuple[int, dict[str, Any]]] = []
        ended: list[float] = []

        async def call() -> None:
            result.append(await anyio.to_thread.run_sync(blocking_call, appliance, 4.0))
            ended.append(time.monotonic())

        started = time.monotonic()
        tg.start_soon(call)
        blocked = await eventually(lambda: (k := pool_without_one(appliance)) >= 0 and k + 1, 10,
                                   "a worker out of the pool") - 1
        assert time.monotonic() - started <= OUT_OF_POOL + SLACK
        await anyio.to_thread.run_sync(reads, appliance, 10)  # the other worker serves meanwhile
    # The call that blocks its worker's loop is ended when the worker is taken out: its client
    # learns at once (a JSON-RPC error) instead of waiting on a worker that does not answer.
    status, doc = result[0]
    assert status == 502 and "may or may not have taken effect" in doc["error"]["message"], doc
    assert ended[0] - started < 4.0, "the client waited for the blocking tool to end"
    await eventually(lambda: back_in_pool(appliance, blocked), 10, "the blocked worker back in the pool")
    assert appliance.worker_pid(blocked) == pids[blocked]  # no restart


@pytest.mark.anyio
async def test_tool_blocking_the_event_loop_past_hang_timeout_gets_its_worker_restarted(appliance: Appliance) -> None:
    await eventually(lambda: back_in_pool(appliance, 0) and back_in_pool(appliance, 1), 30, "both workers serving")
    pids = {k: appliance.worker_pid(k) for k in (0, 1)}
    started = time.monotonic()
    status, doc = await anyio.to_thread.run_sync(blocking_call, appliance, HANG_TIMEOUT * 10)
    took = time.monotonic() - started
    # The call is ended when its worker is taken out (the JSON-RPC error for an interrupted call),
    # long before the worker itself is restarted for not answering for workers.hang_timeout.
    assert status == 502 and "may or may not have taken effect" in doc["error"]["message"], doc
    assert took < HANG_TIMEOUT, took
    blocked = await eventually(lambda: [k for k in (0, 1) if appliance.worker_pid(k) not in (0, pids[k])],
                               HANG_TIMEOUT + 30, "a worker restarted")
    assert time.monotonic() - started >= HANG_TIMEOUT
    assert len(blocked) == 1
    await eventually(lambda: back_in_pool(appliance, blocked[0]), 30, "the restarted worker back in the pool")
