"""2,000 legacy sessions held open on one host: each with its GET stream, each calling now and then.

Sessions are driven with plain HTTP (httpx2) as the spec describes them, because 2,000 SDK
clients in one test process would measure the test, not the appliance. The memory each
session costs the workers is printed (run with -s) and recorded as a test property.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import httpx2
import psutil
import pytest

from tests.harness import Appliance
from tests.integration.load import RawSession

pytestmark = pytest.mark.integration

SESSIONS = 2000
CALLS_EACH = 2  # per session while all are open
OPENING = 100  # sessions being opened at the same time


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def workers_rss(appliance: Appliance) -> int:
    pids = [p.pid for p in appliance.supervisor.processes() if p.name.startswith("worker-")]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


@pytest.mark.anyio
async def test_two_thousand_idle_sessions_stay_open_and_keep_working(
    make_appliance: Callable[..., Appliance], record_property: Callable[[str, object], None],
) -> None:
    appliance = make_appliance(workers=2).start()
    await anyio.to_thread.run_sync(lambda: appliance.wait_healthy(timeout=60, workers=2))
    rss_before = await anyio.to_thread.run_sync(workers_rss, appliance)

    limits = httpx2.Limits(max_connections=SESSIONS + 200, max_keepalive_connections=200)
    timeout = httpx2.Timeout(60, read=None)
    async with httpx2.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        sessions = [RawSession(client, appliance.mcp_url, n) for n in range(SESSIONS)]
        done = anyio.Event()
        opening = anyio.Semaphore(OPENING)
        async with anyio.create_task_group() as streams:

            async def open_one(session: RawSession) -> None:
                async with opening:
                    await session.open()
                    streams.start_soon(session.hold_stream, done)
                    await session.stream_open.wait()

            with anyio.fail_after(300):
                async with anyio.create_task_group() as tg:
                    for session in sessions:
                        tg.start_soon(open_one, session)
            assert [s.n for s in sessions if s.stream_error] == [], {s.stream_error for s in sessions}

            # All open and idle; each calls now and then (spread out, like agents thinking).
            async def calls(session: RawSession) -> None:
                for i in range(CALLS_EACH):
                    await anyio.sleep(random.uniform(0, 10))
                    await session.call(i)

            with anyio.fail_after(300):
                async with anyio.create_task_group() as tg:
                    for session in sessions:
                        tg.start_soon(calls, session)
            rss_open = await anyio.to_thread.run_sync(workers_rss, appliance)
            _, health = await anyio.to_thread.run_sync(appliance.health)
            open_now = sum(p["sessions_open"] for p in health["probes"])
            done.set()
        assert [s.n for s in sessions if s.stream_error] == [], {s.stream_error for s in sessions}

        async def close_one(session: RawSession) -> None:
            async with opening:
                await session.close()

        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for session in sessions:
                    tg.start_soon(close_one, session)

    assert open_now >= SESSIONS, health["probes"]
    per_session = (rss_open - rss_before) / SESSIONS
    record_property("worker_rss_per_session_kib", round(per_session / 1024, 1))
    print(f"\n{SESSIONS} sessions open: workers' RSS {rss_before / 2**20:.1f} -> {rss_open / 2**20:.1f} MiB, "
          f"{per_session / 1024:.1f} KiB per session ({per_session * 1000 / 2**20:.1f} MiB per 1,000)")
    _, health = await anyio.to_thread.run_sync(appliance.health)
    assert health["status"] == "ok" and sum(p["sessions_open"] for p in health["probes"]) == 0, health
