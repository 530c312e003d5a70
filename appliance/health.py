"""Aggregated health: supervisord's view of every program plus each worker's own probe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import anyio
import httpx2

from appliance.config import Settings
from appliance.gate.probe import PROBE_PATH
from appliance.runtime import live_worker_count
from appliance.supervisor import ProcessInfo, SupervisorClient, SupervisorUnavailable, worker_program

Overall = Literal["ok", "degraded", "down"]


def worker_process_name(index: int) -> str:
    """supervisord's name for worker `index` (one program per worker, see supervisord.conf)."""
    return worker_program(index)


T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Concurrent callers share one run of `fn` (a flood of probes costs one round, not one per request).

    Nothing is cached: a call that starts after a run finished makes a fresh one.
    """

    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self.fn = fn
        self._running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._running is None:
            self._running = asyncio.ensure_future(self.fn())
            self._running.add_done_callback(self._finished)
        # Shielded: one caller that gives up must not cancel the run the others wait for.
        return await asyncio.shield(self._running)

    def _finished(self, future: asyncio.Future[T]) -> None:
        if self._running is future:
            self._running = None


@dataclass
class HealthChecker:
    """Asks supervisord and the workers; remembers whether the appliance was ever ready."""

    settings: Settings
    supervisor: SupervisorClient
    client: httpx2.AsyncClient = field(default_factory=lambda: httpx2.AsyncClient(trust_env=False))
    started: float = field(default_factory=time.time)
    ever_ready: bool = False
    #: The admin app's watchdog (appliance/watchdog.py), for its reasons.
    watchdog: Any = None

    def __post_init__(self) -> None:
        self._probes = SingleFlight(self._probe_workers)
        self._programs = SingleFlight(self._read_programs)

    async def probe_worker(self, index: int) -> dict[str, Any]:
        """One worker's probe answer, or why there is none."""
        url = f"http://{self.settings.workers.host}:{self.settings.worker_port(index)}{PROBE_PATH}"
        try:
            response = await self.client.get(url, timeout=self.settings.health.probe_timeout)
        except httpx2.HTTPError as exc:
            return {"worker": index, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        body = response.json() if response.headers.get("content-type") == "application/json" else {}
        return {"worker": index, "ok": response.status_code == 200, **body}

    async def probe_workers(self) -> list[dict[str, Any]]:
        """Every worker's probe, concurrently (callers at the same moment share one round)."""
        return await self._probes()

    async def _probe_workers(self) -> list[dict[str, Any]]:
        count = live_worker_count(self.settings)  # a live `scale` changes it
        return list(await asyncio.gather(*(self.probe_worker(k) for k in range(count))))

    async def programs(self) -> tuple[list[ProcessInfo], str | None]:
        """supervisord's process list (empty with an error message when it does not answer); shared like the probes."""
        return await self._programs()

    async def _read_programs(self) -> tuple[list[ProcessInfo], str | None]:
        try:
            return await anyio.to_thread.run_sync(self.supervisor.processes), None
        except SupervisorUnavailable as exc:
            return [], str(exc)

    async def ready(self) -> tuple[bool, list[dict[str, Any]]]:
        """Ready when at least health.min_ready_workers answer their probe."""
        probes = await self.probe_workers()
        ok = sum(1 for p in probes if p["ok"]) >= self.settings.health.min_ready_workers
        if ok:
            self.ever_ready = True
        return ok, probes

    async def report(self) -> tuple[Overall, dict[str, Any]]:
        """The /health document and its overall status."""
        (programs, sup_error), (is_ready, probes) = await asyncio.gather(self.programs(), self.ready())
        serving = sum(1 for p in probes if p["ok"])
        by_name = {p.name: p for p in programs}
        nginx = by_name.get("nginx")
        status: Overall
        if serving == 0 or (nginx is not None and nginx.state != "RUNNING"):
            status = "down"
        elif (
            sup_error
            or serving < len(probes)
            or any(not settled(p, probes) for p in programs)
            or not is_ready
            or any(p.get("degraded") for p in probes)
        ):
            status = "degraded"
        else:
            status = "ok"
        s = self.settings
        doc: dict[str, Any] = {
            "status": status,
            "service": s.service_name,
            "version": s.version,
            "environment": s.environment,
            "node": s.node.ordinal,
            "uptime": round(time.time() - self.started, 3),
            "workers": {"configured": len(probes), "in_config_file": s.workers.count, "serving": serving,
                        "min_ready": s.health.min_ready_workers},
            "programs": {
                p.name: {"state": p.state, "pid": p.pid, "uptime": round(p.uptime, 1)} for p in programs
            },
            "servers": servers_health(s, probes),
            "probes": probes,
        }
        if sup_error:
            doc["supervisor_error"] = sup_error
        reasons = problems(programs, probes)
        if self.watchdog is not None:
            reasons += self.watchdog.reasons()
        if reasons:
            doc["reasons"] = reasons
        return status, doc


def servers_health(settings: Settings, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every hosted server with its state in each answering worker that hosts it (all of them, or its
    first `workers`): "ok" when every one of them says ok, else the first other state; "unknown" when
    none answered."""
    out = []
    for server in settings.hosted_servers:
        per_worker = {}
        for probe in probes:
            for reported in probe.get("servers", ()):
                if reported.get("name") == server.name:
                    per_worker[str(probe["worker"])] = reported
        states = [r.get("status", "unknown") for r in per_worker.values()]
        status = "unknown" if not states else next((x for x in states if x != "ok"), "ok")
        out.append({"name": server.name, "path": server.path, "kind": server.kind, "status": status,
                    "workers": per_worker})
    return out


def settled(program: ProcessInfo, probes: list[dict[str, Any]]) -> bool:
    """RUNNING, or a worker still within its startsecs that already serves from that pid."""
    if program.state == "RUNNING":
        return True
    return program.state == "STARTING" and any(
        p["ok"] and worker_program(p["worker"]) == program.name and p.get("pid") == program.pid for p in probes
    )


def problems(programs: list[ProcessInfo], probes: list[dict[str, Any]]) -> list[str]:
    """Why the appliance is not fully ok, one operator-facing sentence each."""
    reasons = []
    for p in programs:
        if settled(p, probes):
            continue
        if p.state == "FATAL":
            reasons.append(
                f"{p.name} is FATAL: it kept exiting right after start, so supervisord stopped restarting it "
                f"({p.description}); see its log, fix the cause, then run `supervisorctl start {p.name}` "
                "or `mcp-appliance reload` (a worker: POST /admin/workers/<k>/restart)"
            )
        elif p.state in {"BACKOFF", "EXITED", "STOPPED", "STARTING", "STOPPING"}:
            reasons.append(f"{p.name} is {p.state}")
    for probe in probes:
        if probe.get("status") == "draining":
            reasons.append(f"worker {probe['worker']} is draining (an operation is restarting or removing it)")
        elif not probe["ok"] and "error" in probe:
            reasons.append(f"worker {probe['worker']} does not answer its probe: {probe['error']}")
        reasons += [f"worker {probe['worker']}: {reason}" for reason in probe.get("degraded", ())]
    return reasons

