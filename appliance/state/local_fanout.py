"""The one-host fan-out: a unix stream socket per worker under <run_dir>/events/, JSON lines.

Stream sockets rather than datagrams: a unix datagram queue holds only
net.unix.max_dgram_qlen (often 10) messages, so a burst of events would be dropped.
Every worker listens on `worker-NN.sock`; a publisher sends each line to every other
socket in the directory over a connection it keeps, so `scale` needs no configuration:
a new worker's socket is found at the next event, a stopped worker's is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from appliance.state.events import Deliver

logger = logging.getLogger("appliance.state.events")

#: Bytes queued towards one peer that does not read before its events are dropped.
MAX_BACKLOG = 1024 * 1024


def events_dir(run_dir: Path) -> Path:
    """Where the workers' event sockets live."""
    return run_dir / "events"


class LocalFanout:
    """Events between the workers of one host."""

    def __init__(self, directory: Path, index: int) -> None:
        self.directory = directory
        self.path = directory / f"worker-{index:02d}.sock"
        self.server: asyncio.AbstractServer | None = None
        self.peers: dict[Path, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.dropped = 0

    async def start(self, deliver: Deliver) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by this worker's previous process

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while line := await reader.readline():
                    await deliver(line.rstrip(b"\n"))
            except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
                logger.warning("event connection from a peer ended: %s", exc)
            finally:
                writer.close()

        self.server = await asyncio.start_unix_server(serve, self.path)

    async def send(self, payload: bytes) -> None:
        line = payload + b"\n"
        for peer in sorted(self.directory.glob("worker-*.sock")):
            if peer == self.path:
                continue
            writer = await self._connection(peer)
            if writer is None:
                continue
            if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
                self.dropped += 1  # a peer that stopped reading must not grow our memory
                continue
            writer.write(line)

    async def _connection(self, peer: Path) -> asyncio.StreamWriter | None:
        """An open connection to `peer`, reopened when its worker was restarted; None when it is gone."""
        held = self.peers.get(peer)
        if held is not None:
            reader, writer = held
            if not (writer.is_closing() or reader.at_eof()):
                return writer
            writer.close()
            del self.peers[peer]
        try:
            self.peers[peer] = await asyncio.open_unix_connection(peer)
        except OSError:  # a stopped worker's socket (refused) or one just removed
            return None
        return self.peers[peer][1]

    async def close(self) -> None:
        for _, writer in self.peers.values():
            writer.close()
        self.peers.clear()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
