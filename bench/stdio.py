"""The stdio benchmark: one real stdio MCP server hosted by the appliance against supergateway.

The server is @modelcontextprotocol/server-everything (npm), its `echo` tool (a cheap call:
what is measured is the bridging). On one machine, in one run, the sides take turns:

1. bare child: the server alone on its stdin/stdout, driven by a JSON-lines client that keeps
   C calls in flight (no HTTP, no bridge: the ceiling, and the server's own CPU per call);
2. supergateway (npm, the most used stdio->HTTP bridge) as a user with a modern client runs
   it: `--outputTransport streamableHttp --stateful`, one child per session; traffic: legacy
   (2025-11-25) sessions, C connections each initializing once, then tools/call in its
   session (supergateway knows no 2026-07-28 requests). Optionally (--stateless-duration)
   its default stateless mode, which starts a child for every request;
3. the appliance, N=2 workers, `[servers.everything] command = [...]` with isolation "shared"
   (one child per worker) and "session" (one child per legacy session): the same legacy
   sessions, and 2026-07-28 calls with isolation "shared";
4. the library comparison issue 13 asks for, one process each, the same traffic: fastmcp's
   proxy (`create_proxy` of a stdio transport, served by fastmcp over HTTP: bench/fastmcp_proxy.py,
   in a venv of its own) and the appliance's bridge alone (`stdio_app` in one hypercorn process,
   no gate, no nginx: bench/bridge_alone.py).

Figures per side: calls/s, p50/p99 (wrk), errors, RSS and PSS of the bridge's processes and
of the server's children, CPU microseconds per call of the bridge (every process of the
side but the server's own) and of the server's children. Each side is started afresh per
round (sessions of a round must not pile up into the next) and the figure is the median.

supergateway listens on every interface and has no flag to choose one: it runs in a network
namespace of its own with only loopback up (unshare; needs root) and wrk enters it (nsenter).
Everything else listens on 127.0.0.1. Load is bounded: --duration seconds per run, C connections.

Usage: python -m bench.stdio [--connections 8] [--duration 10] [--rounds 3] [--stateless-duration 0]
                             [--sides bare,supergateway,fastmcp,bridge,appliance] [--out bench/STDIO.md]
Needs wrk, node and the npm packages (scripts/test.sh installs them into /opt/mcp-appliance-test/npm).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import wrk
from tests.harness import Appliance, cleanup, free_port_block, new_appliance, to_toml, wait_until

ROOT = Path(__file__).resolve().parents[1]
#: Where scripts/test.sh installs what the benchmark runs ($MCP_TEST_VENV's default).
TEST_VENV = Path("/opt/mcp-appliance-test")
NPM_PREFIX = TEST_VENV / "npm"
SERVER_BIN = NPM_PREFIX / "node_modules/.bin/mcp-server-everything"
SUPERGATEWAY_BIN = NPM_PREFIX / "node_modules/.bin/supergateway"
SERVER_NAME = "everything"
TOOL, ARGUMENTS = "echo", {"message": "bench"}
#: What the body of a successful echo answer holds (server-everything writes no isError).
SUCCESS = '"text":"Echo: bench"'
LEGACY = wrk.LEGACY


# -- processes and what they cost ------------------------------------------------------------------


@dataclass
class Side:
    """One way of serving the stdio server over HTTP (or not), while it runs."""

    name: str
    url: str
    #: The processes of the side; the stdio server's own are told apart by `is_server`.
    root: psutil.Process
    #: wrk runs through this (nsenter into supergateway's network namespace).
    prefix: tuple[str, ...] = ()
    cold_start_s: float = 0.0


def tree(root: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [root, *root.children(recursive=True)]
    return []


def is_server(proc: psutil.Process, server_bin: Path) -> bool:
    """The stdio server's own processes: node running its script, or a shell starting it (not a
    bridge that merely names it among its arguments, as supergateway's --stdio does)."""
    names = {str(server_bin), str(server_bin.resolve()), shlex.quote(str(server_bin))}
    with contextlib.suppress(psutil.Error):
        argv = proc.cmdline()
        return bool(names & set(argv[:2])) or (len(argv) >= 3 and argv[1] == "-c" and argv[2] in names)
    return False


def cpu_seconds(procs: list[psutil.Process]) -> dict[tuple[int, float], float]:
    """(pid, start time) -> user + system CPU seconds (children reaped by it included)."""
    out = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            out[(proc.pid, proc.create_time())] = t.user + t.system + t.children_user + t.children_system
    return out


