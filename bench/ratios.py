"""The appliance against what a user would run instead, with the smallest real server (issue 12).

The `add` tool (bench/add_server.py) costs the SDK little, so what nginx and the gate add
shows. Servers, all up for the whole measurement and measured in turns (A/B/A/B, the ratio
taken round by round): the bare app in one hypercorn process (JSON answers; JSON + gc.freeze();
the SDK's defaults, SSE answers), `hypercorn -w 2` of it (JSON), and the appliance with N
workers answering JSON (mcp.json_response = true), with its defaults ("auto"), and with one
worker. Besides req/s, the CPU time per call of every process (robust when others share the
cores), and from it a model of calls/s on more cores.

Usage (from the repo root; `python -m bench.run` runs it): python -m bench.ratios [--workers 2] [--duration 10]
    [--rounds 3] [--connections 32] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from appliance.render import nginx_processes
from bench import wrk
from bench.run import ADD_APP, ROOT, appliance, baseline, machine, measure_rounds, paired_ratio

BEGIN, END = "<!-- bench.ratios: begin -->", "<!-- bench.ratios: end -->"
CORES = (4, 8, 16, 64)


def process_group(name: str) -> str:
    """Where a process's CPU time is counted, one group per appliance program."""
    if name.startswith("worker") or name.startswith("bare") or name.startswith("hypercorn"):
        return "workers"
    for program in ("nginx", "supervisord", "admin", "events"):
        if name.startswith(program):
            return program
    return "other"


#: (label, what it is, numerator, denominator, target or None).
RATIOS = [
    ("json-modern", "2026-07-28 calls, JSON answers on both sides: appliance N / bare process", "app-json/modern",
     "bare-json/modern", 1.7),
    ("json-sessions", "calls in legacy sessions, JSON on both sides: appliance N / bare process", "app-json/sessions",
     "bare-json/sessions", 1.7),
    ("json-frozen", "2026-07-28, JSON: appliance N / bare process with gc.freeze() + thresholds", "app-json/modern",
     "frozen-json/modern", 1.5),
    ("json-hw2", "2026-07-28, JSON: appliance N / `hypercorn -w 2` of the same app", "app-json/modern",
     "hw2-json/modern", 0.85),
    ("defaults", "2026-07-28, each side's defaults: appliance (json_response \"auto\") / bare (SSE)", "app-auto/modern",
     "bare-sse/modern", 1.7),
    ("auto-json", "2026-07-28, appliance N: defaults (\"auto\") / json_response = true", "app-auto/modern",
     "app-json/modern", None),
    ("n-over-1", "2026-07-28, JSON: appliance N / appliance N=1", "app-json/modern", "app1-json/modern", None),
]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    n = args.workers
    with contextlib.ExitStack() as stack:
        bare = stack.enter_context(baseline("bare, JSON", app=ADD_APP, json_response=True))
        frozen = stack.enter_context(baseline("bare, JSON, gc.freeze() + thresholds", app=ADD_APP, json_response=True,
                                              gc_freeze=True))
        sse = stack.enter_context(baseline("bare, SDK defaults (SSE)", app=ADD_APP))
        hw2 = stack.enter_context(baseline("hypercorn -w 2, JSON", app=ADD_APP, json_response=True, workers=2))
        app_json = stack.enter_context(appliance(n, add=True, mcp={"json_response": True}))
        app_json.name += ", JSON"
        app_auto = stack.enter_context(appliance(n, add=True))
        app_auto.name += ", defaults"
        app1 = stack.enter_context(appliance(1, add=True, mcp={"json_response": True}))
        app1.name += ", JSON"
        plan: list[tuple[str, Any, str, float | None, int | None]] = [
            ("bare-json/modern", bare, "modern", None, None), ("app-json/modern", app_json, "modern", None, None),
            ("frozen-json/modern", frozen, "modern", None, None), ("hw2-json/modern", hw2, "modern", None, None),
            ("bare-sse/modern", sse, "modern", None, None), ("app-auto/modern", app_auto, "modern", None, None),
            ("bare-json/sessions", bare, "sessions", None, None),
            ("app-json/sessions", app_json, "sessions", None, None),
            ("app1-json/modern", app1, "modern", None, None),
        ]
        names = {label: server.name for label, server, *_ in plan}
        runs = measure_rounds(plan, args, group=process_group)
    return {"runs": runs, "names": names,
            "ratios": {key: paired_ratio(runs, a, b) for key, _, a, b, _ in RATIOS}}


def cpu_table(m: dict[str, Any]) -> list[str]:
    groups = ("workers", "nginx", "supervisord", "admin", "events", "wrk")
    lines = ["| server, traffic | req/s (median; lowest-highest) | p50 ms | p99 ms | errors | "
             + " | ".join(groups) + " | all but wrk |", "|---|---:|---:|---:|---:|" + "---:|" * (len(groups) + 1)]
    for label, figures in m["runs"].items():
        f = wrk.median(figures)
        cpu = {g: statistics.median((r.cpu_us or {}).get(g, 0.0) for r in figures) for g in groups}
        low, high = f.rps_range or (f.rps, f.rps)
        lines.append(f"| {m['names'][label]}, {label.split('/')[1]} | {f.rps:.0f} ({low:.0f}-{high:.0f}) | "
                     f"{f.p50_ms:.2f} | {f.p99_ms:.2f} | {f.errors} | " + " | ".join(f"{cpu[g]:.0f}" for g in groups)
                     + f" | {sum(v for g, v in cpu.items() if g != 'wrk'):.0f} |")
    return lines


