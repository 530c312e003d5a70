"""The one record of which legacy sessions are open on this worker, and who opened them.

The binding layer (gate/binding.py) adds a session when the hosted app issues its id and
forgets it on DELETE, on the app's 404 (it closed the session itself) and after the idle
timeout; the health probe and the open-sessions gauge read their figures from here, so
they come down with every way a session ends. Caps are checked before a new session is
made: `max_sessions` per worker, `max_per_key` per principal (or client address).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: The longest pause between two sweeps for idle sessions, in seconds.
SWEEP_EVERY = 60.0


class Entry:
    """One open session: who opened it, the limit key it counts against, when it was last used."""

    __slots__ = ("identity", "key", "last_used", "active")

    def __init__(self, identity: tuple[str, str], key: bytes) -> None:
        self.identity = identity
        self.key = key
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

    def reserve(self, key: bytes, capped: bool = True) -> str | None:
        """Hold a place for a session `key` is about to open: None, or which cap refuses it.

        `capped` False (an exempt client): only the worker's own cap applies.
        """
        if len(self.entries) + self.pending >= self.max_sessions:
            self._sweep_at_cap()
            if len(self.entries) + self.pending >= self.max_sessions:
                return "sessions"
        if capped and self.per_key.get(key, 0) >= self.max_per_key:
            self._sweep_at_cap()
            if self.per_key.get(key, 0) >= self.max_per_key:
                return "principal_sessions"
        self.pending += 1
        self.per_key[key] = self.per_key.get(key, 0) + 1
        return None

    def release(self, key: bytes) -> None:
        """Give back a place held by `reserve` (the session was recorded by `add`, or never made)."""
        self.pending -= 1
        self._uncount(key)

    def add(self, sid: bytes, identity: tuple[str, str], key: bytes) -> None:
        """The hosted app issued session `sid` to `identity`."""
        if sid in self.entries:
            return
        self.entries[sid] = Entry(identity, key)
        self.per_key[key] = self.per_key.get(key, 0) + 1
        self.opened += 1
        self.on_change(len(self.entries))
        if self.timer is None:
            self._schedule()

    def forget(self, sid: bytes) -> None:
        """Session `sid` ended (DELETE, or the app no longer knows it)."""
        entry = self.entries.pop(sid, None)
        if entry is not None:
            self._uncount(entry.key)
            self.on_change(len(self.entries))

    def sweep(self, now: float | None = None) -> None:
        """Forget sessions idle past the timeout (the hosted app has expired them too)."""
        now = time.monotonic() if now is None else now
        expired = [sid for sid, e in self.entries.items() if e.active == 0 and now - e.last_used > self.idle_timeout]
        for sid in expired:
            self._uncount(self.entries.pop(sid).key)
        if expired:
            self.on_change(len(self.entries))

    def _sweep_at_cap(self) -> None:
        # At most once a second: a caller retrying at its cap must not make every attempt walk the table.
        now = time.monotonic()
        if now - self.capped_sweep >= 1.0:
            self.capped_sweep = now
            self.sweep(now)

    def _uncount(self, key: bytes) -> None:
        left = self.per_key.get(key, 0) - 1
        if left > 0:
            self.per_key[key] = left
        else:
            self.per_key.pop(key, None)

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