@dataclass
class Cost:
    """CPU during one measured run and memory right after it, split bridge / server."""

    bridge_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    bridge_rss_mib: float = 0.0
    bridge_pss_mib: float = 0.0
    server_rss_mib: float = 0.0
    server_pss_mib: float = 0.0
    server_processes: int = 0


def measure(root: psutil.Process, server_bin: Path, run: Callable[[], wrk.Figures]) -> tuple[wrk.Figures, Cost]:
    """Run `run` and account the side's CPU time over it and its memory after it."""
    before = cpu_seconds(tree(root))
    figures = run()
    procs = tree(root)
    after = cpu_seconds(procs)
    cost = Cost()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            key = (proc.pid, proc.create_time())
            spent = after.get(key, 0.0) - before.get(key, 0.0)
            memory = proc.memory_full_info()
            rss, pss = memory.rss / 2**20, getattr(memory, "pss", memory.rss) / 2**20
            if is_server(proc, server_bin):
                cost.server_cpu_s += spent
                cost.server_rss_mib += rss
                cost.server_pss_mib += pss
                cost.server_processes += 1
            else:
                cost.bridge_cpu_s += spent
                cost.bridge_rss_mib += rss
                cost.bridge_pss_mib += pss
    return figures, cost


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# -- 1. the bare child ---------------------------------------------------------------------------


async def _bare(server_bin: Path, connections: int, seconds: int) -> tuple[wrk.Figures, Cost]:
    """The server over its own pipes, `connections` calls in flight for `seconds`."""
    child = await asyncio.create_subprocess_exec(
        str(server_bin), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    assert child.stdin and child.stdout
    pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def reader() -> None:
        assert child.stdout
        while line := await child.stdout.readline():
            message = json.loads(line)
            waiter = pending.pop(message.get("id"), None) if "id" in message else None
            if waiter and not waiter.done():
                waiter.set_result(message)

    async def call(ident: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert child.stdin
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending[ident] = waiter
        child.stdin.write(json.dumps({"jsonrpc": "2.0", "id": ident, "method": method, "params": params}).encode() + b"\n")
        return await waiter

    reading = asyncio.create_task(reader())
    try:
        await call(0, "initialize", {"protocolVersion": LEGACY, "capabilities": {},
                                     "clientInfo": {"name": "bench", "version": "1"}})
        child.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        proc = psutil.Process(child.pid)
        before = cpu_seconds([proc])
        latencies: list[float] = []
        errors = 0
        counter = iter(range(1, 10**9))
        deadline = time.monotonic() + seconds

        async def lane() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.perf_counter()
                answer = await call(next(counter), "tools/call", {"name": TOOL, "arguments": ARGUMENTS})
                latencies.append(time.perf_counter() - started)
                if SUCCESS not in json.dumps(answer.get("result", {}), separators=(",", ":")):
                    errors += 1

        began = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(connections)))
        elapsed = time.monotonic() - began
        after = cpu_seconds([proc])
        memory = proc.memory_full_info()
    finally:
        child.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        await child.wait()
        reading.cancel()
    quantiles = statistics.quantiles(latencies, n=100)
    figures = wrk.Figures(kind="bare", connections=connections, seconds=elapsed, requests=len(latencies),
                          rps=len(latencies) / elapsed, p50_ms=quantiles[49] * 1000, p90_ms=quantiles[89] * 1000,
                          p99_ms=quantiles[98] * 1000, errors=errors)
    cost = Cost(server_cpu_s=sum(after.values()) - sum(before.values()), server_rss_mib=memory.rss / 2**20,
                server_pss_mib=getattr(memory, "pss", memory.rss) / 2**20, server_processes=1)
    return figures, cost


# -- 2. supergateway -----------------------------------------------------------------------------