def cpu_of(m: dict[str, Any], label: str) -> dict[str, float]:
    figures = m["runs"][label]
    keys = {k for r in figures for k in (r.cpu_us or {})}
    return {k: statistics.median((r.cpu_us or {}).get(k, 0.0) for r in figures) for k in keys}


def model(m: dict[str, Any], n: int) -> list[str]:
    """calls/s on C cores from the CPU each process spends per call (see the assumptions printed)."""
    c = cpu_of(m, "app-json/modern")
    one = cpu_of(m, "app1-json/modern")
    rps = wrk.median(m["runs"]["app-json/modern"]).rps
    per_call = sum(c.get(p, 0.0) for p in ("workers", "nginx", "supervisord", "events"))
    supervisord = c.get("supervisord", 0.0)
    # The admin app probes every worker and merges their metric files on a timer: CPU per second, not per call.
    admin_cores = c.get("admin", 0.0) * rps / 1e6
    lines = [
        f"Per 2026-07-28 `add` call (JSON), microseconds of CPU: N={n}: workers {c.get('workers', 0):.0f}, nginx "
        f"{c.get('nginx', 0):.0f}, supervisord {supervisord:.1f} (nginx's access log through its pipe), event "
        f"listener {c.get('events', 0):.1f}; the admin app {admin_cores * 1000:.1f} ms of CPU per second at N={n} "
        f"({c.get('admin', 0):.1f} us per call at {rps:.0f} calls/s). N=1: workers {one.get('workers', 0):.0f}, "
        f"nginx {one.get('nginx', 0):.0f}.",
        "",
        "Model: calls/s(C) = min((C - admin(C)) x 10^6 / (workers + nginx + supervisord + events us per call), "
        "nginx processes(C) x 10^6 / nginx's us per call, 10^6 / supervisord's us per call), admin(C) = the admin "
        "app's cores at N, times C / N. Assumptions: one worker per core and nginx's default of one worker process "
        "per 4 cores (`http.nginx_workers` = 0; an nginx process uses one core at most); the clients on other "
        f"machines (wrk's CPU left out); the per-call CPU measured at N={n} holds at every N (the workers share only "
        "the rate table, one fcntl lock per call of a non-exempt client, and the metrics directory, one file each); "
        "supervisord is one process reading the one log pipe of nginx and the workers.",
        "", "| cores | calls/s | nginx processes | their limit | supervisord's own limit | first limit |",
        "|---:|---:|---:|---:|---:|---|"]
    nginx = c.get("nginx", 0.0)
    for cores in CORES:
        busy = admin_cores * cores / n
        total = (cores - busy) * 1e6 / per_call if per_call else 0.0
        processes = nginx_processes(cores)
        edge = processes * 1e6 / nginx if nginx > 0.05 else float("inf")
        single = 1e6 / supervisord if supervisord > 0.05 else float("inf")
        first = min((total, "the cores (workers, then nginx)"), (edge, "nginx's processes"),
                    (single, "supervisord (log pipe)"))
        lines.append(f"| {cores} | {first[0]:.0f} | {processes} | {edge:.0f} | {single:.0f} | {first[1]} |")
    return lines


def report(m: dict[str, Any], args: argparse.Namespace) -> str:
    n = args.workers
    mach = m["machine"]
    lines = [BEGIN, "", "## The `add` server: the appliance against a bare process (issue 12)", "",
             f"`python -m bench.run --workers {n} --duration {args.duration} --rounds {args.rounds} --connections "
             f"{args.connections}` ({mach.get('date', '')}; {mach.get('CPUs (nproc)', '')} CPUs, {mach.get('CPU model', '')}; "
             f"load average before the run {mach.get('load average (1 min) before the run', '?')}, after "
             f"{m.get('load_after', '?')}). wrk on the same cores. Ratios taken round by round (A/B/A/B), their "
             "median shown with each round's.", "",
             "| ratio | median | by round | target |", "|---|---:|---|---:|"]
    for key, what, _, _, target in RATIOS:
        ratio, rounds = m["ratios"][key]
        met = "" if target is None else (f"{target}x {'met' if ratio >= target else '**missed**'}")
        lines.append(f"| {what} | **{ratio:.2f}x** | {' / '.join(f'{r:.2f}' for r in rounds)} | {met} |")
    lines += ["", "### CPU microseconds per call, by process (median over the rounds)", "", *cpu_table(m), "",
              "### Scaling beyond this machine", "", *model(m, n), "", END]
    return "\n".join(lines)


def write(out: Path, section: str) -> None:
    """Put the section into `out` in place of the previous one (or at its end): the rest stays."""
    text = out.read_text() if out.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    out.write_text(text)


def run(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    m: dict[str, Any] = {"machine": machine()}
    m["machine"]["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    m["machine"]["load average (1 min) before the run"] = f"{os.getloadavg()[0]:.2f}"
    m.update(measure(args))
    m["load_after"] = f"{os.getloadavg()[0]:.2f}"
    section = report(m, args)
    print("\n" + section)
    write(Path(args.out), section)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
