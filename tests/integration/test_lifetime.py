"""How an appliance ends: nothing outlives a killed supervisord, and open sessions do not hold a stop.

Each test starts its own appliance (they kill or stop it). Processes "of an appliance"
are found the way an operator would look for leftovers: every process on the host whose
command line, working directory or environment names the appliance's directory, or that
listens on one of its ports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import threading

import anyio
import httpx2
import psutil
import pytest

from appliance.lifetime import STOP_MARGIN
from tests.harness import Appliance, http, wait_until
from tests.integration.clients import mcp_client, modern_request
from tests.integration.stalling_app import MARKER

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

#: Legacy sessions left open (clients that never send DELETE), each with its GET stream.
OPEN_SESSIONS = 8


def ports(app: Appliance) -> set[int]:
    """Every TCP port the appliance listens on: nginx, the admin app, each worker."""
    workers = app.settings["workers"]
    return {app.port, int(app.settings["admin"]["port"]),
            *(int(workers["base_port"]) + k for k in range(int(workers["count"])))}


def appliance_processes(app: Appliance) -> dict[int, str]:
    """pid -> command line of every process that belongs to `app` (this test process excepted)."""
    base = str(app.base)
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, str] = {}
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports(app) and conn.pid:
                found[conn.pid] = ""
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "environ"]):
        info = proc.info
        cmdline = " ".join(info["cmdline"] or [])
        if (base in cmdline or (info["cwd"] or "").startswith(base)
                or any(base in value for value in (info["environ"] or {}).values()) or info["pid"] in found):
            found[info["pid"]] = cmdline
    return {pid: cmd for pid, cmd in found.items() if pid not in mine}


def kill_leftovers(pids: Callable[[], dict[int, str]], started: set[int]) -> None:
    """SIGKILL what is still alive of the processes this test started (by pid, checked again first)."""
    for pid in set(pids()) & started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_supervisord_and_wait_for_nothing_left(app: Appliance, bound: float) -> float:
    """kill -9 supervisord, as the OOM killer would; seconds until no process of `app` is left (at most `bound`)."""
    before = appliance_processes(app)
    assert app.proc is not None
    app.proc.kill()  # `run` exec'd supervisord: this is its pid
    app.proc.wait(10)
    killed = time.monotonic()
    try:
        wait_until(lambda: not appliance_processes(app), bound, "every process of the appliance gone", interval=0.1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: left running: {appliance_processes(app)}") from None
    finally:
        kill_leftovers(lambda: appliance_processes(app), set(before))
    return time.monotonic() - killed


def test_nothing_of_the_appliance_outlives_a_kill_9_of_supervisord_and_the_ports_serve_again(make_appliance) -> None:
    app = make_appliance(2)
    app.start().wait_healthy(timeout=60, workers=2)
    commands = list(appliance_processes(app).values())
    # The search finds every kind of process first, so an empty result after the kill means something.
    for kind in ("worker --index 0", "worker --index 1", " admin", " events", "nginx: master", "nginx: worker"):
        assert any(kind in c for c in commands), f"no {kind!r} process found among {commands}"
    took = kill_supervisord_and_wait_for_nothing_left(app, float(app.settings["workers"]["graceful_timeout"]) + 10)
    print(f"\nno process left {took:.1f}s after kill -9 of supervisord ({len(commands)} processes before)")
    # The same ports serve again: nothing left behind holds one.
    app.start().wait_healthy(timeout=60, workers=2)
    status, _, _ = http("GET", app.url + "/health")
    assert status == 200


@pytest.mark.anyio
async def test_a_stop_with_open_legacy_sessions_and_streams_ends_within_the_graceful_timeout(make_appliance) -> None:
    app = make_appliance(2)
    app.start().wait_healthy(timeout=60, workers=2)
    graceful = float(app.settings["workers"]["graceful_timeout"])
    assert app.proc is not None
    async with contextlib.AsyncExitStack() as stack:
        owners = set()
        for _ in range(OPEN_SESSIONS):
            client, wire = await stack.enter_async_context(mcp_client(app.mcp_url, "legacy"))
            with anyio.fail_after(30):
                await wire.get_stream_opened.wait()
            await client.list_tools()
            owners.add(wire.owner)
        assert owners == {0, 1}, f"all sessions on worker(s) {owners}: the stop would not meet both"
        started = time.monotonic()
        app.proc.send_signal(signal.SIGTERM)  # what systemd, docker stop and deploy.sh local stop send
        await anyio.to_thread.run_sync(app.proc.wait, graceful + 30)
        took = time.monotonic() - started
    print(f"\nstop with {OPEN_SESSIONS} open sessions and their GET streams took {took:.1f}s "
          f"(workers.graceful_timeout = {graceful:.0f}s)")
    log = (Path(app.settings["log_dir"]) / "supervisord.log").read_text()
    # Every program ended by itself: supervisord never had to escalate to SIGKILL.
    assert "SIGKILL" not in log, log[-3000:]
    assert took < graceful + 5, f"stop took {took:.1f}s with {OPEN_SESSIONS} idle sessions open"


@pytest.mark.anyio
async def test_open_listen_streams_do_not_hold_a_stop_until_the_graceful_timeout(make_appliance) -> None:
    """2026-07-28 `subscriptions/listen` streams stay open until the client goes: a stop ends them at once."""
    app = make_appliance(2)
    app.settings["workers"]["graceful_timeout"] = graceful = 20  # the default: what a held stop would cost
    app.start().wait_healthy(timeout=60, workers=2)
    assert app.proc is not None
    headers, body = modern_request("subscriptions/listen", None, {"notifications": {"toolsListChanged": True}})
    acknowledged: list[int] = []

    async def listen(client: httpx2.AsyncClient, n: int) -> None:
        with contextlib.suppress(httpx2.HTTPError):  # the stream ends when the appliance stops
            async with client.stream("POST", app.mcp_url, content=body, headers=headers) as response:
                async for line in response.aiter_lines():
                    if "notifications/subscriptions/acknowledged" in line:
                        acknowledged.append(n)

    async with httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30, read=None)) as client:
        async with anyio.create_task_group() as streams:
            for n in range(OPEN_SESSIONS):
                streams.start_soon(listen, client, n)
            with anyio.fail_after(30):
                while len(acknowledged) < OPEN_SESSIONS:
                    await anyio.sleep(0.05)
            started = time.monotonic()
            app.proc.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(app.proc.wait, graceful + 30)
            took = time.monotonic() - started
            streams.cancel_scope.cancel()
    print(f"\nstop with {OPEN_SESSIONS} open listen streams took {took:.1f}s (workers.graceful_timeout = {graceful}s)")
    assert took < graceful, f"{OPEN_SESSIONS} open listen streams held the stop for {took:.1f}s"


def test_a_worker_stuck_in_a_blocking_call_still_ends_after_supervisord_is_killed(make_appliance) -> None:
    """SIGTERM cannot reach a blocked event loop; the worker still ends graceful_timeout + STOP_MARGIN later."""
    app = make_appliance(1, env={"PYTHONPATH": str(REPO)}, mcp={"app": "tests.integration.stalling_app:server"})
    app.start().wait_healthy(timeout=60, workers=1)
    headers, body = modern_request("tools/call", "stall", {"name": "stall", "arguments": {"seconds": 300}})

    def call() -> None:  # never answered (its worker is blocked, then gone): a thread left to fail
        with contextlib.suppress(OSError):
            http("POST", app.mcp_url, body, headers, timeout=30)

    threading.Thread(target=call, daemon=True).start()
    marker = Path(app.settings["data_dir"]) / MARKER
    wait_until(marker.exists, 30, "the stalling call started")
    graceful = float(app.settings["workers"]["graceful_timeout"])
    took = kill_supervisord_and_wait_for_nothing_left(app, graceful + STOP_MARGIN + 10)
    print(f"\nno process left {took:.1f}s after kill -9 of supervisord with a worker blocked")


@pytest.mark.anyio
async def test_a_reload_with_open_legacy_sessions_and_streams_never_waits_out_a_drain(make_appliance) -> None:
    """Idle sessions and their GET streams let each worker go at once: no drain runs into its timeout."""
    app = make_appliance(2)
    app.start().wait_healthy(timeout=60, workers=2)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(OPEN_SESSIONS):
            client, wire = await stack.enter_async_context(mcp_client(app.mcp_url, "legacy"))
            with anyio.fail_after(30):
                await wire.get_stream_opened.wait()
            await client.list_tools()
        started = time.monotonic()
        result = await anyio.to_thread.run_sync(lambda: app.command("reload", timeout=120))
        took = time.monotonic() - started
    print(f"\nreload of 2 workers with {OPEN_SESSIONS} open sessions took {took:.1f}s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restarted and back in nginx's pool" in result.stdout
    assert "still busy after the drain timeout" not in result.stdout, result.stdout
