"""What the gate costs: one worker process, the same hosted app with and without the gate, one run.

Two measurements. First, end to end: the server process (this script with --serve) mounts
one MCPServer three times:
  /raw   the hosted app alone (gate off);
  /light the whole gate with auth "none", no policy rules, no audit (request id, host check,
         body limit, session tags, outcome and metrics);
  /full  the whole gate: API key, session binding, one-parse JSON-RPC, tool policy with a
         matching rule, audit record (fsync "interval"), metrics (multiprocess files).
wrk then sends the same 2026-07-28 tools/call (a trivial `add` tool) to each path in
alternating rounds, so all three share the process, the machine and the time; the
server's CPU time per request is reported besides req/s (robust when others share the
cores). Second, the gate alone: the same three mounts around an ASGI app that answers at
once, called in-process (no HTTP, no SDK), CPU time per request.

Usage (from the repo root): python -m bench.gate_overhead [--seconds 5] [--rounds 3] [--connections 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import wrk
from tests.harness import free_port_block

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("raw", "light", "full")
SCOPE = "bench:call"
TOOL, ARGUMENTS = "add", {"a": 1, "b": 2}


def mounts(hosted: Any, directory: Path) -> dict[str, Any]:
    """The hosted app as "raw", behind the light gate, and behind the full gate."""
    from appliance.config import AuditSettings, AuthSettings, PolicySettings, Settings
    from appliance.gate import GateServices, WorkerStats, build_gate
    from appliance.gate.audit import AuditWriter, audit_dir
    from appliance.gate.auth import ApiKeys, NoAuth
    from appliance.gate.policy import Policy
    from appliance.metrics import GateMetrics

    full_settings = Settings(
        log_dir=directory, run_dir=directory,
        auth=AuthSettings(mode="api_keys", keys_file=directory / "keys.json"),
        policy=PolicySettings(rules=(f"tool:add = {SCOPE}",)),
        audit=AuditSettings(fsync="interval"),
    )
    light_settings = dataclasses.replace(full_settings, auth=AuthSettings(), policy=PolicySettings(rules=()),
                                        audit=AuditSettings(enabled=False))
    full = build_gate(hosted, full_settings, 0, WorkerStats(index=0), GateServices(
        ApiKeys(directory / "keys.json"), Policy(full_settings.policy), GateMetrics(0),
        AuditWriter(audit_dir(directory) / "worker-00.jsonl", full_settings.audit)))
    light = build_gate(hosted, light_settings, 1, WorkerStats(index=1), GateServices(
        NoAuth(("*",)), Policy(light_settings.policy), GateMetrics(1), None))
    return {"raw": hosted, "light": light, "full": full}


def serve(port: int, directory: Path) -> None:
    """The server side: one hypercorn process (uvloop) with the three mounts of one MCPServer."""
    import uvloop
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    from bench.add_server import streamable_app

    hosted = streamable_app(json_response=False)
    apps = mounts(hosted, directory)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await hosted(scope, receive, send)  # lifespan: the session manager runs once
            return
        target = apps[scope["path"].strip("/")]
        await target({**scope, "path": "/mcp", "raw_path": b"/mcp"}, receive, send)

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75.0
    uvloop.run(hypercorn_serve(app, config))  # type: ignore[arg-type]


def gate_cpu(directory: Path, key: str, requests: int = 20000, rounds: int = 3) -> dict[str, float]:
    """CPU µs per request of the gate alone: the three mounts around an app that answers at once.

    Run in a child process (PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client loads).
    """
    import asyncio

    from bench.gate_layers import call, instant, request

    scope, body = request()
    scope["headers"] += [(b"authorization", f"Bearer {key}".encode()),
                         (b"x-appliance-limit-exempt", b"1")]  # as for a loopback client behind nginx

    async def run() -> dict[str, float]:
        apps = mounts(instant, directory)
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, app in apps.items():
                for _ in range(500):
                    await call(app, scope, body)
                started = time.process_time()
                for _ in range(requests):
                    await call(app, scope, body)
                used = (time.process_time() - started) / requests * 1e6
                best[name] = min(best.get(name, used), used)
        return best

    return asyncio.run(run())


def measure(seconds: int, rounds: int, connections: int) -> dict[str, Any]:
    from appliance import keys

    directory = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    _, key = keys.add_key(directory / "keys.json", "bench", [SCOPE], None)
    port = free_port_block(1)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory / "metrics")}
    (directory / "metrics").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "bench.gate_overhead", "--serve", str(port), str(directory)],
                            env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("bench server did not start") from None
                time.sleep(0.1)
        # As nginx marks a loopback client by default (limits.exempt): wrk's calls are not held to limits.rate.
        credentials = {"Authorization": f"Bearer {key}", "X-Appliance-Limit-Exempt": "1"}

        def load(path: str, duration: float) -> wrk.Figures:
            return wrk.run(f"http://127.0.0.1:{port}/{path}", "modern", duration, connections, TOOL, ARGUMENTS,
                           headers=credentials)

        for path in PATHS:  # warm up, and prove every path answers with successful tool results
            result = load(path, 1)
            assert result.errors == 0, (path, result)
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
        server = psutil.Process(proc.pid)
        for _ in range(rounds):
            for path in PATHS:
                before = server.cpu_times()
                result = load(path, seconds)
                after = server.cpu_times()
                # CPU the server spent per request: robust when other processes share the cores.
                cpu = (after.user + after.system) - (before.user + before.system)
                runs[path].append({"requests_per_s": result.rps, "p50": f"{result.p50_ms:.2f}ms",
                                   "p99": f"{result.p99_ms:.2f}ms", "errors": result.errors,
                                   "cpu_us_per_request": cpu * 1e6 / result.requests})
        audit_lines = sum(1 for _ in (directory / "audit" / "worker-00.jsonl").open())
    finally:
        proc.terminate()
        proc.wait(30)
    alone = subprocess.run([sys.executable, "-m", "bench.gate_overhead", "--gate-cpu", str(directory), key], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    summary: dict[str, Any] = {"seconds": seconds, "rounds": rounds, "connections": connections,
                               "audit_lines": audit_lines, "gate_alone_cpu_us": json.loads(alone.stdout.splitlines()[-1])}
    for path in PATHS:
        rps = statistics.median(r["requests_per_s"] for r in runs[path])
        summary[path] = {"requests_per_s": rps, "us_per_request": 1e6 / rps,
                         "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in runs[path]),
                         "p50": [r["p50"] for r in runs[path]], "p99": [r["p99"] for r in runs[path]],
                         "errors": sum(r["errors"] for r in runs[path])}
    raw = summary["raw"]["us_per_request"]
    for path in ("light", "full"):
        summary[path]["overhead_us"] = summary[path]["us_per_request"] - raw
        summary[path]["cpu_overhead_us"] = summary[path]["cpu_us_per_request"] - summary["raw"]["cpu_us_per_request"]
        summary[path]["throughput_vs_raw"] = summary[path]["requests_per_s"] / summary["raw"]["requests_per_s"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--gate-cpu", nargs=2, metavar=("DIR", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]))
        return
    if args.gate_cpu:
        print(json.dumps(gate_cpu(Path(args.gate_cpu[0]), args.gate_cpu[1])))
        return
    summary = measure(args.seconds, args.rounds, args.connections)
    print(f"{'path':<6} {'req/s':>9} {'µs/req':>8} {'overhead µs':>12} {'vs raw':>7} {'CPU µs/req':>11} "
          f"{'CPU overhead':>13}  p50 / p99 per round")
    for path in PATHS:
        s = summary[path]
        extra = f"{s.get('overhead_us', 0):>12.1f} {s.get('throughput_vs_raw', 1):>7.2f}"
        cpu = f"{s['cpu_us_per_request']:>11.1f} {s.get('cpu_overhead_us', 0):>13.1f}"
        print(f"{path:<6} {s['requests_per_s']:>9.0f} {s['us_per_request']:>8.1f} {extra} {cpu}  "
              f"{' '.join(map(str, s['p50']))} / {' '.join(map(str, s['p99']))}")
    print(f"audit lines written by /full: {summary['audit_lines']}")
    alone = summary["gate_alone_cpu_us"]
    print("gate alone (in-process, an app that answers at once), CPU µs per request: "
          + ", ".join(f"{k} {v:.1f}" for k, v in alone.items())
          + f"; full gate adds {alone['full'] - alone['raw']:.1f} µs")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
