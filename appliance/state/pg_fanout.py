"""The fan-out between hosts over the notes' shared PostgreSQL: LISTEN/NOTIFY on one channel.

Each worker LISTENs on its own connection and NOTIFYs from another; a payload carries the
sending node's tag, and a node drops its own (the local fan-out already carried them to its
workers). When the database goes away the listener reconnects with a short backoff; events
sent meanwhile are lost, as the SDK's bus promises nothing else (no replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from appliance.servers.notes_storage import CONNECT_TIMEOUT, read_database_url
from appliance.state.events import Deliver, Fanout

logger = logging.getLogger("appliance.state.events")

CHANNEL = "mcp_appliance_events"
#: Seconds between reconnection attempts of a listener whose database went away.
RECONNECT_DELAY = 0.5


class PgFanout:
    """Events between the nodes that share one PostgreSQL database."""

    def __init__(self, url_file: Path, node: str) -> None:
        self.url_file = url_file
        self.prefix = node.encode() + b" "
        self.sender: Any = None
        self.task: asyncio.Task[None] | None = None

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(read_database_url(self.url_file), autocommit=True,
                                                     connect_timeout=CONNECT_TIMEOUT,
                                                     application_name="mcp-appliance events")

    async def start(self, deliver: Deliver) -> None:
        self.task = asyncio.create_task(self._listen(deliver))

    async def _listen(self, deliver: Deliver) -> None:
        import psycopg

        while True:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    async for note in conn.notifies():
                        payload = note.payload.encode()
                        if not payload.startswith(self.prefix):
                            await deliver(payload.partition(b" ")[2])
                finally:
                    with contextlib.suppress(psycopg.Error, OSError):
                        await conn.close()
            except (psycopg.Error, OSError, ValueError) as exc:
                logger.warning("event listener lost the database, reconnecting: %s", str(exc).strip()[:200])
            await asyncio.sleep(RECONNECT_DELAY)

    async def send(self, payload: bytes) -> None:
        import psycopg

        try:
            if self.sender is None or self.sender.closed:
                self.sender = await self._connect()
            await self.sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, (self.prefix + payload).decode()))
        except (psycopg.Error, OSError, ValueError) as exc:  # the other hosts miss this one (no replay)
            logger.warning("event fan-out over the database failed: %s", str(exc).strip()[:200])
            if self.sender is not None:
                with contextlib.suppress(psycopg.Error, OSError):
                    await self.sender.close()
            self.sender = None

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.sender is not None:
            with contextlib.suppress(Exception):
                await self.sender.close()


class BothFanouts:
    """The host's own fan-out, then the one between hosts: one Fanout for HostBus."""

    def __init__(self, *fanouts: Fanout) -> None:
        self.fanouts = fanouts

    async def start(self, deliver: Deliver) -> None:
        for fanout in self.fanouts:
            await fanout.start(deliver)

    async def send(self, payload: bytes) -> None:
        for fanout in self.fanouts:
            await fanout.send(payload)

    async def close(self) -> None:
        for fanout in self.fanouts:
            await fanout.close()
