"""Figures for the notes on PostgreSQL (issue 11); not a test, bounded in count and time.

Measures, on loopback and a throw-away PostgreSQL on a unix socket only:
  1. get_note throughput through a one-worker appliance, SQLite vs PostgreSQL: calls/s, and
     calls per CPU-second of the worker process (the "per core" figure; PostgreSQL's own
     server processes' CPU-seconds are reported beside it);
  2. event delivery across nodes: two appliances on one database, a listen stream on node 1,
     notes deleted through node 0; latency from sending the delete to the stream's
     resources/updated, p50/p99 over --events.

Usage (as root, like the tests): python -m bench.postgres [--seconds 10] [--clients 8] [--events 200] [--json f]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

# Run from the repository root (python -m bench.postgres): it drives appliances the way the tests do.
from bench.state import delete_latencies
from tests.harness import Appliance, new_appliance, running
from tests.integration.clients import mcp_client
from tests.integration.pg import Cluster, cluster


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("postgres", "postmaster")]


async def get_note_rate(app: Appliance, seconds: float, clients: int) -> dict[str, Any]:
    async with mcp_client(app.mcp_url, mode="2026-07-28") as (client, _):
        result = await client.call_tool("add_note", {"title": "Bench", "body": "A note read many times. " * 20})
        note_id = int(result.structured_content["id"])
    worker = [psutil.Process(app.worker_pid(0))]
    calls = failed = 0

    async def one_client(deadline: float) -> None:
        nonlocal calls, failed
        async with mcp_client(app.mcp_url, mode="2026-07-28") as (client, _):
            while time.monotonic() < deadline:
                got = await client.call_tool("get_note", {"id": note_id})
                calls += 1
                failed += bool(got.is_error)

    pg = postgres_processes()
    worker_before, pg_before, started = cpu_seconds(worker), cpu_seconds(pg), time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(one_client, started + seconds)
    elapsed = time.monotonic() - started
    worker_cpu = cpu_seconds(worker) - worker_before
    pg_cpu = cpu_seconds(postgres_processes()) - pg_before
    return {"calls": calls, "failed": failed, "calls_per_s": round(calls / elapsed, 1),
            "worker_cpu_s": round(worker_cpu, 2), "calls_per_worker_cpu_s": round(calls / max(worker_cpu, 1e-9), 1),
            "postgres_cpu_s": round(pg_cpu, 2)}


async def throughput(pg: Cluster, seconds: float, clients: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, overrides in (("sqlite", {}), ("postgres", {"notes": {"database_url_file": str(pg.url_file)}})):
        with running(new_appliance(1, **overrides)) as app:
            figures[name] = await get_note_rate(app, seconds, clients)
    figures["postgres_vs_sqlite_per_core"] = round(
        figures["postgres"]["calls_per_worker_cpu_s"] / figures["sqlite"]["calls_per_worker_cpu_s"], 2)
    return figures


async def cross_node_latency(pg: Cluster, events: int) -> dict[str, Any]:
    nodes = [new_appliance(1, node={"ordinal": k}, notes={"database_url_file": str(pg.url_file)}) for k in range(2)]
    with running(nodes[0]), running(nodes[1]):
        return await delete_latencies(nodes[1].mcp_url, nodes[0].mcp_url, events)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    with cluster() as pg:
        figures = {
            "get_note_one_worker": await throughput(pg, args.seconds, args.clients),
            "event_latency_across_nodes": await cross_node_latency(pg, args.events),
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    anyio.run(main)
