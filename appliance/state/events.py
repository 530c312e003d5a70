"""Events across workers: a `SubscriptionBus` whose publishes reach the listen streams of every worker.

`MCPServer` serves `subscriptions/listen` from an in-process bus: an event published in the
worker that handled a change never reached a stream held by another. `HostBus` keeps that
in-process bus for local delivery (the SDK's `ListenHandler` stays subscribed to it) and
adds a `Fanout` that carries each event to the other workers, which deliver it to theirs.
A fan-out is a small transport interface, so one over the hosts' shared database (e.g.
PostgreSQL LISTEN/NOTIFY) can join the local one later. Delivery is what the SDK promises:
fire-and-forget, no replay (events are level triggers: "refetch if you care").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    SubscriptionBus,
    ToolsListChanged,
)
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("appliance.state.events")

_KINDS: dict[str, type[Any]] = {
    "tools_list_changed": ToolsListChanged,
    "prompts_list_changed": PromptsListChanged,
    "resources_list_changed": ResourcesListChanged,
    "resource_updated": ResourceUpdated,
}
_NAMES = {cls: name for name, cls in _KINDS.items()}

Deliver = Callable[[bytes], Awaitable[None]]


def encode_event(event: ServerEvent) -> bytes:
    """One event as a single JSON line's bytes (no newline inside)."""
    doc: dict[str, Any] = {"kind": _NAMES[type(event)]}
    if isinstance(event, ResourceUpdated):
        doc["uri"] = event.uri
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_event(payload: bytes) -> ServerEvent | None:
    """The event in `payload`, or None for anything this version does not know (logged, dropped)."""
    try:
        doc = json.loads(payload)
        cls = _KINDS[doc["kind"]]
        return cls(uri=str(doc["uri"])) if cls is ResourceUpdated else cls()
    except (ValueError, KeyError, TypeError):
        logger.warning("dropped an event that is not one: %r", payload[:200])
        return None


class Fanout(Protocol):
    """Carries encoded events to the other processes of a bus (never back to the sender)."""

    async def start(self, deliver: Deliver) -> None:
        """Begin receiving: `deliver` gets each payload another process sent."""
        ...

    async def send(self, payload: bytes) -> None:
        """Send `payload` to every other process; never raises for a peer that is gone."""
        ...

    async def close(self) -> None:
        """Stop receiving and drop connections."""
        ...


class HostBus:
    """A `SubscriptionBus`: local delivery through `local`, then every other process through `fanout`."""

    def __init__(self, local: SubscriptionBus, fanout: Fanout) -> None:
        self.local = local
        self.fanout = fanout

    async def publish(self, event: ServerEvent) -> None:
        await self.local.publish(event)
        try:
            await self.fanout.send(encode_event(event))
        except OSError as exc:  # the local streams have it; the others miss it (no replay, as in the SDK)
            logger.warning("event fan-out failed: %s", exc)

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        return self.local.subscribe(listener)

    async def received(self, payload: bytes) -> None:
        """An event from another process: to this process's listeners only."""
        event = decode_event(payload)
        if event is not None:
            await self.local.publish(event)

    async def start(self) -> None:
        await self.fanout.start(self.received)

    async def close(self) -> None:
        await self.fanout.close()


def share_events(server: MCPServer, fanout: Fanout) -> HostBus | None:
    """Give `server` a HostBus over its in-process bus; None when the app brought a bus of its own."""
    # The SDK keeps the bus private (Context and ListenHandler read it); this is the one place
    # that swaps it. The ListenHandler stays subscribed to the in-process bus, which HostBus wraps.
    local = server._subscriptions  # noqa: SLF001
    if type(local) is not InMemorySubscriptionBus:
        return None
    bus = HostBus(local, fanout)
    server._subscriptions = bus  # noqa: SLF001
    return bus


class WithBus:
    """ASGI wrapper: the bus receives for as long as the app's lifespan runs (hypercorn's process)."""

    def __init__(self, app: ASGIApp, bus: HostBus) -> None:
        self.app = app
        self.bus = bus

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await self.bus.start()
        try:
            await self.app(scope, receive, send)
        finally:
            await self.bus.close()
