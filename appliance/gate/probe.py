"""The worker's own health answer, given without touching the hosted app."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.gate.responses import send_json
from appliance.gate.stats import WorkerStats

PROBE_PATH = "/_appliance/health"


class HealthProbe:
    """Answers GET /_appliance/health from the worker's counters."""

    def __init__(self, app: ASGIApp, stats: WorkerStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PROBE_PATH:
            status = 503 if self.stats.draining else 200
            await send_json(send, status, json.dumps(self.stats.snapshot()).encode())
            return
        await self.app(scope, receive, send)
