"""The children of one stdio server in one worker: started, counted, restarted with backoff, bounded.

`shared` isolation keeps one child up for the worker's whole life (restarted when it
dies); `session` isolation starts one per legacy session and keeps a small pool for
2026-07-28 requests. Every child counts against `max_children` until it has exited.
Deaths nobody asked for are restarts; CRASH_LIMIT of them within CRASH_WINDOW seconds
is a crash loop, reported in `status()` and the metrics, and not retried forever:

- a shared server's worker gives up (like supervisord's FATAL): requests get 503 until
  the worker is restarted (`mcp-appliance reload`, once the cause is fixed);
- a session server refuses new sessions for COOLDOWN seconds, then accepts them again:
  its children die with what their own clients make them do, and one client's crashing
  sessions must not take the server from everyone for good.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from appliance.bridge.child import AskFn, Child, ChildGone, NotifyFn
from appliance.bridge.metrics import BridgeMetrics
from appliance.bridge.spec import StdioSpec

logger = logging.getLogger("appliance.bridge")

#: Unasked deaths within CRASH_WINDOW seconds that make a crash loop.
CRASH_LIMIT = 5
CRASH_WINDOW = 60.0
#: Seconds a crash-looping session server refuses new sessions.
COOLDOWN = 60.0
#: Backoff before the n-th restart in a row (the first is at once: the child is back within 2 s).
BACKOFF = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
#: Seconds a 2026-07-28 request waits for a pool child when all are busy and no more may start.
POOL_WAIT = 10.0


class Refused(Exception):
    """No child for this work: `reason` is max_children or crash_loop."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Children:
    """All children of one server in this worker."""

    def __init__(self, spec: StdioSpec, ask: AskFn, notify: NotifyFn, metrics: BridgeMetrics,
                 on_gone: Callable[[Child], Any]) -> None:
        self.spec = spec
        self._ask = ask
        self._notify = notify
        self._metrics = metrics
        self._on_gone = on_gone
        self._tg: TaskGroup | None = None
        self.live: set[Child] = set()
        self._starting = 0
        self.restarts = 0
        self._deaths: collections.deque[float] = collections.deque(maxlen=CRASH_LIMIT)
        self._cooldown_until = 0.0
        self._shared: Child | None = None
        self._shared_changed = anyio.Event()
        self._pool_idle: list[Child] = []
        self._pool_size = 0
        self._pool_freed = anyio.Event()
        self.pool_max = max(1, min(4, spec.max_children // 4 or 1))

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, tg: TaskGroup) -> None:
        """Start supervising in `tg` (the app's lifespan); a shared server's child starts now."""
        self._tg = tg
        self._metrics.start(self.spec.server)
        if self.spec.isolation == "shared":
            tg.start_soon(self._keep_shared)

    def close(self) -> None:
        """Stop every child (the lifespan ends)."""
        for child in list(self.live):
            child.stop()

    # -- accounting -----------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Children running or starting."""
        return len(self.live) + self._starting

    @property
    def crash_looping(self) -> bool:
        return time.monotonic() < self._cooldown_until

    def _died(self) -> None:
        """An unasked death: count it, and enter a crash loop at CRASH_LIMIT within CRASH_WINDOW."""
        now = time.monotonic()
        self.restarts += 1
        self._metrics.restarts.labels(self.spec.server).inc()
        self._deaths.append(now)
        if len(self._deaths) == CRASH_LIMIT and now - self._deaths[0] <= CRASH_WINDOW:
            if not self.crash_looping:
                logger.error("stdio server %s: %d children died within %.0fs: %s", self.spec.server, CRASH_LIMIT,
                             CRASH_WINDOW, f"no new sessions for {COOLDOWN:.0f}s" if self.spec.isolation == "session"
                             else "not restarted again until the worker restarts", extra={"server": self.spec.tag})
            self._cooldown_until = now + COOLDOWN if self.spec.isolation == "session" else math.inf
            self._deaths.clear()
            self._metrics.crash_looping.labels(self.spec.server).set(1)

    def _backoff(self) -> float:
        recent = [t for t in self._deaths if time.monotonic() - t <= CRASH_WINDOW]
        return BACKOFF[min(max(len(recent) - 1, 0), len(BACKOFF) - 1)]

    def status(self) -> dict[str, Any]:
        """This server's children as /health shows them."""
        return {
            "isolation": self.spec.isolation,
            "children": len(self.live),
            "max_children": self.spec.max_children,
            "up": any(c.alive for c in self.live) if self.spec.isolation == "shared" else not self.crash_looping,
            "restarts": self.restarts,
            "crash_looping": self.crash_looping,
            "pids": sorted(c.pid for c in self.live if c.pid is not None),
        }

    # -- starting -------------------------------------------------------------------------

    async def _supervise(self, child: Child, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run `child` to its end (in the task group): count it, and tell whoever serves its sessions."""
        try:
            await child.run(task_status=task_status)
        except Exception as exc:  # the child's failure is this server's problem, never the worker's
            if not child.started:
                raise
            logger.warning("stdio server %s: child %s failed: %r", self.spec.server, child.pid, exc,
                           extra={"server": self.spec.tag})
        finally:
            if child.started:
                self.live.discard(child)
                self._metrics.children.labels(self.spec.server).set(len(self.live))
                if not child.stopping:
                    self._died()
                self._on_gone(child)
                for hook in child.gone_hooks:
                    hook(child)

    async def start(self) -> Child:
        """A new child, started and initialized (raises Refused or ChildGone)."""
        if self.crash_looping:
            self._metrics.refused.labels(self.spec.server, "crash_loop").inc()
            raise Refused("crash_loop", f"stdio server {self.spec.server!r} is crash-looping: its children keep dying")
        if self.count >= self.spec.max_children:
            self._metrics.refused.labels(self.spec.server, "max_children").inc()
            raise Refused("max_children", f"stdio server {self.spec.server!r} runs its maximum of "
                          f"{self.spec.max_children} children in this worker; try again later")
        assert self._tg is not None, "the bridge's lifespan has not started"
        child = Child(self.spec, self._ask, self._notify)
        self._starting += 1
        try:
            await self._tg.start(self._supervise, child)
        except Exception as exc:
            self._died()
            logger.warning("stdio server %s: cannot start %s: %r", self.spec.server, self.spec.command[0], exc,
                           extra={"server": self.spec.tag})
            raise ChildGone(f"stdio server {self.spec.server!r} did not start") from exc
        finally:
            self._starting -= 1
        if child.gone.is_set():
            raise ChildGone(f"stdio server {self.spec.server!r}: the child died as it started")
        self.live.add(child)
        self._metrics.children.labels(self.spec.server).set(len(self.live))
        self._metrics.crash_looping.labels(self.spec.server).set(0)
        logger.info("stdio server %s: child %s started", self.spec.server, child.pid, extra={"server": self.spec.tag})
        return child

    # -- shared isolation -----------------------------------------------------------------

    async def _keep_shared(self) -> None:
        """Keep the one shared child up: restart it with backoff, pause while crash-looping."""
        while not self.crash_looping:
            try:
                child = await self.start()
            except (Refused, ChildGone):
                await anyio.sleep(self._backoff())
                continue
            self._set_shared(child)
            await child.gone.wait()
            self._set_shared(None)
            if child.stopping:
                return
            await anyio.sleep(self._backoff())
        self._set_shared(None)  # wakes the requests waiting for a child: they are refused now

    def _set_shared(self, child: Child | None) -> None:
        self._shared = child
        self._shared_changed.set()
        self._shared_changed = anyio.Event()

    async def shared(self, timeout: float = 30.0) -> Child:
        """The shared child, waiting for a (re)start in progress."""
        with anyio.move_on_after(timeout):
            while self._shared is None or not self._shared.alive:
                if self.crash_looping:
                    self._metrics.refused.labels(self.spec.server, "crash_loop").inc()
                    raise Refused("crash_loop", f"stdio server {self.spec.server!r} is crash-looping")
                await self._shared_changed.wait()
            return self._shared
        raise ChildGone(f"stdio server {self.spec.server!r} did not come up within {timeout:.0f}s")

    # -- session isolation: the pool for 2026-07-28 requests ------------------------------

    @contextlib.asynccontextmanager
    async def pooled(self) -> AsyncIterator[Child]:
        """A pool child for the length of one request (one request at a time per child)."""
        child = await self._checkout()
        try:
            yield child
        finally:
            if child.alive:
                self._pool_idle.append(child)
            self._pool_freed.set()
            self._pool_freed = anyio.Event()

    async def _checkout(self) -> Child:
        with anyio.move_on_after(POOL_WAIT):
            while True:
                while self._pool_idle:
                    child = self._pool_idle.pop()
                    if child.alive:
                        return child
                if self._pool_size < self.pool_max and self.count < self.spec.max_children:
                    self._pool_size += 1
                    try:
                        child = await self.start()
                    except BaseException:
                        self._pool_size -= 1
                        raise
                    child.gone_hooks.append(self._pool_child_gone)
                    return child
                if self._pool_size == 0:  # sessions hold every child
                    break
                await self._pool_freed.wait()
        self._metrics.refused.labels(self.spec.server, "max_children").inc()
        raise Refused("max_children", f"stdio server {self.spec.server!r}: every child in this worker is busy")

    def _pool_child_gone(self, child: Child) -> None:
        self._pool_size -= 1
        with contextlib.suppress(ValueError):
            self._pool_idle.remove(child)
        self._pool_freed.set()
        self._pool_freed = anyio.Event()
