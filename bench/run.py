"""The benchmark: the appliance against the one bare MCP process a user would otherwise run.

By default (~6 minutes) the ratios of issue 12 with the smallest real server, `add`
(bench/ratios.py: JSON and SSE answers, gc.freeze(), `hypercorn -w 2`, CPU per call of
every process, a model for more cores), written into its section of --out. With --full,
first the whole report with the notes server's `get_note`:
  1. the baseline: the default notes server alone on hypercorn (no nginx, no gate);
  2. the appliance with N workers (default: the CPU count), started with `mcp-appliance run`;
  3. the same wrk load against both: (a) 2026-07-28 tool calls, (b) legacy stateless tool
     calls (a second baseline / appliance with sessions off), (c) legacy sessions
     (initialize once per connection, then tool calls in the session);
  4. requests/s, p50/p99, errors, the RSS of every process, cold start to ready, ratios;
  5. the gate's cost (one worker with the gate against the baseline process), latency added
     by nginx + gate at a moderate, paced load, what a legacy session costs against
     stateless calls (time and memory per 1,000 open sessions);
  6. kill -9 of a worker (time until it serves again) and a rolling reload under wrk load.

Usage: python -m bench.run [--workers N] [--duration 10] [--rounds 3] [--connections 32] [--full]
                          [--moderate-duration 30] [--out bench/RESULTS.md]
Needs wrk (Debian: apt-get install wrk); everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import httpx2
import psutil

from appliance import pool
from appliance.config import load_settings
from appliance.gate.services import preflight_gate
from appliance.lifetime import supervisord_pidfile
from appliance.health import worker_process_name
from appliance.preflight import prepare_dirs
from appliance.state.keys import ensure_ring
from bench import wrk

# The benchmark starts appliances and talks MCP the way the tests do: one set of helpers,
# imported as the `tests` package (run from the repo root: `python -m bench.run`).
from tests.harness import Appliance, cleanup, free_port_block, new_appliance, to_toml, wait_until
from tests.integration.clients import modern_request, probes
from tests.integration.load import RawSession

ROOT = Path(__file__).resolve().parents[1]

TOOL, ARGUMENTS = "get_note", {"id": 1}  # a small read of the notes database
MODERATE_CONNECTIONS, MODERATE_RATE = 4, 50.0  # 4 connections x 50 req/s = 200 req/s, paced
SESSIONS_HELD = 1000


# -- the processes under test ------------------------------------------------------------


@dataclass
class Server:
    """One process (tree) serving MCP on `url`, with its cold start."""

    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None
    appliance: Appliance | None = None
    cold_start_s: float = 0.0
    all_ready_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: The tool wrk calls, and its arguments.
    tool: str = TOOL
    arguments: dict[str, Any] = field(default_factory=lambda: dict(ARGUMENTS))
    #: What wrk sends besides the MCP headers: a lone worker gets what nginx adds (FROM_NGINX).
    headers: dict[str, str] = field(default_factory=dict)

    def processes(self) -> list[tuple[str, psutil.Process]]:
        """(name, process) of everything this server runs (a bare `hypercorn -w N`: its workers too)."""
        if self.appliance is not None:
            return appliance_processes(self.appliance)
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        with contextlib.suppress(psutil.Error):
            return [(self.name, root)] + [(self.name, child) for child in root.children(recursive=True)]
        return [(self.name, root)]


def call_ok(url: str, tool: str = TOOL, arguments: dict[str, Any] | None = None) -> bool:
    headers, body = modern_request("tools/call", tool, {"name": tool, "arguments": arguments or ARGUMENTS})
    try:
        response = httpx2.post(url, content=body, headers=headers, timeout=5, trust_env=False)
    except httpx2.HTTPError:
        return False
    return response.status_code == 200 and '"isError":false' in response.text


def seed(url: str) -> None:
    """Note 1, which the benchmark's get_note calls read."""
    assert call_ok(url, "add_note", {"title": "benchmark", "body": "a note to read", "tags": ["bench"]})
    assert call_ok(url), "get_note 1 after add_note"


#: The smallest real server (bench/add_server.py): what the appliance itself adds shows.
ADD_APP, ADD_CALL = "bench.add_server:server", ("add", {"a": 1, "b": 2})


