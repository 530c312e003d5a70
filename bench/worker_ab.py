"""A/B of one worker's CPU per call: the appliance worker (gate + hosted app, no nginx) at one or more
git revisions or settings, against the bare process, in alternating rounds of one run.

Throughput on a shared machine moves by 2x between rounds; the CPU time a process uses per
call (user + system, from /proc, over one wrk round) moves far less, and alternating the
sides round by round gives each the same neighbours. Each side is one process serving the
`add` server (bench/add_server.py) on loopback TCP:
  bare          `python -m bench.baseline --json --gc-freeze` (the SDK alone);
  <ref>[|json]  `mcp-appliance worker --index 0` of the code at git revision <ref> (exported with
                `git archive` into a temporary directory; "." is the work tree as it is), with
                the default settings plus the settings in JSON after "|" (tables merge key by key).
wrk sends what nginx would hand the worker (X-Real-IP, X-Appliance-Limit-Exempt for a loopback
client, a request id) with 2026-07-28 tools/call requests.

Usage (from the repo root):
  python -m bench.worker_ab [--rounds 4] [--seconds 5] [--connections 8] [--no-bare] SIDE [SIDE ...]
  e.g. python -m bench.worker_ab HEAD~1 .   or   python -m bench.worker_ab . '.|{"audit": {"enabled": false}}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench import wrk
from bench.run import ADD_APP, ADD_CALL, Server, baseline, call_ok, lone_worker, stop
from tests.harness import new_appliance, wait_until

ROOT = Path(__file__).resolve().parents[1]

@contextlib.contextmanager
def code_at(ref: str) -> Iterator[Path]:
    """The repository's tree at `ref` in a temporary directory ("." : the work tree itself)."""
    if ref == ".":
        yield ROOT
        return
    tree = Path(tempfile.mkdtemp(prefix="mcp-bench-ab-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        yield tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)


@contextlib.contextmanager
def worker(name: str, code: Path, overrides: dict[str, Any]) -> Iterator[Server]:
    """Worker 0 of a one-worker appliance hosting the add server, run from `code`, with this process
    as its supervisord (the worker exits at once when its parent is not the one in supervisord.pid)."""
    overrides = {**overrides, "mcp": {**overrides.get("mcp", {}), "app": ADD_APP}}
    app = new_appliance(1, **overrides)
    server = lone_worker(app, name, code=code)
    proc = server.proc
    assert proc is not None
    server.tool, server.arguments = ADD_CALL[0], dict(ADD_CALL[1])
    try:
        wait_until(lambda: call_ok(server.url, server.tool, server.arguments), 60, f"{name} answers", interval=0.05)
        yield server
    finally:
        stop(proc)
        shutil.rmtree(app.base, ignore_errors=True)


def cpu_per_call(server: Server, seconds: int, connections: int) -> tuple[float, float]:
    """(CPU µs per call of the server's process, calls/s) over one wrk round (after a 1 s warm-up)."""
    headers = server.headers
    wrk.run(server.url, "modern", 1, connections, server.tool, server.arguments, headers=headers)
    assert server.proc is not None
    process = psutil.Process(server.proc.pid)
    before = sum(process.cpu_times()[:2])
    figures = wrk.run(server.url, "modern", seconds, connections, server.tool, server.arguments, headers=headers)
    if figures.errors:
        raise RuntimeError(f"{server.name}: {figures.errors} failed calls ({figures.detail})")
    return (sum(process.cpu_times()[:2]) - before) * 1e6 / max(figures.requests, 1), figures.rps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sides", nargs="+", help='<git ref or .>[|<settings as JSON>]')
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5, help="per round and side (whole seconds: wrk's -d)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--no-bare", action="store_true", help="without the bare process")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        if not args.no_bare:
            bare = stack.enter_context(baseline("bare", app=ADD_APP, json_response=True, gc_freeze=True))
            bare.name = "bare"
            servers.append(bare)
        for side in args.sides:
            ref, _, settings = side.partition("|")
            code = stack.enter_context(code_at(ref))
            servers.append(stack.enter_context(worker(side, code, json.loads(settings) if settings else {})))
        used: dict[str, list[float]] = {s.name: [] for s in servers}
        for round_ in range(args.rounds):
            for server in servers:
                us, rps = cpu_per_call(server, args.seconds, args.connections)
                used[server.name].append(us)
                print(f"round {round_ + 1} {server.name:<40} {us:6.0f} us CPU/call {rps:6.0f} calls/s", flush=True)
        print(f"\n| side | CPU us per call: median (lowest-highest) over {args.rounds} rounds |\n|---|---:|")
        for name, values in used.items():
            print(f"| {name} | {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
