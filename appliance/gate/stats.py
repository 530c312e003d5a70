"""Per-process counters that the worker's health probe reports."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.conditions import PROCESS_CONDITIONS, Conditions
from appliance.gate.registry import SessionRegistry


#: The name of the method a hosted app may have to report its own state in the worker's probe.
STATUS_HOOK = "appliance_status"


@dataclass
class ServerHealth:
    """One hosted server as the worker's probe reports it.

    The hook for hosted apps that run something of their own (the stdio bridge's children): an
    app with a method `appliance_status() -> dict` reports {"status": "ok" | anything else, …
    details (children up, restarts, "reason": why not ok)}; a status other than "ok" makes the
    worker "degraded" with the reason, so /health shows it.
    """

    name: str
    path: str
    kind: str
    app: Any = field(default=None, repr=False)
    #: Reports this server's state instead of the app's hook (the worker gives command servers the bridge's).
    report: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)

    def snapshot(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "path": self.path, "kind": self.kind, "status": "ok"}
        report = self.report or getattr(self.app, STATUS_HOOK, None)
        if callable(report):
            try:
                doc.update(report())
            except Exception as exc:  # a broken report must not break the probe; it says so
                doc.update(status="unknown", reason=f"its status report failed: {exc!r}")
        return doc


@dataclass
class WorkerStats:
    """What this worker has done since it started; mutated only on the event loop."""

    index: int
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    requests: int = 0
    in_flight: int = 0
    #: The legacy sessions open on this worker (build_gate gives it the configured caps).
    sessions: SessionRegistry = field(default_factory=SessionRegistry, repr=False)
    #: While draining, the probe says so and nginx-facing health treats the worker as not ready.
    draining: bool = False
    #: Set when draining starts (SIGUSR1 from an operation, or SIGTERM): open streams end.
    drain_started: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: What is failing in this process (audit trail, hosted app's storage): the probe says "degraded".
    conditions: Conditions = field(default_factory=lambda: PROCESS_CONDITIONS, repr=False)
    #: The servers this worker hosts (set at worker start).
    servers: list[ServerHealth] = field(default_factory=list, repr=False)

    def start_draining(self) -> None:
        """Stop taking session work and let nginx's connections go (see gate/drain.py)."""
        self.draining = True
        self.drain_started.set()

    def snapshot(self) -> dict[str, object]:
        """The probe's JSON body ("degraded" lists what fails; the worker still answers)."""
        degraded = self.conditions.reasons()
        servers = [server.snapshot() for server in self.servers]
        degraded += [f"server {s['name']}: {s.get('reason') or s['status']}" for s in servers if s["status"] != "ok"]
        doc: dict[str, object] = {
            "status": "draining" if self.draining else "degraded" if degraded else "ok",
            "worker": self.index,
            "pid": self.pid,
            "uptime": round(time.time() - self.started, 3),
            "requests": self.requests,
            "in_flight": self.in_flight,
            "sessions_opened": self.sessions.opened,
            "sessions_open": len(self.sessions),
            "servers": servers,
        }
        if degraded:
            doc["degraded"] = degraded
        return doc
