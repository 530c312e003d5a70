"""Events across workers: the encoding, the host bus and the unix-socket fan-out between processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
)

from appliance.state.events import HostBus, decode_event, encode_event, share_events
from appliance.state.local_fanout import LocalFanout

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("event", [ToolsListChanged(), PromptsListChanged(), ResourcesListChanged(),
                                   ResourceUpdated(uri="notes://7")])
def test_every_event_kind_survives_the_wire(event: object) -> None:
    assert decode_event(encode_event(event)) == event  # type: ignore[arg-type]


@pytest.mark.parametrize("payload", [b"", b"{", b'{"kind":"nope"}', b'{"kind":"resource_updated"}', b"[]"])
def test_a_payload_that_is_no_event_is_dropped(payload: bytes) -> None:
    assert decode_event(payload) is None


def test_an_app_with_its_own_bus_keeps_it() -> None:
    class OwnBus(InMemorySubscriptionBus):
        pass

    own = OwnBus()
    server = MCPServer("own", subscriptions=own)
    assert share_events(server, LocalFanout(Path("/nonexistent"), 0)) is None
    assert server._subscriptions is own


async def until(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


async def test_an_event_published_in_one_process_reaches_the_listeners_of_the_others(tmp_path: Path) -> None:
    buses = [HostBus(InMemorySubscriptionBus(), LocalFanout(tmp_path, k)) for k in range(3)]
    heard: list[list[object]] = [[], [], []]
    for bus, sink in zip(buses, heard):
        bus.subscribe(sink.append)
        await bus.start()
    try:
        await buses[2].publish(ResourceUpdated(uri="notes://1"))
        await until(lambda: all(heard))
        assert heard == [[ResourceUpdated(uri="notes://1")]] * 3  # once each, the publisher's own included

        # Worker 0 restarts: the others reconnect to its new socket at their next event.
        await buses[0].close()
        buses[0] = HostBus(InMemorySubscriptionBus(), LocalFanout(tmp_path, 0))
        heard[0] = []
        buses[0].subscribe(heard[0].append)
        await buses[0].start()
        for n in range(50):  # a burst, more than a unix datagram queue holds (max_dgram_qlen, often 10)
            await buses[1].publish(ResourceUpdated(uri=f"notes://{n + 10}"))
        await until(lambda: len(heard[0]) == 50)
        assert heard[0] == [ResourceUpdated(uri=f"notes://{n + 10}") for n in range(50)]
    finally:
        for bus in buses:
            await bus.close()


async def test_a_stopped_workers_socket_is_skipped(tmp_path: Path) -> None:
    stale = LocalFanout(tmp_path, 5)
    await stale.start(lambda payload: asyncio.sleep(0))
    stale.server.close()  # type: ignore[union-attr]
    await stale.server.wait_closed()  # type: ignore[union-attr]
    sender = LocalFanout(tmp_path, 1)
    await sender.send(encode_event(ToolsListChanged()))  # does not raise
    await sender.close()
