"""The watchdog: a process that is alive but does not answer leaves service, and is restarted if it stays so.

Every PROBE_INTERVAL the admin app asks each watched process for its probe. A worker's
probe is answered by the gate on the worker's event loop without touching the hosted app
(appliance/gate/probe.py), so a blocked event loop, a deadlock, a C extension holding the
GIL or a stopped process all go unanswered. FAILURES probes in a row without an answer
within PROBE_TIMEOUT take it out of service (a worker: out of nginx's pool, the way a
draining worker leaves it; see appliance/pool.py): new work goes elsewhere about 1.5 s
after it froze, and what it holds is ended then (and every round while it is out) if it is
idle: the requests nginx sent it over its pool socket get nginx's answer for a worker that
stopped mid-call (reads are retried on another worker), while the process lives on
(appliance/sockets.py). Idle means it used less than BUSY_SHARE of a core since the round
before: a stopped process, a deadlock or a blocked `time.sleep` use none, while an
overloaded worker that answers its probe late is busy serving what it holds, and cutting
that would turn slowness into errors; a busy one is only taken out of the pool (and
restarted if it stays silent for hang_timeout: a C extension spinning with the GIL). Its legacy sessions use a socket of their own, which is left alone:
their requests wait for their owner. It returns by itself when it answers again.

One that stays unanswering for `workers.hang_timeout` is restarted: SIGTERM to its process
group (with SIGCONT, so a stopped process can act on it), SIGKILL after KILL_GRACE. Its
supervisor (supervisord for a worker) starts a new one, which comes back into service when
it answers. What its sessions sent it ends with it, and its legacy sessions get 404
(re-initialize) from then on, not before.

Only a process that is alive and has answered once since it started is judged: a dead one
is its supervisor's to restart, a starting one is not hung. Anything that has a pid and a
probe can be watched through the `Watched` protocol: the workers (`WorkerFleet`) today, a
worker's stdio children later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx2
from prometheus_client import Counter, Gauge

from appliance import pool
from appliance.config import Settings
from appliance.gate.probe import PROBE_PATH
from appliance.runtime import live_worker_count
from appliance.sockets import shut_down_connections
from appliance.supervisor import SupervisorClient, SupervisorUnavailable, worker_program

logger = logging.getLogger("appliance.watchdog")

#: Seconds between two probes of every watched process.
PROBE_INTERVAL = 0.5
#: Seconds a probe may take; a busy but healthy worker answers in milliseconds.
PROBE_TIMEOUT = 0.5
#: Probes in a row without an answer that take a process out of service (~1.5 s after it froze).
FAILURES = 2
#: Seconds between SIGTERM and SIGKILL of a hung process: it is hung, a graceful stop is not expected.
KILL_GRACE = 2.0
#: Share of one core below which a silent process counts as idle (nothing is running it): what it
#: holds is ended. A stopped process or a blocked event loop use ~0 (one clock tick is 0.02 of a
#: round); a busy one far more, unless the machine is so loaded that it waits to run: then it is
#: runnable ("R") when looked at, and busy too.
BUSY_SHARE = 0.1
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, bool] | None:
    """(user + system CPU seconds of `pid`'s threads, whether it is running or runnable now), None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK, fields[0] == b"R"

Probe = Callable[[float], Awaitable[bool]]


@dataclass(frozen=True)
class Target:
    """One process to watch now."""

    #: Stable name across restarts, e.g. "worker-01" (logs, /health).
    name: str
    #: Metric label, e.g. the worker index.
    label: str
    #: Its pid; 0 when it is not running (not judged).
    pid: int
    #: Whether it answers within the given seconds.
    probe: Probe
    #: Whether it has answered already (a stdio child past its initialize): judged from its first probe on.
    ready: bool = False


class Watched(Protocol):
    """A kind of process the watchdog watches: what to probe, and how to take some out of service."""

    kind: str

    async def targets(self) -> list[Target]:
        """Every process that should be serving now."""
        ...

    async def set_out(self, names: set[str]) -> None:
        """Exactly these (by Target.name) are out of service; the others are back."""
        ...

    async def already_out(self) -> set[str]:
        """Those out of service before this watchdog started (its predecessor's verdict)."""
        ...

    async def cut(self, target: Target) -> int:
        """End the requests an out-of-service process holds, leaving the process be; how many (OSError: cannot)."""
        ...


@dataclass
class _Track:
    """What the watchdog knows of one process (one pid)."""

    pid: int
    answered: bool = False
    failures: int = 0
    #: time.monotonic() of the first probe of the current silence.
    silent_since: float | None = None
    out: bool = False
    killed: bool = False
    #: Whether cutting its connections failed (logged once; the restart at hang_timeout remains).
    cut_failed: bool = False
    #: (time.monotonic(), CPU seconds) at the round before: whether it is idle or busy while silent.
    cpu: tuple[float, float] | None = None
    #: Whether it used more than BUSY_SHARE of a core since the round before.
    busy: bool = False


class WatchdogMetrics:
    """What the watchdog counts (in the admin app's multiprocess metric files)."""

    def __init__(self, kind: str, registry: Any = None) -> None:
        options = {"registry": registry} if registry is not None else {}
        self.unresponsive = Counter(f"mcp_appliance_{kind}_unresponsive", f"Times a {kind} stopped answering its "
                                    "probe and was taken out of service", [kind], **options)
        self.hang_restarts = Counter(f"mcp_appliance_{kind}_hang_restarts", f"Restarts of a {kind} by the watchdog "
                                     "after it did not answer for workers.hang_timeout", [kind], **options)
        self.cut = Counter(f"mcp_appliance_{kind}_requests_cut", f"Requests held by an unanswering {kind} that the "
                           "watchdog ended (the client got a JSON-RPC error; reads were retried elsewhere)", [kind],
                           **options)
        self.out = Gauge(f"mcp_appliance_{kind}s_out_of_service", f"{kind.capitalize()}s out of service now because "
                         "they do not answer their probe", multiprocess_mode="livemax", **options)
        self.out.set(0)


class Watchdog:
    """Probes one `Watched` kind in a loop; takes out, brings back and restarts its processes."""

    def __init__(self, watched: Watched, hang_timeout: float, metrics: WatchdogMetrics | None = None) -> None:
        self.watched = watched
        self.hang_timeout = hang_timeout
        self.metrics = metrics or WatchdogMetrics(watched.kind)
        self.tracks: dict[str, _Track] = {}
        self._applied: set[str] | None = None
        #: Restarts done, newest last: (time.time(), name, old pid), for /health.
        self.restarts: list[tuple[float, str, int]] = []
        self._kills: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Forever: one round every PROBE_INTERVAL (a round waits at most PROBE_TIMEOUT)."""
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except (SupervisorUnavailable, OSError) as exc:  # try again next round; never stop watching
                logger.warning("watchdog round failed: %s", exc)
            await anyio.sleep(max(0.0, PROBE_INTERVAL - (time.monotonic() - started)))

    async def round(self) -> None:
        """Probe every target once and act on what changed."""
        targets = await self.watched.targets()
        now = time.monotonic()
        if self._applied is None:
            # A restarted admin app: what its predecessor took out had answered once, and is silent since.
            for name in await self.watched.already_out():
                self.tracks[name] = _Track(next((t.pid for t in targets if t.name == name), 0), answered=True,
                                           failures=FAILURES, silent_since=now, out=True)
        answers = await asyncio.gather(*(t.probe(PROBE_TIMEOUT) if t.pid else _no() for t in targets))
        tracks: dict[str, _Track] = {}
        for target, ok in zip(targets, answers):
            old = self.tracks.get(target.name)
            if old is None or old.pid != target.pid:
                # A new process (or none): one that replaced an unanswering one stays out until it answers.
                track = _Track(target.pid, answered=target.ready, out=old is not None and old.out)
            else:
                track = old
            tracks[target.name] = track
            if target.pid:
                self._measure(target, track, now)
                self._judge(target, track, ok, now)
        self.tracks = tracks
        out = {name for name, track in tracks.items() if track.out}
        if out != self._applied:
            await self.watched.set_out(out)
            self._applied = out
            self.metrics.out.set(len(out))
        # Out of the pool, new work goes elsewhere; what it already holds (and what its legacy
        # sessions still send it) would wait for it: end that every round, the process lives on.
        for target in targets:
            track = tracks[target.name]
            if track.out and target.pid and track.pid == target.pid and not track.killed and not track.cut_failed:
                if not track.busy:
                    await self._cut(target, track)

    def _measure(self, target: Target, track: _Track, now: float) -> None:
        """Whether `target` used more than BUSY_SHARE of a core since the round before."""
        reading = cpu_seconds(target.pid)
        if reading is None:
            track.busy, track.cpu = False, None
            return
        used, runnable = reading
        if track.cpu is not None and now > track.cpu[0]:
            busy = runnable or (used - track.cpu[1]) / (now - track.cpu[0]) >= BUSY_SHARE
            if busy and track.out and not track.busy:
                logger.warning("%s (pid %d) does not answer but is busy computing: what it holds is left to "
                               "finish; restarted if it stays silent for %gs (workers.hang_timeout)", target.name,
                               target.pid, self.hang_timeout, extra={"event": "watchdog_busy", "target": target.name})
            track.busy = busy
        track.cpu = (now, used)

    async def _cut(self, target: Target, track: _Track) -> None:
        try:
            cut = await self.watched.cut(target)
        except OSError as exc:
            track.cut_failed = True
            logger.warning("cannot end the requests %s (pid %d) holds: %s; they wait until it answers or is "
                           "restarted after %gs (workers.hang_timeout)", target.name, target.pid, exc,
                           self.hang_timeout, extra={"event": "watchdog_cut_failed", "target": target.name})
            return
        if cut:
            self.metrics.cut.labels(target.label).inc(cut)
            logger.warning("%s (pid %d) does not answer: ended %d requests it held", target.name, target.pid, cut,
                           extra={"event": "watchdog_cut", "target": target.name, "pid": target.pid, "requests": cut})

    def _judge(self, target: Target, track: _Track, ok: bool, now: float) -> None:
        if ok:
            if track.out and track.silent_since is not None:
                silent = now - track.silent_since
                logger.warning("%s (pid %d) answers again after %.1fs: back in service", target.name, target.pid,
                               silent, extra={"event": "watchdog_back", "target": target.name, "pid": target.pid,
                                              "silent_seconds": round(silent, 1)})
            elif track.out:
                logger.warning("%s answers from its new pid %d: back in service", target.name, target.pid,
                               extra={"event": "watchdog_back", "target": target.name, "pid": target.pid})
            track.answered, track.failures, track.silent_since, track.out = True, 0, None, False
            return
        if not track.answered:
            return  # still starting: not hung
        track.failures += 1
        if track.silent_since is None:
            track.silent_since = now - PROBE_INTERVAL  # it answered last a round ago at most
        if track.failures >= FAILURES and not track.out:
            track.out = True
            self.metrics.unresponsive.labels(target.label).inc()
            logger.warning("%s (pid %d) does not answer its probe: out of service; restarted if it stays so "
                           "for %gs (workers.hang_timeout)", target.name, target.pid, self.hang_timeout,
                           extra={"event": "watchdog_out", "target": target.name, "pid": target.pid})
        if track.out and not track.killed and now - track.silent_since >= self.hang_timeout:
            track.killed = True
            self.metrics.hang_restarts.labels(target.label).inc()
            self.restarts = [*self.restarts[-9:], (time.time(), target.name, target.pid)]
            logger.error("%s (pid %d) did not answer for %.1fs (workers.hang_timeout = %g): restarting it",
                         target.name, target.pid, now - track.silent_since, self.hang_timeout,
                         extra={"event": "watchdog_restart", "target": target.name, "pid": target.pid})
            task = asyncio.get_running_loop().create_task(terminate(target.pid))
            self._kills.add(task)
            task.add_done_callback(self._kills.discard)

    def reasons(self) -> list[str]:
        """Operator-facing sentences for /health: what is out now, what was restarted lately."""
        found = []
        now = time.monotonic()
        for name, track in sorted(self.tracks.items()):
            if track.out and track.silent_since is not None and track.pid:
                found.append(f"{name} (pid {track.pid}) has not answered its probe for {now - track.silent_since:.1f}s: "
                             f"out of nginx's pool; restarted after {self.hang_timeout:g}s (workers.hang_timeout)")
            elif track.out:
                found.append(f"{name} was restarted because it hung; back in nginx's pool once it answers")
        for when, name, pid in self.restarts:
            if time.time() - when < RECENT:
                found.append(f"{name} (pid {pid}) was restarted by the watchdog at "
                             f"{time.strftime('%H:%M:%S', time.gmtime(when))} UTC: it did not answer for "
                             f"{self.hang_timeout:g}s (workers.hang_timeout)")
        return found


#: Seconds /health keeps mentioning a restart by the watchdog.
RECENT = 600.0


async def _no() -> bool:
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """`sig` to the process group `pid` leads (supervisord starts each program in its own), else to `pid`."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is as good as gone
    except OSError:
        return False


async def terminate(pid: int, grace: float = KILL_GRACE) -> None:
    """SIGTERM (and SIGCONT) to the process group of `pid`, SIGKILL if it is still there after `grace`."""
    try:
        _signal_group(pid, signal.SIGTERM)
        _signal_group(pid, signal.SIGCONT)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
    except PermissionError as exc:
        logger.error("cannot signal pid %d: %s", pid, exc)


class WorkerFleet:
    """The MCP workers as the watchdog sees them: supervisord's pids, the gate's probe, nginx's pool."""

    kind = "worker"

    def __init__(self, settings: Settings, supervisor: SupervisorClient, client: httpx2.AsyncClient) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.client = client

    async def targets(self) -> list[Target]:
        processes = {p.name: p for p in await anyio.to_thread.run_sync(self.supervisor.processes)}
        serving = pool.read_state(self.settings.run_dir)["serving"]
        count = live_worker_count(self.settings)
        found = []
        for k in serving:
            if k >= count:
                continue
            info = processes.get(worker_program(k))
            alive = info is not None and info.state in {"RUNNING", "STARTING"}
            found.append(Target(worker_program(k), str(k), info.pid if alive and info else 0, self._probe(k)))
        return found

    def _probe(self, index: int) -> Probe:
        url = f"http://{self.settings.workers.host}:{self.settings.worker_port(index)}{PROBE_PATH}"

        async def probe(timeout: float) -> bool:
            try:
                response = await self.client.get(url, timeout=timeout)
            except httpx2.HTTPError:
                return False
            return response.status_code in (200, 503)  # 503: draining, but alive

        return probe

    async def set_out(self, names: set[str]) -> None:
        indices = [int(name.removeprefix("worker-")) for name in names]
        await anyio.to_thread.run_sync(pool.set_unresponsive, self.settings.run_dir, indices)

    async def already_out(self) -> set[str]:
        return {worker_program(k) for k in pool.read_state(self.settings.run_dir)["unresponsive"]}

    async def cut(self, target: Target) -> int:
        # nginx reaches a worker through its unix socket only (pool slots and session upstreams).
        path = pool.worker_socket(self.settings.run_dir, int(target.label))
        return await anyio.to_thread.run_sync(shut_down_connections, target.pid, path)


@contextlib.asynccontextmanager
async def watching(settings: Settings, supervisor: SupervisorClient) -> AsyncIterator[Watchdog]:
    """The workers' watchdog, running in the background for the duration of the block."""
    # A client of its own: /health's probes must not queue behind the watchdog's, nor the reverse.
    async with httpx2.AsyncClient(trust_env=False) as client:
        dog = Watchdog(WorkerFleet(settings, supervisor, client), settings.workers.hang_timeout)
        for k in range(live_worker_count(settings)):  # every series from the start, at 0
            dog.metrics.unresponsive.labels(str(k))
            dog.metrics.hang_restarts.labels(str(k))
            dog.metrics.cut.labels(str(k))
        task = asyncio.get_running_loop().create_task(dog.run())
        try:
            yield dog
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
