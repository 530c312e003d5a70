"""Health probes while /metrics is flooded: how long /health/ready and /health/live take.

Kubernetes gives a probe 3 s (conf/k8s/statefulset.yaml); a flood of unauthenticated
/metrics requests must not push the probes past it. Starts one appliance (like the tests
do), then for each flood — paced at --rate req/s, and wrk as fast as it goes — samples
both probes every 100 ms and reports their latency and the /metrics requests/s served.
The floods go to the admin app's own loopback port (what nginx's per-address limit cannot
stop: many addresses) and through nginx with the address limit on.

Usage: python -m bench.probe_latency [--workers 2] [--seconds 8] [--rate 60]
Needs wrk (Debian: apt-get install wrk); everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.harness starts appliances the way the tests do

from tests.harness import Appliance, http, new_appliance, running  # noqa: E402


def sample_probes(base: str, stop: threading.Event, out: dict[str, list[float]]) -> None:
    """Time /health/ready and /health/live every 100 ms until `stop` (a failure counts as 10 s)."""
    with httpx2.Client(trust_env=False, timeout=10) as client:
        while not stop.is_set():
            for path in ("/health/ready", "/health/live"):
                started = time.perf_counter()
                try:
                    ok = client.get(base + path).status_code == 200
                except httpx2.HTTPError:
                    ok = False
                out[path].append(time.perf_counter() - started if ok else 10.0)
            stop.wait(0.1)


def paced_flood(url: str, rate: float, seconds: float) -> tuple[int, int]:
    """`rate` GETs of `url` per second for `seconds`, each on its own thread; (answered 200, sent)."""
    ok = sent = 0
    lock = threading.Lock()

    def one() -> None:
        nonlocal ok
        try:
            status = http("GET", url, timeout=30)[0]
        except OSError:
            return
        if status == 200:
            with lock:
                ok += 1

    threads = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        t = threading.Thread(target=one, daemon=True)
        t.start()
        threads.append(t)
        sent += 1
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    for t in threads:
        t.join(60)
    return ok, sent


def wrk_flood(url: str, seconds: float, connections: int = 64) -> tuple[float, int]:
    """wrk GETs of `url` as fast as they go: (requests/s, non-2xx/3xx answers)."""
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:.0f}s", "--timeout", "10s", url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out)[1])  # type: ignore[index]
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    return rps, int(bad[1]) if bad else 0


def under_flood(app: Appliance, flood: Callable[[], str]) -> str:
    """Run `flood` while sampling the probes through nginx; one Markdown row."""
    samples: dict[str, list[float]] = {"/health/ready": [], "/health/live": []}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_probes, args=(app.url, stop, samples))
    sampler.start()
    try:
        served = flood()
    finally:
        stop.set()
        sampler.join(30)
    cells = []
    for path in ("/health/ready", "/health/live"):
        values = sorted(samples[path]) or [float("nan")]
        cells.append(f"{statistics.median(values) * 1000:.0f} / {values[-1] * 1000:.0f}")
    return f"| {served} | {' | '.join(cells)} | {len(samples['/health/ready'])} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=60.0)
    args = parser.parse_args()
    # No exemption for loopback: the nginx rows show the per-address limit at work.
    with running(new_appliance(args.workers, limits={"exempt": []})) as app:
        admin = f"http://127.0.0.1:{app.settings['admin']['port']}/metrics"
        edge = app.url + "/metrics"
        rows = ["| flood of /metrics | served | /health/ready p50 / max ms | /health/live p50 / max ms | samples |",
                "|---|---|---|---|---|"]
        rows.append("| none " + under_flood(app, lambda: time.sleep(args.seconds / 2) or "-"))
        for name, url in (("admin port", admin), ("nginx", edge)):
            def paced(url: str = url) -> str:
                ok, sent = paced_flood(url, args.rate, args.seconds)
                return f"{ok}/{sent} answered 200"

            def unpaced(url: str = url) -> str:
                rps, bad = wrk_flood(url, args.seconds)
                return f"{rps:.0f} req/s ({bad} not 2xx)"

            rows.append(f"| {args.rate:.0f} req/s paced, {name} " + under_flood(app, paced))
            rows.append(f"| wrk -c64, {name} " + under_flood(app, unpaced))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