def _answers_initialize(url: str, prefix: tuple[str, ...]) -> bool:
    """An initialize through `url` answered 200 (curl inside the namespace: nothing else reaches it)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "bench-probe", "version": "1"}}})
    result = subprocess.run(
        [*prefix, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "Content-Type: application/json",
         "-H", f"Accept: {wrk.ACCEPT}", "-H", f"MCP-Protocol-Version: {LEGACY}", "--data", body, "--max-time", "10", url],
        capture_output=True, text=True, timeout=30)
    return result.stdout.strip() == "200"


@contextlib.contextmanager
def supergateway(server_bin: Path, gateway_bin: Path, stateful: bool) -> Iterator[Side]:
    """supergateway in a network namespace with only loopback; wrk enters that namespace."""
    port = 8000
    gateway = [str(gateway_bin), "--stdio", shlex.quote(str(server_bin)), "--outputTransport", "streamableHttp",
               "--port", str(port), "--logLevel", "none", *(["--stateful"] if stateful else [])]
    inner = f"ip link set lo up && exec {shlex.join(gateway)}"
    started = time.monotonic()
    proc = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", inner], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        prefix = ("nsenter", f"--net=/proc/{proc.pid}/ns/net", "--")
        url = f"http://127.0.0.1:{port}/mcp"
        wait_until(lambda: proc.poll() is not None or _answers_initialize(url, prefix), 60,
                   "supergateway answers initialize", interval=0.1)
        if proc.poll() is not None:
            raise RuntimeError(f"supergateway exited with {proc.returncode}")
        yield Side(f"supergateway ({'stateful' if stateful else 'stateless'})", url, psutil.Process(proc.pid),
                   prefix=prefix, cold_start_s=time.monotonic() - started)
    finally:
        stop_tree(proc)


# -- 2b. one process each: fastmcp's proxy, and the appliance's bridge alone ----------------------


#: The venv scripts/test.sh makes for fastmcp (its own: it is no dependency of the appliance).
FASTMCP_PYTHON = TEST_VENV / "fastmcp-venv/bin/python"


@contextlib.contextmanager
def one_process(name: str, argv: list[str], port: int) -> Iterator[Side]:
    """A bridge that is one process of its own on 127.0.0.1:`port`, until it answers initialize."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        wait_until(lambda: proc.poll() is not None or _answers_initialize(url, ()), 60,
                   f"{name} answers initialize", interval=0.1)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        yield Side(name, url, psutil.Process(proc.pid), cold_start_s=time.monotonic() - started)
    finally:
        stop_tree(proc)


def fastmcp_proxy(server_bin: Path, python: Path = FASTMCP_PYTHON) -> contextlib.AbstractContextManager[Side]:
    port = free_port_block(1)
    return one_process("fastmcp proxy", [str(python), str(ROOT / "bench/fastmcp_proxy.py"), str(port),
                                         str(server_bin)], port)


def bridge_alone(server_bin: Path) -> contextlib.AbstractContextManager[Side]:
    port = free_port_block(1)
    return one_process("bridge alone", [sys.executable, "-m", "bench.bridge_alone", str(port), str(server_bin)], port)


