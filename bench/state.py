"""Figures for state across workers and nodes (issue 11); not a test, bounded in count and time.

Measures, on loopback only:
  1. multi-round-trip completion: 50 eliciting + 50 sampling 2026-07-28 tool calls at once
     through an N=3 appliance, with the shared ring and, as "before", with a per-process key
     (bench/per_process_app.py: an ASGI app the appliance cannot give the ring to);
  2. event delivery within a host: a listen stream on worker 0, notes deleted through worker 2;
     latency from sending the delete to the stream's resources/updated, p50/p99 over --events;
  3. a key rotation (`keys rotate-state`, state.request_ttl = --ttl) under asking load:
     its duration and the failed rounds.

Usage: python -m bench.state [--events 200] [--ttl 3] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import anyio

# Run from the repository root (python -m bench.state): it drives appliances the way the tests do.
from tests.harness import new_appliance, running
from tests.integration.clients import mcp_client
from tests.integration.test_state import asking_calls, seed_note, worker_url


async def completion(per_process: bool) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if per_process:
        overrides["mcp"] = {"app": "per_process_app:app"}
    app = new_appliance(3, **overrides)
    if per_process:
        shutil.copy(Path(__file__).with_name("per_process_app.py"), app.base / "per_process_app.py")
        app.env["PYTHONPATH"] = str(app.base)
    with running(app):
        note_id = await seed_note(app.mcp_url)
        completed, failures = await asking_calls(app.mcp_url, note_id)
    return {"completed": completed, "of": 100, "failed": len(failures)}


async def delete_latencies(listener_url: str, writer_url: str, events: int) -> dict[str, Any]:
    """Add `events` notes through `writer_url`, then delete them one by one while a listen stream on
    `listener_url` waits for each one's resources/updated: the delivery latency, in ms."""
    samples: list[float] = []
    async with mcp_client(listener_url, mode="2026-07-28") as (listener, _), \
            mcp_client(writer_url, mode="2026-07-28") as (writer, _):
        ids = []
        for k in range(events):
            result = await writer.call_tool("add_note", {"title": f"event {k}", "body": "x"})
            ids.append(int(result.structured_content["id"]))
        async with listener.listen(resource_subscriptions=[f"notes://{i}" for i in ids]) as subscription:
            for note_id in ids:
                sent = time.perf_counter()
                await writer.call_tool("delete_note", {"id": note_id})
                with anyio.fail_after(5):
                    async for event in subscription:
                        if getattr(event, "uri", None) == f"notes://{note_id}":
                            break
                samples.append((time.perf_counter() - sent) * 1000)
    samples.sort()
    return {"events": len(samples), "p50_ms": round(statistics.median(samples), 1),
            "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 1),
            "max_ms": round(samples[-1], 1)}


async def event_latency(events: int) -> dict[str, Any]:
    with running(new_appliance(3)) as app:
        return await delete_latencies(worker_url(app, 0), worker_url(app, 2), events)


async def rotation(ttl: int) -> dict[str, Any]:
    with running(new_appliance(3, state={"request_ttl": ttl})) as app:
        note_id = await seed_note(app.mcp_url)
        done: dict[str, Any] = {}

        def rotate() -> None:
            started = time.monotonic()
            result = app.command("keys", "rotate-state", timeout=600)
            done.update(seconds=round(time.monotonic() - started, 1), returncode=result.returncode)

        completed, failed = 0, 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, rotate)
            while "seconds" not in done:
                ok, failures = await asking_calls(app.mcp_url, note_id, calls=10)
                completed, failed = completed + ok, failed + len(failures)
    return {**done, "request_ttl": ttl, "calls_during": completed, "failed": failed}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--ttl", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = {
        "completion_shared_ring_n3": await completion(per_process=False),
        "completion_per_process_key_n3": await completion(per_process=True),
        "event_latency_one_host": await event_latency(args.events),
        "rotation_under_load": await rotation(args.ttl),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    anyio.run(main)
