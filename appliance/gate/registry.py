"""The one record of which legacy sessions are open on this worker, and who opened them.

The binding layer (gate/binding.py) adds a session when the hosted app issues its id and
forgets it on DELETE, on the app's 404 (it closed the session itself) and after the idle
timeout; the health probe and the open-sessions gauge read their figures from here, so
they come down with every way a session ends. Caps are checked before a new session is
made: `max_sessions` per worker, `max_per_key` per principal (or client address), each across
every server the worker hosts; and a server's own caps ([servers.<name>] max_sessions and
max_sessions_per_principal, `ServerCaps`) over its sessions alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The longest pause between two sweeps for idle sessions, in seconds.
SWEEP_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class ServerCaps:
    """One hosted server's own session caps per worker (None: none of its own, the worker's hold)."""

    server: str
    max_sessions: int | None = None
    max_per_key: int | None = None
    #: Where its caps are set ("servers.<name>"), for the refusals' messages.
    table: str = "mcp"


#: A server without caps of its own.
NO_CAPS = ServerCaps("")


class Entry:
    """One open session: who opened it, the limit key it counts against, when it was last used."""

    __slots__ = ("identity", "key", "server", "last_used", "active")

    def __init__(self, identity: tuple[str, str], key: bytes, server: str = "") -> None:
        self.identity = identity
        self.key = key
        #: The hosted server the session is with.
        self.server = server
        self.last_used = time.monotonic()
        self.active = 0


class SessionRegistry:
    """Sessions open on this worker; mutated only on the event loop."""

    def __init__(self, idle_timeout: float = 1800, max_sessions: int = 10000, max_per_key: int = 10000,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.max_per_key = max_per_key
        self.on_change = on_change or (lambda count: None)
        self.entries: dict[bytes, Entry] = {}
        #: Open sessions plus initializes in flight, per limit key.
        self.per_key: dict[bytes, int] = {}
        #: The same per server, and per (server, limit key): what a server's own caps count.
        self.per_server: dict[str, int] = {}
        self.per_server_key: dict[tuple[str, bytes], int] = {}
        self.pending = 0
        #: Sessions opened since the worker started.
        self.opened = 0
        self.interval = min(SWEEP_EVERY, max(idle_timeout / 4, 0.2))
        self.timer: asyncio.TimerHandle | None = None
        self.capped_sweep = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, sid: bytes) -> Entry | None:
        return self.entries.get(sid)

    def reserve(self, key: bytes, capped: bool = True, caps: ServerCaps = NO_CAPS) -> str | None:
        """Hold a place for a session `key` is about to open with server `caps.server`: None, or
        which cap refuses it (sessions, principal_sessions, server_sessions, server_principal_sessions).

        `capped` False (an exempt client): only the worker's own cap and the server's own
        max_sessions apply, none per principal.
        """
        server = caps.server
        if self._full(lambda: len(self.entries) + self.pending >= self.max_sessions):
            return "sessions"
        if caps.max_sessions is not None and self._full(lambda: self.per_server.get(server, 0) >= caps.max_sessions):
            return "server_sessions"
        if capped and self._full(lambda: self.per_key.get(key, 0) >= self.max_per_key):
            return "principal_sessions"
        if (capped and caps.max_per_key is not None
                and self._full(lambda: self.per_server_key.get((server, key), 0) >= caps.max_per_key)):
            return "server_principal_sessions"
        self.pending += 1
        self._count(key, server)
        return None

    def _full(self, at_cap: Callable[[], bool]) -> bool:
        """Whether a cap is reached, after forgetting idle sessions when it seems to be."""
        if not at_cap():
            return False
        self._sweep_at_cap()
        return at_cap()

    def release(self, key: bytes, server: str = "") -> None:
        """Give back a place held by `reserve` (the session was recorded by `add`, or never made)."""
        self.pending -= 1
        self._uncount(key, server)

    def add(self, sid: bytes, identity: tuple[str, str], key: bytes, server: str = "") -> None:
        """The hosted app `server` issued session `sid` to `identity`."""
        if sid in self.entries:
            return
        self.entries[sid] = Entry(identity, key, server)
        self._count(key, server)
        self.opened += 1
        self.on_change(len(self.entries))
        if self.timer is None:
            self._schedule()

    def open_with(self, server: str) -> int:
        """Sessions open (or opening) with one hosted server."""
        return self.per_server.get(server, 0)

    def forget(self, sid: bytes) -> None:
        """Session `sid` ended (DELETE, or the app no longer knows it)."""
        entry = self.entries.pop(sid, None)
        if entry is not None:
            self._uncount(entry.key, entry.server)
            self.on_change(len(self.entries))

    def sweep(self, now: float | None = None) -> None:
        """Forget sessions idle past the timeout (the hosted app has expired them too)."""
        now = time.monotonic() if now is None else now
        expired = [sid for sid, e in self.entries.items() if e.active == 0 and now - e.last_used > self.idle_timeout]
        for sid in expired:
            entry = self.entries.pop(sid)
            self._uncount(entry.key, entry.server)
        if expired:
            self.on_change(len(self.entries))

    def _sweep_at_cap(self) -> None:
        # At most once a second: a caller retrying at its cap must not make every attempt walk the table.
        now = time.monotonic()
        if now - self.capped_sweep >= 1.0:
            self.capped_sweep = now
            self.sweep(now)

    def _count(self, key: bytes, server: str) -> None:
        self.per_key[key] = self.per_key.get(key, 0) + 1
        self.per_server[server] = self.per_server.get(server, 0) + 1
        self.per_server_key[server, key] = self.per_server_key.get((server, key), 0) + 1

    def _uncount(self, key: bytes, server: str) -> None:
        _decrement(self.per_key, key)
        _decrement(self.per_server, server)
        _decrement(self.per_server_key, (server, key))

    def _schedule(self) -> None:
        # Swept on a timer, not on the next request: the gauge and /health must come down on an idle worker.
        try:
            self.timer = asyncio.get_running_loop().call_later(self.interval, self._tick)
        except RuntimeError:  # no loop (unit use): swept by reserve() at the caps only
            self.timer = None

    def _tick(self) -> None:
        self.timer = None
        self.sweep()
        if self.entries:
            self._schedule()


def _decrement(counts: dict[Any, int], key: Any) -> None:
    """One less of `key`; a count that reaches zero is removed (the tables hold only what is open)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
