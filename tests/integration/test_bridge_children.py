"""Children of the stdio bridge: isolated per session, bounded, restarted, and never left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import mcp_types as types
import httpx2
import psutil
import pytest

from tests import third_party
from tests.harness import http, wait_until
from tests.integration.bridgekit import Host, alive, commands, guards, hosted
from tests.integration.clients import LEGACY_VERSION, MODERN_VERSION, eventually, mcp_client

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

TINY = str(Path(__file__).with_name("tiny_stdio_server.mjs"))
LEGACY_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
                  "MCP-Protocol-Version": LEGACY_VERSION}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                         "clientInfo": {"name": "bridge-tests", "version": "1"}}}


@pytest.fixture(scope="module")
def everything_per_session() -> Iterator[Host]:
    """server-everything (state per process: e.g. its simulated logging), one child per legacy session."""
    with hosted(command=list(third_party.everything()), isolation="session", max_children=4) as host:
        yield host


async def test_session_isolation_keeps_two_sessions_state_apart(everything_per_session: Host) -> None:
    url = everything_per_session.url
    logs: list[object] = []

    async def on_log(params: object) -> None:
        logs.append(params)

    async with mcp_client(url, "legacy", logging_callback=on_log) as (alice, _), \
            mcp_client(url, "legacy") as (bob, _):
        await alice.set_logging_level("debug")
        # The toggle flips one flag per server process: a shared child would answer "Stopped" to bob.
        first = await alice.call_tool("toggle-simulated-logging", {})
        second = await bob.call_tool("toggle-simulated-logging", {})
        assert first.content[0].text.startswith("Started"), first
        assert second.content[0].text.startswith("Started"), "bob's child saw alice's state"
        again = await alice.call_tool("toggle-simulated-logging", {})
        assert again.content[0].text.startswith("Stopped")
        await alice.call_tool("toggle-simulated-logging", {})
        assert len(commands(everything_per_session.proc.pid)) >= 2, "each session runs a child of its own"
        # The child's log messages reach its session (it sends one every 5 s).
        await eventually(lambda: logs, 15, "a log message from alice's child", interval=0.02)


@pytest.fixture(scope="module")
def tiny() -> Iterator[Host]:
    """The tiny server (its `ping` answers with its pid), one child per legacy session."""
    with hosted(command=["node", TINY], isolation="session", max_children=3) as host:
        yield host


async def child_pid(client: object) -> int:
    """The pid of the child serving `client` (the tiny server's `ping` names it)."""
    result = await client.call_tool("ping", {})  # type: ignore[attr-defined]
    assert not result.is_error, result
    return int(result.content[0].text.split()[1])


async def test_killed_session_child_ends_only_its_session_and_a_new_one_is_back_within_2s(tiny: Host) -> None:
    failures: list[BaseException] = []
    modern_calls = 0

    async def modern_load(stop: anyio.Event) -> None:
        """2026-07-28 calls on the pool's child all along."""
        nonlocal modern_calls
        async with mcp_client(tiny.url, MODERN_VERSION) as (client, _):
            while not stop.is_set():
                try:
                    await client.call_tool("ping", {})
                    modern_calls += 1
                except Exception as exc:  # counted: the kill must not reach these calls
                    failures.append(exc)

    async with mcp_client(tiny.url, "legacy") as (victim, victim_wire), \
            mcp_client(tiny.url, "legacy") as (bystander, _):
        victim_pid, bystander_pid = await child_pid(victim), await child_pid(bystander)
        assert victim_pid != bystander_pid
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(modern_load, stop)
            await eventually(lambda: modern_calls > 0, 10, "2026-07-28 calls under way", interval=0.02)
            os.kill(victim_pid, signal.SIGKILL)
            killed_at = time.monotonic()

            def victim_gets_404() -> bool:
                status, _, _ = http("POST", tiny.url, {"jsonrpc": "2.0", "id": 9, "method": "tools/list"},
                                    {**LEGACY_HEADERS, "Mcp-Session-Id": victim_wire.session_id or ""})
                assert status in (200, 404), status  # never a 5xx
                return status == 404
            await anyio.to_thread.run_sync(lambda: wait_until(victim_gets_404, 5, "the killed child's session gets 404"))
            # Re-initializing gets a new child at once.
            async with mcp_client(tiny.url, "legacy") as (again, _):
                new_pid = await child_pid(again)
            back_after = time.monotonic() - killed_at
            assert new_pid != victim_pid and not alive(victim_pid)
            assert await child_pid(bystander) == bystander_pid, "the other session kept its child"
            stop.set()
    assert not failures, failures
    assert back_after < 2.0, f"a new session had its child {back_after:.2f}s after the kill"


async def test_sessions_beyond_max_children_get_503_with_a_jsonrpc_error(tiny: Host) -> None:
    # max_children = 3: the pool's child (earlier test) may hold one; fill the rest with sessions.
    async with httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        opened: list[str] = []
        refused = None
        try:
            for _ in range(4):
                response = await client.post(tiny.url, json=INITIALIZE, headers=LEGACY_HEADERS)
                if response.status_code == 503:
                    refused = response
                    break
                assert response.status_code == 200, response.text
                opened.append(response.headers["mcp-session-id"])
            assert refused is not None, f"{len(opened)} sessions opened with max_children = 3"
            assert refused.headers["content-type"] == "application/json"
            body = refused.json()
            assert body["jsonrpc"] == "2.0" and body["id"] is None
            assert body["error"]["data"]["reason"] == "max_children"
            assert "maximum of 3 children" in body["error"]["message"]
            assert len(commands(tiny.proc.pid)) == 3
        finally:
            for sid in opened:
                await client.delete(tiny.url, headers={**LEGACY_HEADERS, "Mcp-Session-Id": sid})
        # Room again once sessions end: their children end with them.
        # (a child counts until it has exited, guard and all: bridge_status() counts what the bound counts)
        await eventually(lambda: tiny.status()["test"]["children"] <= 1, 10, "the closed sessions' children ended",
                         interval=0.02)
        response = await client.post(tiny.url, json=INITIALIZE, headers=LEGACY_HEADERS)
        assert response.status_code == 200
        await client.delete(tiny.url, headers={**LEGACY_HEADERS, "Mcp-Session-Id": response.headers["mcp-session-id"]})


async def test_killed_shared_child_is_restarted_within_2s_and_its_sessions_get_404() -> None:
    with hosted(command=["node", TINY], isolation="shared") as host:
        async with mcp_client(host.url, "legacy") as (client, wire):
            first = await child_pid(client)
            assert host.status()["test"] == {"isolation": "shared", "children": 1, "max_children": 16, "up": True,
                                             "restarts": 0, "crash_looping": False, "pids": [first]}
            os.kill(first, signal.SIGKILL)
            killed_at = time.monotonic()

            def restarted() -> int | None:
                pids = [p.pid for p in commands(host.proc.pid) if p.pid != first]
                return pids[0] if pids else None
            second = await anyio.to_thread.run_sync(lambda: wait_until(restarted, 2.0, "the shared child restarted"))
            assert time.monotonic() - killed_at < 2.0
            status, _, _ = http("POST", host.url, {"jsonrpc": "2.0", "id": 9, "method": "tools/list"},
                                {**LEGACY_HEADERS, "Mcp-Session-Id": wire.session_id or ""})
            assert status == 404, "a session of the dead child must re-initialize"
        async with mcp_client(host.url, MODERN_VERSION) as (modern, _):
            assert await child_pid(modern) == second
        status = host.status()["test"]
        assert status["restarts"] == 1 and status["pids"] == [second] and status["up"]


async def test_a_crash_looping_shared_server_is_given_up_and_says_so_in_its_status() -> None:
    with hosted(command=["sh", "-c", "exit 3"], isolation="shared", wait_for_child=False) as host:
        status = await anyio.to_thread.run_sync(lambda: wait_until(
            lambda: host.status()["test"]["crash_looping"] and host.status()["test"], 30, "the crash loop"))
        assert status["restarts"] == 5 and status["children"] == 0 and not status["up"]
        assert not guards(host.proc.pid), "given up: nothing is starting"


async def test_thousand_session_cycles_leave_no_process_and_flat_rss() -> None:
    marker = f"cycles-{os.getpid()}"
    # Children of closed sessions count until they have exited: room for them beside 8 concurrent sessions.
    with hosted(command=["node", TINY, marker], isolation="session", max_children=24, json_response=True) as host:
        host_process = psutil.Process(host.proc.pid)

        async def cycle(client: httpx2.AsyncClient) -> None:
            response = await client.post(host.url, json=INITIALIZE, headers=LEGACY_HEADERS)
            assert response.status_code == 200, response.text
            headers = {**LEGACY_HEADERS, "Mcp-Session-Id": response.headers["mcp-session-id"]}
            await client.post(host.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
            called = await client.post(host.url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                                       "params": {"name": "ping", "arguments": {}}}, headers=headers)
            assert "pong" in called.text, called.text
            assert (await client.delete(host.url, headers=headers)).status_code == 200

        async def cycles(count: int, client: httpx2.AsyncClient) -> None:
            for _ in range(count // 8):
                async with anyio.create_task_group() as tg:
                    for _ in range(8):
                        tg.start_soon(cycle, client)

        with anyio.fail_after(400):  # a bound, not a speed test: ~150 s on a busy 2-core host
            async with httpx2.AsyncClient(trust_env=False, timeout=30) as client:
                await cycles(104, client)  # warm-up: imports, caches, the allocator's arenas
                await eventually(lambda: not guards(host.proc.pid), 15, "warm-up children ended", interval=0.02)
                rss_before = host_process.memory_info().rss
                await cycles(1000, client)
        await eventually(lambda: not guards(host.proc.pid), 15, "every session's child ended", interval=0.02)
        rss_after = host_process.memory_info().rss

        def leftovers() -> list[int]:
            return [p.pid for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]

        # A guard the SDK had to kill leaves its command to end on its stdin's EOF: ended, within a deadline.
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: not leftovers(), 10, "every process of the sessions ended", interval=0.05)
        left = leftovers()
        assert left == [], f"processes left behind: {left}"
        growth = (rss_after - rss_before) / 2**20
        assert growth < 8, f"bridge RSS grew {growth:.1f} MiB over 1,000 sessions ({rss_before >> 20} MiB before)"


async def test_an_idle_session_child_ends_with_the_session_idle_timeout() -> None:
    with hosted(command=["node", TINY], isolation="session", idle_timeout=1.0, json_response=True) as host:
        async with httpx2.AsyncClient(trust_env=False, timeout=30) as client:
            response = await client.post(host.url, json=INITIALIZE, headers=LEGACY_HEADERS)
            headers = {**LEGACY_HEADERS, "Mcp-Session-Id": response.headers["mcp-session-id"]}
            await client.post(host.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
            called = await client.post(host.url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                                       "params": {"name": "ping", "arguments": {}}}, headers=headers)
            pid = int(called.json()["result"]["content"][0]["text"].split()[1])
            await eventually(lambda: not alive(pid), 10, "the idle session's child ended", interval=0.02)
            gone = await client.post(host.url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
                                     headers=headers)
            assert gone.status_code == 404
            await eventually(lambda: not guards(host.proc.pid), 5, "its guard ended too", interval=0.02)


async def test_a_cancelled_call_is_cancelled_at_the_child(tiny: Host) -> None:
    async with mcp_client(tiny.url, "legacy") as (client, _):
        with anyio.move_on_after(1.0):
            await client.call_tool("hang", {})
        await eventually(lambda: "tiny: cancelled request" in tiny.log, 10, "the child got notifications/cancelled",
                         interval=0.02)
        assert not (await client.call_tool("ping", {})).is_error, "the session goes on after the cancellation"


async def test_a_list_change_of_the_child_reaches_its_legacy_session(tiny: Host) -> None:
    changes: list[object] = []

    async def on_message(message: object) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changes.append(message)

    async with mcp_client(tiny.url, "legacy", message_handler=on_message) as (client, wire):
        with anyio.fail_after(30):
            await wire.get_stream_opened.wait()
        await client.call_tool("change", {})
        await eventually(lambda: changes, 10, "notifications/tools/list_changed from the child", interval=0.02)


async def test_a_list_change_of_the_child_reaches_a_2026_listener() -> None:
    with hosted(command=["node", TINY], isolation="shared") as host:
        async with mcp_client(host.url, MODERN_VERSION) as (listener, _), \
                mcp_client(host.url, MODERN_VERSION) as (caller, _):
            async with listener.listen(tools_list_changed=True) as subscription:
                await caller.call_tool("change", {})
                with anyio.fail_after(10):
                    async for event in subscription:
                        assert type(event).__name__ == "ToolsListChanged"
                        break


async def test_a_session_child_asks_its_own_client_for_its_roots(everything_per_session: Host) -> None:
    asked: list[str] = []

    async def list_roots(context: object) -> types.ListRootsResult:
        asked.append("mine")
        return types.ListRootsResult(roots=[types.Root(uri="file:///srv/mine", name="mine")])

    async with mcp_client(everything_per_session.url, "legacy", list_roots_callback=list_roots) as (client, _):
        result = await client.call_tool("get-roots-list", {})
    assert asked, "the session's own child did not ask its client for roots"
    assert "file:///srv/mine" in " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