def fastmcp_version(python: Path = FASTMCP_PYTHON) -> str:
    result = subprocess.run([str(python), "-c", "import fastmcp; print(fastmcp.__version__)"],
                            capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or "?"


# -- 3. the appliance ------------------------------------------------------------------------------


def appliance_config(server_bin: Path, isolation: str) -> dict[str, Any]:
    """The settings overrides: one stdio server, on its own path (the shape of issue 13's tables)."""
    # max_children: room for every session of a run (--connections is at most 64) and the probe's.
    return {f"servers.{SERVER_NAME}": {"command": [str(server_bin)], "isolation": isolation, "max_children": 80}}


def appliance_refusal(server_bin: Path) -> str:
    """Why this build cannot host the stdio server ("" when it can): `mcp-appliance check`'s verdict."""
    app = new_appliance(2, **appliance_config(server_bin, "shared"))
    try:
        app.config_path.write_text(to_toml(app.settings))
        result = app.command("check", timeout=120)
        return "" if result.returncode == 0 else (result.stderr.strip().splitlines() or ["check failed"])[-1]
    finally:
        cleanup(app)


def server_url(app: Appliance) -> str:
    return f"{app.url}/servers/{SERVER_NAME}/mcp"


@contextlib.contextmanager
def appliance(server_bin: Path, isolation: str, as_hosted_app: bool = False) -> Iterator[Side]:
    """The appliance with N=2 workers hosting the stdio server: as `[servers.everything]`, or
    (a build without server tables) as its hosted app `mcp.app` on /mcp, the same bridge
    (tests.integration.bridgekit)."""
    if as_hosted_app:
        from tests.integration.bridgekit import bridged_appliance

        app = bridged_appliance(2, server=SERVER_NAME, command=[str(server_bin)], isolation=isolation,
                                max_children=80)
    else:
        app = new_appliance(2, **appliance_config(server_bin, isolation))
    started = time.monotonic()
    try:
        app.start()
        app.wait_healthy(timeout=60, workers=2)
        url = app.mcp_url if as_hosted_app else server_url(app)
        wait_until(lambda: _answers_initialize(url, ()), 60, "the appliance answers initialize", interval=0.1)
        assert app.proc is not None
        yield Side(f"appliance N=2 ({isolation})", url, psutil.Process(app.proc.pid),
                   cold_start_s=time.monotonic() - started)
    finally:
        cleanup(app)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Row:
    side: str
    traffic: str
    runs: list[tuple[wrk.Figures, Cost]] = field(default_factory=list)
    note: str = ""

    def figures(self) -> wrk.Figures:
        return wrk.median([f for f, _ in self.runs])

    def cost(self, name: str) -> float:
        return statistics.median(getattr(c, name) for _, c in self.runs)

    def per_call_us(self, name: str) -> float:
        return statistics.median(getattr(c, name) / max(f.requests, 1) * 1e6 for f, c in self.runs)


def _wrk_runner(side: Side, kind: str, args: argparse.Namespace, seconds: int, connections: int) -> Callable[[], wrk.Figures]:
    return lambda: wrk.run(side.url, kind, seconds, connections, TOOL, ARGUMENTS, success=SUCCESS, prefix=side.prefix)


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, str]]:
    server_bin, gateway_bin = Path(args.server_bin), Path(args.supergateway)
    sides = set(args.sides.split(","))
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    refusal = appliance_refusal(server_bin) if "appliance" in sides else "not asked for (--sides)"
    as_hosted_app = bool(refusal) and "appliance" in sides
    if as_hosted_app:
        skipped["appliance as [servers.everything]"] = (f"{refusal}; measured instead with the bridge as the "
                                                        "hosted app (mcp.app) on /mcp")
    elif refusal:
        skipped["appliance"] = refusal
    if "supergateway" in sides and os.geteuid() != 0:
        skipped["supergateway"] = "needs root for its loopback-only network namespace"
    plan: list[tuple[str, str, Callable[[], contextlib.AbstractContextManager[Side]], int, int]] = []
    if "supergateway" in sides and "supergateway" not in skipped:
        plan.append(("supergateway --stateful", "legacy sessions",
                     lambda: supergateway(server_bin, gateway_bin, stateful=True), args.duration, args.connections))
        if args.stateless_duration:
            plan.append(("supergateway (stateless: a child per request)", "legacy stateless calls",
                         lambda: supergateway(server_bin, gateway_bin, stateful=False),
                         args.stateless_duration, args.connections))
    one_each = [("fastmcp", "fastmcp proxy (one process)", lambda: fastmcp_proxy(server_bin)),
                ("bridge", "appliance bridge alone (one process, no gate, no nginx)", lambda: bridge_alone(server_bin))]
    if "fastmcp" in sides and not FASTMCP_PYTHON.exists():
        skipped["fastmcp proxy"] = f"{FASTMCP_PYTHON} not found (scripts/test.sh makes that venv)"
    for key, name, start in one_each:
        if key in sides and name.split(" (")[0] not in skipped:
            for traffic in ("legacy sessions", "2026-07-28 calls"):
                plan.append((name, traffic, start, args.duration, args.connections))
    if "appliance" not in skipped:
        for isolation in ("shared", "session"):
            plan.append((f"appliance N=2, isolation {isolation}", "legacy sessions",
                         lambda isolation=isolation: appliance(server_bin, isolation, as_hosted_app),
                         args.duration, args.connections))
        plan.append(("appliance N=2, isolation shared", "2026-07-28 calls",
                     lambda: appliance(server_bin, "shared", as_hosted_app), args.duration, args.connections))
    bare = Row("bare child (stdio, no HTTP)", f"{args.connections} calls in flight") if "bare" in sides else None
    table = [Row(side, traffic) for side, traffic, *_ in plan]
    for round_no in range(args.rounds):
        if bare is not None:
            bare.runs.append(asyncio.run(_bare(server_bin, args.connections, args.duration)))
            print(f"round {round_no + 1}: bare child {bare.runs[-1][0].rps:.0f} calls/s", file=sys.stderr)
        for row, (_, traffic, start, seconds, connections) in zip(table, plan):
            kind = "modern" if traffic.startswith("2026") else "stateless" if "stateless" in traffic else "sessions"
            with start() as side:
                row.runs.append(measure(side.root, server_bin, _wrk_runner(side, kind, args, seconds, connections)))
            print(f"round {round_no + 1}: {row.side}, {row.traffic}: {row.runs[-1][0].rps:.0f} calls/s, "
                  f"{row.runs[-1][0].errors} errors", file=sys.stderr)
    rows = ([bare] if bare is not None else []) + table
    return rows, skipped


