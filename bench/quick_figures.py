"""Quick figures for the core appliance (issue 2's closing note); not a test, not the full benchmark.

Measures, on loopback only and bounded in time:
  1. startup: `mcp-appliance run` until /health says ok, for N=1 and N=4 workers;
  2. memory: RSS of every process of a running N=4 appliance;
  3. throughput: tools/call as 2026-07-28 POSTs (wrk + a Lua script) through nginx to an
     N=2 appliance, and straight to one of its workers' loopback port, in the same run.

Usage: python bench/quick_figures.py [--duration 5] [--connections 16] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness

from tests.harness import Appliance, cleanup, http, new_appliance, wait_until  # noqa: E402
from tests.integration.clients import modern_request  # noqa: E402

TOOL = "get_note"


def startup_seconds(workers: int) -> tuple[float, Appliance]:
    """Seconds from starting `mcp-appliance run` until /health is ok with every worker serving."""
    appliance = new_appliance(workers)
    started = time.monotonic()
    appliance.start()

    def ok() -> bool:
        status, doc = appliance.health()
        return status == 200 and doc["status"] == "ok" and doc["workers"]["serving"] == workers

    wait_until(ok, 120, f"N={workers} appliance healthy", interval=0.02)
    return time.monotonic() - started, appliance


def process_memory(appliance: Appliance) -> list[dict[str, Any]]:
    """RSS of supervisord and every process under it, named by supervisord's program names."""
    assert appliance.proc is not None
    root = psutil.Process(appliance.proc.pid)  # `run` exec'd supervisord: same pid
    names = {p.pid: p.name for p in appliance.supervisor.processes()}
    rows = [{"process": "supervisord", "pid": root.pid, "rss_mib": root.memory_info().rss / 2**20}]
    for child in root.children(recursive=True):
        try:
            rss = child.memory_info().rss / 2**20
            # Processes supervisord did not start itself (nginx's workers) go by their title.
            name = names.get(child.pid) or " ".join(child.cmdline()).strip() or child.name()
        except psutil.NoSuchProcess:
            continue
        rows.append({"process": name, "pid": child.pid, "rss_mib": rss})
    return sorted(rows, key=lambda r: r["process"])


def wrk_script(directory: Path, body: bytes, headers: dict[str, str]) -> Path:
    """A wrk Lua script that sends one fixed 2026-07-28 request."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path = directory / "tools_call.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(url: str, script: Path, duration: int, connections: int) -> dict[str, Any]:
    """Run wrk against `url`; requests/s, latency percentiles and non-2xx count."""
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{duration}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=duration + 60, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return {"requests_per_s": rps, "non_2xx": int(bad[1]) if bad else 0, "socket_errors": errors[1] if errors else "",
            "p50": latency.get("50"), "p99": latency.get("99")}


def throughput(duration: int, connections: int) -> dict[str, Any]:
    """tools/call req/s through nginx (N=2) versus one worker directly, same appliance, same run."""
    appliance = new_appliance(2)
    try:
        appliance.start()
        appliance.wait_healthy(timeout=60, workers=2)
        headers, body = modern_request("tools/call", "add_note", {"name": "add_note",
                                                                    "arguments": {"title": "bench", "body": "b"}})
        status, _, raw = http("POST", appliance.mcp_url, body, headers)
        assert status == 200 and b'"isError":false' in raw.replace(b" ", b""), raw
        headers, body = modern_request("tools/call", TOOL, {"name": TOOL, "arguments": {"id": 1}})
        worker_port = appliance.settings["workers"]["base_port"]  # worker 0's own loopback port
        direct_url = appliance.mcp_url.replace(f":{appliance.port}/", f":{worker_port}/")
        for url in (appliance.mcp_url, direct_url):  # the call really succeeds on both paths
            status, _, raw = http("POST", url, body, headers)
            assert status == 200 and b'"isError":false' in raw.replace(b" ", b""), (url, raw)
        with tempfile.TemporaryDirectory() as tmp:
            script = wrk_script(Path(tmp), body, headers)
            wrk(appliance.mcp_url, script, 1, connections)  # warm-up: keepalive connections, caches
            via_nginx = wrk(appliance.mcp_url, script, duration, connections)
            direct = wrk(direct_url, script, duration, connections)
        return {"tool": TOOL, "connections": connections, "duration_s": duration,
                "appliance_n2_via_nginx": via_nginx, "one_worker_direct": direct,
                "ratio": round(via_nginx["requests_per_s"] / direct["requests_per_s"], 2)}
    finally:
        cleanup(appliance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    figures: dict[str, Any] = {"cpus": psutil.cpu_count(), "startup_s": {}}
    for workers in (1, 4):
        seconds, appliance = startup_seconds(workers)
        try:
            figures["startup_s"][f"N={workers}"] = round(seconds, 2)
            print(f"startup N={workers}: {seconds:.2f} s to /health ok")
            if workers == 4:
                figures["rss_n4"] = process_memory(appliance)
        finally:
            cleanup(appliance)
    total = sum(r["rss_mib"] for r in figures["rss_n4"])
    print(f"\nRSS of a running N=4 appliance ({total:.0f} MiB in all):")
    for row in figures["rss_n4"]:
        print(f"  {row['process']:<34} {row['pid']:>7} {row['rss_mib']:7.1f} MiB")

    figures["throughput"] = t = throughput(args.duration, args.connections)
    print(f"\ntools/call ({TOOL}, 2026-07-28 POSTs, wrk -c{args.connections}, {args.duration}s each):")
    for label, key in (("appliance N=2 via nginx", "appliance_n2_via_nginx"), ("one worker, direct", "one_worker_direct")):
        r = t[key]
        print(f"  {label:<24} {r['requests_per_s']:8.0f} req/s  p50 {r['p50']}  p99 {r['p99']}  "
              f"non-2xx {r['non_2xx']}{'  socket errors ' + r['socket_errors'] if r['socket_errors'] else ''}")
    print(f"  ratio {t['ratio']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