@contextlib.contextmanager
def baseline(name: str, stateless: bool = False, gc_freeze: bool = False, app: str | None = None,
             json_response: bool = False, workers: int = 1) -> Iterator[Server]:
    """The hosted app alone: `python -m bench.baseline` (`app`: the add server instead of the notes server;
    `workers` > 1: `hypercorn -w N` of it)."""
    port = free_port_block(1)
    data = Path(tempfile.mkdtemp(prefix="mcp-bench-baseline-"))
    argv = [sys.executable, "-m", "bench.baseline", "--port", str(port), "--data-dir", str(data)]
    started = time.monotonic()
    argv += (["--stateless"] if stateless else []) + (["--gc-freeze"] if gc_freeze else [])
    argv += (["--app", app] if app else []) + (["--json"] if json_response else []) + ["--workers", str(workers)]
    proc = subprocess.Popen(argv, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(name, f"http://127.0.0.1:{port}/mcp", proc=proc)
    if app:
        server.tool, server.arguments = ADD_CALL[0], dict(ADD_CALL[1])
    try:
        if app:
            wait_until(lambda: call_ok(server.url, server.tool, server.arguments), 60, f"{name} answers",
                       interval=0.05)
        else:
            wait_until(lambda: call_ok(server.url, "list_notes", {}), 60, f"{name} answers", interval=0.05)
        server.cold_start_s = server.all_ready_s = time.monotonic() - started
        if not app:
            seed(server.url)
        yield server
    finally:
        stop(proc)
        shutil.rmtree(data, ignore_errors=True)


#: What nginx adds to each proxied request (conf/nginx.conf.j2) for a client on the host itself: a
#: lone worker without it would count wrk against limits.rate like a remote client.
FROM_NGINX = {"X-Real-IP": "127.0.0.1", "X-Appliance-Limit-Exempt": "1", "X-Forwarded-For": "127.0.0.1",
              "X-Forwarded-Proto": "http", "X-Request-ID": "0123456789abcdef0123456789abcdef"}


def lone_worker(app: Appliance, name: str, url_path: str = "/mcp", code: Path | None = None) -> Server:
    """Start worker 0 of `app` alone, with this process as its supervisord (a worker exits at once when its
    parent is not the one in supervisord.pid): the gate and the hosted app on hypercorn, no nginx. `code`:
    the tree the worker imports the appliance from (PYTHONPATH; default: the installed package)."""
    app.config_path.write_text(to_toml(app.settings))
    settings = load_settings(app.config_path, {})
    prepare_dirs(settings, as_root=False)
    preflight_gate(settings, as_root=False)
    pool.prepare(settings.run_dir, [0])
    ensure_ring(settings, as_root=False)
    supervisord_pidfile(settings.run_dir).write_text(str(os.getpid()))
    env = {**os.environ, "MCP_APPLIANCE_DATA_DIR": str(settings.data_dir)}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    argv = [sys.executable, "-m", "appliance", "--config", str(app.config_path), "worker", "--index", "0"]
    proc = subprocess.Popen(argv, cwd=code or app.base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server(name, f"http://127.0.0.1:{settings.worker_port(0)}{url_path}", proc=proc, headers=dict(FROM_NGINX))


@contextlib.contextmanager
def gate_worker() -> Iterator[Server]:
    """One appliance worker (gate + hosted app on hypercorn) alone: no nginx, no supervisord."""
    app = new_appliance(1)
    started = time.monotonic()
    server = lone_worker(app, "worker with gate")
    assert server.proc is not None
    try:
        wait_until(lambda: call_ok(server.url, "list_notes", {}), 60, "gate worker answers", interval=0.05)
        server.cold_start_s = server.all_ready_s = time.monotonic() - started
        seed(server.url)
        yield server
    finally:
        stop(server.proc)
        shutil.rmtree(app.base, ignore_errors=True)


@contextlib.contextmanager
def appliance(workers: int, add: bool = False, **overrides: Any) -> Iterator[Server]:
    """`mcp-appliance run` with `workers` workers (`add`: hosting bench/add_server.py)."""
    if add:  # the workers import bench.add_server from the repo
        overrides = {**overrides, "env": {"PYTHONPATH": str(ROOT)},
                     "mcp": {**overrides.get("mcp", {}), "app": ADD_APP}}
    app = new_appliance(workers, **overrides)
    started = time.monotonic()
    app.start()
    server = Server(f"appliance N={workers}", app.mcp_url, appliance=app)
    if add:
        server.tool, server.arguments = ADD_CALL[0], dict(ADD_CALL[1])
    try:
        # Polled through /health (cheap): polling MCP calls hard would slow the start it measures.
        def serving(count: int) -> bool:
            with contextlib.suppress(OSError, ValueError):
                status, doc = app.health()
                return doc["workers"]["serving"] >= count and (count < workers or doc["status"] == "ok")
            return False

        wait_until(lambda: serving(1), 60, "a worker serving", interval=0.05)
        server.cold_start_s = time.monotonic() - started
        wait_until(lambda: serving(workers), 60, "every worker serving", interval=0.05)
        server.all_ready_s = time.monotonic() - started
        if add:
            assert call_ok(app.mcp_url, server.tool, server.arguments), "a call through nginx"
        else:
            assert call_ok(app.mcp_url, "list_notes", {}), "a call through nginx"
            seed(app.mcp_url)
        yield server
    finally:
        cleanup(app)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def appliance_processes(app: Appliance) -> list[tuple[str, psutil.Process]]:
    """supervisord and every process under it, by supervisord's program names (nginx: master + workers)."""
    assert app.proc is not None
    root = psutil.Process(app.proc.pid)  # `run` exec'd supervisord
    names = {p.pid: p.name for p in app.supervisor.processes()}
    found = [("supervisord", root)]
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            # Processes supervisord did not start itself (nginx's workers) go by their title.
            found.append((names.get(child.pid) or " ".join(child.cmdline()).strip() or child.name(), child))
    return found


def rss_mib(server: Server) -> list[tuple[str, float, float]]:
    """(process, RSS MiB, PSS MiB): PSS shares each shared page among the processes that map it."""
    rows = []
    for name, proc in server.processes():
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            rows.append((name, info.rss / 2**20, info.pss / 2**20))
    return sorted(rows)


# -- measurements ----------------------------------------------------------------------


def load(server: Server, kind: str, args: argparse.Namespace, rate: float | None = None,
         connections: int | None = None, warm: bool = True, group: Callable[[str], str] | None = None
         ) -> wrk.Figures:
    if warm:  # keep-alive connections, caches, lazily built parts of the app
        wrk.run(server.url, kind, 2, connections or args.connections, server.tool, server.arguments, rate=rate,
                headers=server.headers)
    # A paced run has few requests a second: longer, so that its p99 rests on more than a few dozen.
    seconds = args.moderate_duration if rate else args.duration
    before, wrk_before = cpu_seconds(server, group), resource.getrusage(resource.RUSAGE_CHILDREN)
    figures = wrk.run(server.url, kind, seconds, connections or args.connections, server.tool, server.arguments,
                      rate=rate, headers=server.headers)
    after, wrk_after = cpu_seconds(server, group), resource.getrusage(resource.RUSAGE_CHILDREN)
    # wrk is the only child this process waits for meanwhile: RUSAGE_CHILDREN grows by its CPU time.
    used = {group: after[group] - before.get(group, 0.0) for group in after}
    used["wrk"] = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
    cpu_us = {g: v * 1e6 / max(figures.requests, 1) for g, v in used.items()}
    figures = dataclasses.replace(figures, cpu_us=cpu_us)
    print(f"  {server.name:<28} {kind:<9} {figures.rps:8.0f} req/s  p50 {figures.p50_ms:6.2f} ms  "
          f"p99 {figures.p99_ms:6.2f} ms  errors {figures.errors}  CPU us/request "
          + " ".join(f"{g} {v:.0f}" for g, v in cpu_us.items()), flush=True)
    return figures


def cpu_group(name: str) -> str:
    """Where a process's CPU time is counted: the MCP workers, nginx, or the appliance's other programs."""
    if name.startswith("worker") or name.startswith("baseline"):
        return "workers"
    return "nginx" if name.startswith("nginx") else "other"


def cpu_seconds(server: Server, group: Callable[[str], str] | None = None) -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by the server's processes, by group
    (default: cpu_group)."""
    used = {"workers": 0.0, "nginx": 0.0, "other": 0.0}
    for name, proc in server.processes():
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            key = (group or cpu_group)(name)
            used[key] = used.get(key, 0.0) + times.user + times.system
    return used


def open_sessions(server: Server) -> int:
    """Legacy sessions the workers hold now (their probes say)."""
    assert server.appliance is not None
    return sum(probe["sessions_open"] for probe in probes(server.appliance).values())


def session_memory(server: Server, sessions: int) -> dict[str, float]:
    """Workers' RSS growth per open legacy session (each with its GET stream, like the SDK client)."""
    assert server.appliance is not None
    app = server.appliance

    def workers_rss() -> float:
        return sum(rss for name, rss, _ in rss_mib(server) if name.startswith("worker-"))

    before = workers_rss()

    async def hold() -> float:
        limits = httpx2.Limits(max_connections=sessions + 100, max_keepalive_connections=100)
        async with httpx2.AsyncClient(trust_env=False, limits=limits, timeout=httpx2.Timeout(60, read=None)) as client:
            opened = [RawSession(client, app.mcp_url, n) for n in range(sessions)]
            done, gate = anyio.Event(), anyio.Semaphore(100)
            async with anyio.create_task_group() as streams:

                async def open_one(session: RawSession) -> None:
                    async with gate:
                        await session.open()
                        streams.start_soon(session.hold_stream, done)
                        await session.stream_open.wait()
                        await session.call(0)

                async with anyio.create_task_group() as tg:
                    for session in opened:
                        tg.start_soon(open_one, session)
                after = await anyio.to_thread.run_sync(workers_rss)
                done.set()
            for session in opened:
                async with gate:
                    await session.close()
            return after

    after = anyio.run(hold)
    return {"sessions": sessions, "before_mib": before, "after_mib": after,
            "per_session_kib": (after - before) * 1024 / sessions, "per_1000_mib": (after - before) * 1000 / sessions}


def kill_restart(server: Server) -> dict[str, float]:
    """kill -9 of worker 0: seconds until supervisord respawned it, and until it serves again."""
    assert server.appliance is not None
    app = server.appliance
    name = worker_process_name(0)
    old = app.worker_pid(0)
    probe = f"http://127.0.0.1:{app.settings['workers']['base_port']}/_appliance/health"
    started = time.monotonic()
    os.kill(old, signal.SIGKILL)  # a worker of the appliance this benchmark started
    wait_until(lambda: app.supervisor.process(name).pid not in (0, old), 30, "respawned", interval=0.005)
    respawned = time.monotonic() - started

    def serving() -> bool:
        response = httpx2.get(probe, timeout=1, trust_env=False)
        return response.status_code == 200 and response.json()["pid"] not in (old,)

    wait_until(serving, 30, "serving again", interval=0.01)
    return {"respawned_s": respawned, "serving_s": time.monotonic() - started}


def reload_under_load(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """A rolling reload while wrk sends 2026-07-28 calls: its duration and wrk's error count."""
    assert server.appliance is not None
    app = server.appliance
    seconds = 12 + 8 * app.settings["workers"]["count"]
    result: dict[str, Any] = {}

    def run_wrk() -> None:
        result["wrk"] = wrk.run(server.url, "modern", seconds, args.connections, TOOL, ARGUMENTS)

    thread = threading.Thread(target=run_wrk)
    thread.start()
    time.sleep(2)
    started = time.monotonic()
    out = app.command("reload", timeout=300)
    result["reload_s"] = time.monotonic() - started
    result["reload_ok"] = out.returncode == 0
    thread.join()
    return result


# -- the report ------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().removeprefix("nginx version: ")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0].strip()
    return {
        "CPUs (nproc)": str(os.cpu_count()), "CPU model": cpu,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": platform.release(), "Python": platform.python_version(), "nginx": nginx,
        "mcp SDK": version("mcp"), "hypercorn": version("hypercorn"), "load generator": wrk_version,
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(m: dict[str, Any], args: argparse.Namespace) -> str:
    n = args.workers
    lines = ["# mcp-appliance benchmark", "",
             f"One run of `python -m bench.run --workers {n} --duration {args.duration} --rounds {args.rounds} "
             f"--connections {args.connections}` ({time.strftime('%Y-%m-%d')}). The load generator (wrk) shares the "
             "machine's CPUs with the servers. Every server under test runs for the whole measurement and the runs "
             f"take turns: {args.rounds} rounds; each figure is the median over the rounds, errors are the sum.", "",
             "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m["machine"].items()]
    lines += ["", f"## Throughput and latency (wrk, {args.connections} connections, {args.duration} s per run, "
              f"tools/call `{TOOL}`)", "",
              "| traffic | baseline req/s | p50 ms | p99 ms | errors "
              f"| appliance N={n} req/s | p50 ms | p99 ms | errors | appliance / baseline, by round |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, key in (("(a) 2026-07-28 calls", "modern"), ("(b) legacy stateless calls", "stateless"),
                       ("(c) legacy sessions", "sessions")):
        b, a = m["baseline"][key], m["appliance"][key]
        median, by_round = m["ratios"][key]
        lines.append(f"| {label} | {b.rps:.0f} | {b.p50_ms:.2f} | {b.p99_ms:.2f} | {b.errors} | {a.rps:.0f} | "
                     f"{a.p50_ms:.2f} | {a.p99_ms:.2f} | {a.errors} | **{median:.2f}x** "
                     f"({' / '.join(f'{x:.2f}' for x in by_round)}) |")
    spread = "; ".join(f"{side} {key} {f.rps_range[0]:.0f}-{f.rps_range[1]:.0f}"
                       for side in ("baseline", "appliance") for key, f in m[side].items() if f.rps_range)
    lines += ["", "The ratio is taken round by round (baseline and appliance ran back to back, so a busier moment of "
              "the machine falls on both) and its median is shown; the ratio of the medians above can differ. "
              "(c) counts initialize + initialized once per connection; the sessions scenario runs one wrk thread "
              "per connection so that each connection keeps its own session.", ""]
    if spread:
        lines += [f"Lowest-highest req/s over the rounds: {spread}.", ""]
    fz, (fz_ratio, fz_rounds) = m["frozen"], m["ratios"]["modern/frozen"]
    lines += ["The workers call `gc.freeze()` once the hosted app is built (appliance/worker.py): the SDK's large heap "
              "of import-time objects then stays out of every garbage collection; and they raise the collector's "
              "thresholds (10,000 / 50 / 100), so that it runs about once per call instead of several times. The bare "
              "baseline does neither, as a plain hypercorn deployment would not. The same baseline with those two "
              "calls added (`gc.freeze()` + thresholds), for comparison: "
              f"(a) {fz.rps:.0f} req/s, p50 {fz.p50_ms:.2f} ms, p99 {fz.p99_ms:.2f} ms, {fz.errors} errors; "
              f"appliance / that baseline **{fz_ratio:.2f}x** ({' / '.join(f'{x:.2f}' for x in fz_rounds)}).", ""]
    lines += cpu_budget(m, n)

    g = m["gate"]
    fz = m["frozen"]
    lines += ["## What the gate costs (one process, saturated, (a) 2026-07-28 calls)", "",
              "| process | req/s | p50 ms | p99 ms | errors | CPU us per call |", "|---|---:|---:|---:|---:|---:|"]
    for label, f in (("baseline: hosted app alone", m["baseline"]["modern"]), ("baseline + gc.freeze() + thresholds", fz),
                     ("appliance worker: gate + hosted app (with both)", g["modern"])):
        cpu = f"{f.cpu_us['workers']:.0f}" if f.cpu_us else "-"
        lines.append(f"| {label} | {f.rps:.0f} | {f.p50_ms:.2f} | {f.p99_ms:.2f} | {f.errors} | {cpu} |")
    lines += ["", f"Gate on / off, both with gc.freeze() + thresholds: {ratio(g['modern'].rps, fz.rps)} of the throughput"
              + (f", **{g['modern'].cpu_us['workers'] - fz.cpu_us['workers']:+.0f} us** of CPU per call"
                 if g["modern"].cpu_us and fz.cpu_us else "")
              + " (default settings: request id, host check, body limit, session tags, auth mode none, policy, "
              "audit record per call, metrics). One process taking all 32 connections spends more CPU per call "
              "than the appliance's workers, which take half each (see above).", ""]

    mb, mg, ma = m["moderate"]["baseline"], m["moderate"]["gate"], m["moderate"]["appliance"]
    lines += [f"## Latency at a moderate load ({MODERATE_CONNECTIONS} connections, each paced at {MODERATE_RATE:.0f} "
              f"req/s: {MODERATE_CONNECTIONS * MODERATE_RATE:.0f} req/s in all, (a) 2026-07-28 calls)", "",
              "wrk has no rate limit of its own; the scripts pace each connection with wrk's `delay()` hook "
              "(like wrk2 but without its coordinated-omission correction).", "",
              "| path | req/s | p50 ms | p90 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|"]
    for label, f in (("baseline: hosted app alone", mb), ("one worker with the gate", mg),
                     (f"appliance N={n}: nginx + gate + worker", ma)):
        lines.append(f"| {label} | {f.rps:.0f} | {f.p50_ms:.2f} | {f.p90_ms:.2f} | {f.p99_ms:.2f} | {f.errors} |")
    lines += ["", f"Added by nginx + gate: p50 {ma.p50_ms - mb.p50_ms:+.2f} ms, p99 {ma.p99_ms - mb.p99_ms:+.2f} ms "
              f"(the gate alone: p99 {mg.p99_ms - mb.p99_ms:+.2f} ms).", ""]

    s = m["sessions_memory"]
    lines += ["## Legacy sessions against stateless calls", "",
              f"- Throughput: sessions {m['appliance']['sessions'].rps:.0f} req/s against stateless "
              f"{m['appliance']['stateless'].rps:.0f} req/s through the appliance "
              f"({m['ratios']['sessions/stateless'][0]:.2f}x by round); baseline "
              f"{ratio(m['baseline']['sessions'].rps, m['baseline']['stateless'].rps)}.",
              f"- Memory: {s['sessions']} open sessions (each with its GET stream, as the SDK client keeps one) grew "
              f"the workers' RSS from {s['before_mib']:.0f} to {s['after_mib']:.0f} MiB: "
              f"**{s['per_session_kib']:.0f} KiB per session, {s['per_1000_mib']:.0f} MiB per 1,000 sessions**.", ""]

    lines += ["## Memory (RSS) of every process, after the load", "",
              f"The appliance N={n} still held {m['sessions_left_open']} legacy sessions that the (c) runs opened "
              "and never closed (they expire after mcp.session_idle_timeout); the appliance N=4 served (a) calls "
              "only.", ""]
    for title, rows in m["rss"].items():
        total, shared = sum(r for _, r, _ in rows), sum(p for _, _, p in rows)
        lines += [f"**{title}**: {total:.0f} MiB RSS in all ({shared:.0f} MiB PSS)", "",
                  "| process | RSS MiB | PSS MiB |", "|---|---:|---:|"]
        lines += [f"| {name} | {r:.1f} | {p:.1f} |" for name, r, p in rows]
        lines.append("")

    lines += ["## Cold start", "", "| server | first answer s | all workers ready s |", "|---|---:|---:|"]
    for name, (first, ready) in m["cold_start"].items():
        lines.append(f"| {name} | {first:.2f} | {ready:.2f} |")
    k, r = m["kill"], m["reload"]
    lines += ["", "## Faults and operations", "",
              f"- kill -9 of a worker: supervisord respawned it after {k['respawned_s']:.2f} s; it answered its probe "
              f"again after **{k['serving_s']:.2f} s**.",
              f"- Rolling reload of N={n} under wrk load ({args.connections} connections): {r['reload_s']:.1f} s "
              f"({'ok' if r['reload_ok'] else 'FAILED'}); wrk saw {r['wrk'].requests} calls, "
              f"**{r['wrk'].errors} errors** ({r['wrk'].detail}), {r['wrk'].rps:.0f} req/s on average during it.", ""]

    lines += capacity(m, n)
    lines += ["## Targets (2 CPUs)", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in m["targets"]:
        lines.append(f"| {name} | {measured} | {'yes' if met else '**no**'} |")
    lines += ["", *misses(m, n)]
    return "\n".join(lines)


def cpu_budget(m: dict[str, Any], n: int) -> list[str]:
    """Where the CPU goes per (a) call, and the throughput that the machine's cores allow for it."""
    b, a = m["baseline"]["modern"], m["appliance"]["modern"]
    if not (b.cpu_us and a.cpu_us):
        return []
    cpus = os.cpu_count() or n
    rows = [("baseline (one process)", b), ("baseline + gc.freeze() + thresholds", m["frozen"]), (f"appliance N={n}", a)]
    lines = ["### Where the CPU goes, per (a) call (microseconds of CPU time, all threads)", "",
             "| server | MCP worker(s) | nginx | other appliance programs | wrk | all |", "|---|---:|---:|---:|---:|---:|"]
    for label, f in rows:
        c = f.cpu_us or {}
        lines.append(f"| {label} | {c['workers']:.0f} | {c['nginx']:.0f} | {c['other']:.0f} | {c['wrk']:.0f} | "
                     f"{sum(c.values()):.0f} |")
    ceiling = cpus * 1e6 / sum(a.cpu_us.values())
    lines += ["", f"With every one of the {cpus} cores busy, the appliance's cost per call allows at most "
              f"{ceiling:.0f} calls/s ({ceiling / b.rps:.2f}x the baseline's measured {b.rps:.0f}/s); the baseline is "
              f"one process and so uses at most one core for its MCP work ({b.cpu_us['workers'] * b.rps / 1e6:.2f} "
              "cores measured).", ""]
    return lines


def misses(m: dict[str, Any], n: int) -> list[str]:
    """What the figures say about the targets that were missed."""
    notes = []
    missed = {name for name, _, met in m["targets"] if not met}
    if any(name.startswith("worker RSS") for name in missed):
        bare = m["rss"]["baseline: hosted app alone"][0][1]
        worker = max(r for name, r, _ in m["rss"][f"appliance N={n}"] if name.startswith("worker-"))
        notes.append(f"- Worker RSS: the hosted app alone on hypercorn (no gate, no appliance) takes {bare:.0f} MiB after "
                     f"the same load; the appliance's worker {worker:.0f} MiB. The floor is the MCP SDK's (importing "
                     "`mcp.server.mcpserver` alone is ~65 MiB: pydantic models of every protocol version, the client, "
                     "uvicorn, OpenTelemetry); the gate adds the difference.")
    if any("1.7x" in name for name in missed):
        notes.append("- Throughput ratio: the workers share the cores with wrk and nginx, and each call costs a "
                     "worker the hosted app's CPU plus the gate's; \"Where the CPU goes\" above shows the ceiling that "
                     "this sets, before any scheduling loss.")
    if any("p99 added" in name for name in missed):
        spread = "; ".join(f"{label} {min(v):.2f}-{max(v):.2f} ms" for label, v in m["moderate_p99_rounds"].items())
        notes.append(f"- Moderate-load p99 moves from round to round by more than the target (p99 per round: {spread}): "
                     "single pauses of the machine, a garbage collection or a thread hand-off in the SDK move it by "
                     "milliseconds.")
    return (["## Missed targets", "", *notes, ""] if notes else [])


def capacity(m: dict[str, Any], n: int) -> list[str]:
    """Capacity planning from this run's figures (the README's section is written from it)."""
    cpus = os.cpu_count() or n
    rows = m["rss"]["appliance N=4"]  # (a) calls only: open sessions are counted per 1,000 below
    workers = [r for name, r, _ in rows if name.startswith("worker-")]
    fixed = sum(r for name, r, _ in rows if not name.startswith("worker-"))
    worker = sum(workers) / len(workers)
    modern, stateless, sessions = (m["appliance"][k].rps for k in ("modern", "stateless", "sessions"))
    per_1000 = m["sessions_memory"]["per_1000_mib"]
    return [
        "## Capacity planning", "",
        "From this run (tools/call of a small SQLite read; a slower tool lowers the rates in proportion):", "",
        f"- **Requests per second per CPU core**: {modern / cpus:.0f} (2026-07-28), {stateless / cpus:.0f} (legacy "
        f"stateless), {sessions / cpus:.0f} (inside legacy sessions): the appliance's {n} workers on {cpus} cores, "
        "with the load generator on the same cores. Run one worker per core.",
        f"- **Memory per worker**: {worker:.0f} MiB RSS (the bare SDK app alone: "
        f"{m['rss']['baseline: hosted app alone'][0][1]:.0f} MiB); **fixed part** (supervisord, nginx, admin app, "
        f"event listener): {fixed:.0f} MiB.",
        f"- **Memory per 1,000 open legacy sessions**: {per_1000:.0f} MiB (each with its GET stream open, as SDK "
        "clients keep it; spread over the workers). 2026-07-28 clients hold no session: no such cost.",
        f"- **Sizing**: workers = peak req/s / {modern / cpus:.0f} per core (rounded up, at most one per core); "
        f"memory = {fixed:.0f} MiB + workers x {worker:.0f} MiB + open sessions / 1,000 x {per_1000:.0f} MiB, "
        "plus headroom.", "",
    ]


def targets(m: dict[str, Any], n: int) -> list[tuple[str, str, bool]]:
    ra, rb, rc = (m["ratios"][k][0] for k in ("modern", "stateless", "sessions/stateless"))
    added = m["moderate"]["appliance"].p99_ms - m["moderate"]["baseline"].p99_ms
    # Legacy sessions left open by the (c) runs weigh on the N=n workers; N=4 has served (a) calls only.
    worker_rss = max(r for name, r, _ in m["rss"]["appliance N=4"] if name.startswith("worker-"))
    n4 = sum(r for _, r, _ in m["rss"]["appliance N=4"])
    return [
        (f"appliance N={n} / baseline, (a) 2026-07-28 >= 1.7x", f"{ra:.2f}x", ra >= 1.7),
        (f"appliance N={n} / baseline, (b) legacy stateless >= 1.7x", f"{rb:.2f}x", rb >= 1.7),
        ("(c) sessions >= 0.9x of (b) stateless, through the appliance", f"{rc:.2f}x", rc >= 0.9),
        ("p99 added by nginx + gate at moderate load <= 2 ms", f"{added:+.2f} ms", added <= 2.0),
        ("worker RSS <= 80 MiB (N=4 after (a) load; sessions are counted per 1,000 below)", f"{worker_rss:.1f} MiB",
         worker_rss <= 80),
        ("whole appliance N=4 <= 450 MiB", f"{n4:.0f} MiB", n4 <= 450),
        ("cold start to ready, N=4 <= 4 s", f"{m['cold_start']['appliance N=4'][1]:.2f} s",
         m["cold_start"]["appliance N=4"][1] <= 4.0),
        ("kill -9 of a worker: serving again <= 2 s", f"{m['kill']['serving_s']:.2f} s", m["kill"]["serving_s"] <= 2.0),
        ("rolling reload under load: zero failed calls", str(m["reload"]["wrk"].errors), m["reload"]["wrk"].errors == 0),
    ]


def measure_rounds(plan: list[tuple[str, Server, str, float | None, int | None]], args: argparse.Namespace,
                   group: Callable[[str], str] | None = None) -> dict[str, list[wrk.Figures]]:
    """Run every (label, server, kind, rate, connections) once per round, interleaved in time so
    that noise from the machine falls on all alike: each label's runs, round by round."""
    runs: dict[str, list[wrk.Figures]] = {label: [] for label, *_ in plan}
    for n in range(args.rounds):
        print(f"round {n + 1} of {args.rounds}", flush=True)
        for label, server, kind, rate, connections in plan:
            runs[label].append(load(server, kind, args, rate, connections, warm=n == 0, group=group))
    return runs


def paired_ratio(runs: dict[str, list[wrk.Figures]], a: str, b: str) -> tuple[float, list[float]]:
    """req/s of `a` over `b`, round by round (they ran back to back), and the median of those."""
    ratios = [x.rps / y.rps for x, y in zip(runs[a], runs[b], strict=True)]
    return statistics.median(ratios), ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="appliance workers (default: CPU count)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median run counts (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections for the saturating runs (default 32)")
    parser.add_argument("--moderate-duration", type=int, default=30,
                        help="seconds per paced, moderate-load run (default 30)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"),
                        help="the Markdown report (default bench/RESULTS.md)")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--full", action="store_true",
                        help="also the whole get_note report (memory, sessions, cold start, faults; ~15 min), which "
                             "rewrites --out before the add server's section is put back")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    from bench import ratios  # it imports this module's helpers

    if not args.full:
        return ratios.run(args)
    n = args.workers
    m: dict[str, Any] = {"machine": machine(), "rss": {}, "cold_start": {}}
    idle = os.getloadavg()[0]
    m["machine"]["load average (1 min) before the run"] = f"{idle:.2f}"
    print(json.dumps(m["machine"]), flush=True)
    if idle > 1.0:
        print(f"warning: the machine is busy (load average {idle:.2f}): other processes take CPU from the "
              "servers under test and the figures will say so", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        # Started one after the other (each cold start on a quiet machine), then measured in turns.
        base = stack.enter_context(baseline("baseline"))
        base_sl = stack.enter_context(baseline("baseline, stateless", stateless=True))
        frozen = stack.enter_context(baseline("baseline + gc.freeze() + thresholds", gc_freeze=True))
        gate = stack.enter_context(gate_worker())
        app = stack.enter_context(appliance(n))
        app_sl = stack.enter_context(appliance(n, mcp={"sessions": False}))
        app_sl.name += ", stateless"
        for server in (base, gate, app):
            m["cold_start"][server.name] = (server.cold_start_s, server.all_ready_s)
        runs = measure_rounds([
            ("b/modern", base, "modern", None, None), ("a/modern", app, "modern", None, None),
            ("f/modern", frozen, "modern", None, None),
            ("b/sessions", base, "sessions", None, None), ("a/sessions", app, "sessions", None, None),
            ("b/stateless", base_sl, "stateless", None, None), ("a/stateless", app_sl, "stateless", None, None),
            ("g/modern", gate, "modern", None, None),
            ("b/moderate", base, "modern", MODERATE_RATE, MODERATE_CONNECTIONS),
            ("g/moderate", gate, "modern", MODERATE_RATE, MODERATE_CONNECTIONS),
            ("a/moderate", app, "modern", MODERATE_RATE, MODERATE_CONNECTIONS),
        ], args)
        r = {label: wrk.median(figures) for label, figures in runs.items()}
        m["ratios"] = {k: paired_ratio(runs, f"a/{k}", f"b/{k}") for k in ("modern", "stateless", "sessions")}
        m["ratios"]["sessions/stateless"] = paired_ratio(runs, "a/sessions", "a/stateless")
        m["ratios"]["modern/frozen"] = paired_ratio(runs, "a/modern", "f/modern")
        m["frozen"] = r["f/modern"]
        m["baseline"] = {k: r[f"b/{k}"] for k in ("modern", "sessions", "stateless")}
        m["appliance"] = {k: r[f"a/{k}"] for k in ("modern", "sessions", "stateless")}
        m["gate"] = {"modern": r["g/modern"]}
        m["moderate"] = {"baseline": r["b/moderate"], "gate": r["g/moderate"], "appliance": r["a/moderate"]}
        m["moderate_p99_rounds"] = {side: [f.p99_ms for f in runs[f"{key}/moderate"]]
                                    for side, key in (("baseline", "b"), ("gate", "g"), ("appliance", "a"))}
        m["rss"]["baseline: hosted app alone"] = rss_mib(base)
        m["rss"][f"appliance N={n}"] = rss_mib(app)
        m["sessions_left_open"] = open_sessions(app)

        m["sessions_memory"] = session_memory(app, SESSIONS_HELD)
        print(f"  sessions: {m['sessions_memory']['per_session_kib']:.0f} KiB each", flush=True)
        m["kill"] = kill_restart(app)
        print(f"  kill -9: serving again after {m['kill']['serving_s']:.2f} s", flush=True)
        app.appliance.wait_healthy(timeout=60, workers=n)  # type: ignore[union-attr]
        m["reload"] = reload_under_load(app, args)
        print(f"  reload: {m['reload']['reload_s']:.1f} s, wrk errors {m['reload']['wrk'].errors}", flush=True)

    with appliance(4) as srv:
        m["cold_start"]["appliance N=4"] = (srv.cold_start_s, srv.all_ready_s)
        load(srv, "modern", args)  # warm, as in service
        m["rss"]["appliance N=4"] = rss_mib(srv)

    m["targets"] = targets(m, n)
    text = report(m, args)
    print("\n" + text)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(m, default=lambda o: o.__dict__, indent=1))
    return ratios.run(args)


if __name__ == "__main__":
    sys.exit(main())