def _version(path: Path) -> str:
    package = path.resolve()
    for parent in package.parents:
        manifest = parent / "package.json"
        if manifest.exists():
            return json.loads(manifest.read_text()).get("version", "?")
    return "?"


def report(rows: list[Row], skipped: dict[str, str], args: argparse.Namespace) -> str:
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Stdio servers: the appliance against supergateway",
        "",
        f"One run of `python -m bench.stdio --connections {args.connections} --duration {args.duration} "
        f"--rounds {args.rounds}{f' --stateless-duration {args.stateless_duration}' if args.stateless_duration else ''}` "
        f"({time.strftime('%Y-%m-%d')}), on {os.cpu_count()} CPUs ({platform.machine()}, Python {platform.python_version()}, "
        f"node {node}). Server: @modelcontextprotocol/server-everything {_version(Path(args.server_bin))}, tool `{TOOL}`; "
        f"supergateway {_version(Path(args.supergateway))}"
        f"{f'; fastmcp {fastmcp_version()}' if FASTMCP_PYTHON.exists() else ''}; load: wrk, {args.connections} connections, "
        f"{args.duration} s per run; each side started afresh per round, figures are medians over the rounds, "
        "errors the sum. wrk shares the CPUs with the servers.",
        "",
        "Bridge CPU per call: user + system time of every process of the side except the stdio server's own, "
        "per call (supergateway: its node process; appliance: supervisord, nginx, workers, admin; fastmcp and "
        "the bridge alone: their one process). Server CPU per call: the stdio server's processes. Memory right "
        "after a run, sessions still open. Errors: calls not answered with the echo (wrk's check of the body).",
        "",
        "| side | traffic | calls/s | p50 ms | p99 ms | errors | bridge CPU µs/call | server CPU µs/call "
        "| bridge RSS MiB (PSS) | server processes | server RSS MiB (PSS) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        f = row.figures()
        bridge = "-" if row.side.startswith("bare") else f"{row.per_call_us('bridge_cpu_s'):.0f}"
        bridge_mem = "-" if row.side.startswith("bare") else f"{row.cost('bridge_rss_mib'):.0f} ({row.cost('bridge_pss_mib'):.0f})"
        lines.append(f"| {row.side} | {row.traffic} | {f.rps:.0f} | {f.p50_ms:.2f} | {f.p99_ms:.2f} | {f.errors} "
                     f"| {bridge} | {row.per_call_us('server_cpu_s'):.0f} | {bridge_mem} "
                     f"| {row.cost('server_processes'):.0f} | {row.cost('server_rss_mib'):.0f} ({row.cost('server_pss_mib'):.0f}) |")
    ranges = [f"{row.side}, {row.traffic}: {row.figures().rps_range[0]:.0f}-{row.figures().rps_range[1]:.0f}"
              for row in rows if row.figures().rps_range]
    if ranges:
        lines += ["", "Lowest-highest calls/s over the rounds: " + "; ".join(ranges) + "."]
    by_side = {(row.side, row.traffic): row.figures().rps for row in rows}
    gateway = by_side.get(("supergateway --stateful", "legacy sessions"))
    if gateway:
        ratios = [f"{side}, {traffic}: **{rps / gateway:.2f}x**" for (side, traffic), rps in by_side.items()
                  if not side.startswith(("bare", "supergateway"))]
        if ratios:
            lines += ["", "Against supergateway --stateful (legacy sessions): " + "; ".join(ratios) + "."]
    for side, why in skipped.items():
        lines += ["", f"Not measured: {side}: {why}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8, help="concurrent clients (sessions) per run")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stateless-duration", type=int, default=0,
                        help="seconds of supergateway's stateless mode per round (0: not measured)")
    parser.add_argument("--sides", default="bare,supergateway,fastmcp,bridge,appliance")
    parser.add_argument("--server-bin", default=str(SERVER_BIN), help="the stdio server's executable")
    parser.add_argument("--supergateway", default=str(SUPERGATEWAY_BIN))
    parser.add_argument("--out", default="", help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if not (0 < args.connections <= 64 and 0 < args.duration <= 120 and 0 < args.rounds <= 10):
        parser.error("bounded load only: --connections 1..64, --duration up to 120 s, --rounds 1..10")
    for tool in ("wrk", "node", "curl"):
        if not shutil.which(tool):
            parser.error(f"{tool} not found")
    for path in (args.server_bin, args.supergateway):
        if not Path(path).exists():
            parser.error(f"{path} not found (npm install --prefix {NPM_PREFIX} @modelcontextprotocol/server-everything supergateway)")
    rows, skipped = run(args)
    text = report(rows, skipped, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
