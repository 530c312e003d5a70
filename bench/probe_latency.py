"""Health probes while /metrics is flooded: how long /health/ready and /health/live take.

Kubernetes gives a probe 3 s (conf/k8s/statefulset.yaml); a flood of unauthenticated
/metrics requests must not push the probes past it. Starts one appliance (like the tests
do), then for each flood — paced at --rate req/s, and wrk as fast as it goes — samples
both probes every 100 ms and reports their latency and the /metrics requests/s served.
The floods go to the admin app's own loopback port (what nginx's per-address limit cannot
stop: many addresses) and through nginx with the address limit on.

Usage: python -m bench.probe_latency [--workers 2] [--seconds 8] [--rate 150]
(150 req/s is above what one admin app could scrape on 2 cores before scrapes were shared.)
Needs wrk (Debian: apt-get install wrk); everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable

# Run from the repository root (python -m bench.probe_latency): tests.harness starts
# appliances the way the tests do.
from tests.harness import Appliance, new_appliance, running
from tests.integration.flood import paced_gets, time_probes


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
    failed: list[str] = []
    stop = threading.Event()
    sampler = threading.Thread(target=time_probes, args=(app.url, tuple(samples), stop, samples, failed))
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
    return f"| {served} | {' | '.join(cells)} | {len(samples['/health/ready'])} | {len(failed)} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=150.0)
    args = parser.parse_args()
    # No exemption for loopback: the nginx rows show the per-address limit at work.
    with running(new_appliance(args.workers, limits={"exempt": []})) as app:
        admin = f"http://127.0.0.1:{app.settings['admin']['port']}/metrics"
        edge = app.url + "/metrics"
        rows = ["| flood of /metrics | served | /health/ready p50 / max ms | /health/live p50 / max ms | samples "
                "| probes failed |", "|---|---|---|---|---|---|"]
        rows.append("| none " + under_flood(app, lambda: time.sleep(args.seconds / 2) or "-"))
        for name, url in (("admin port", admin), ("nginx", edge)):
            def paced(url: str = url) -> str:
                ok, sent = paced_gets(url, args.rate, args.seconds)
                return f"{ok}/{sent} answered 200"

            def unpaced(url: str = url) -> str:
                rps, bad = wrk_flood(url, args.seconds)
                return f"{rps:.0f} req/s ({bad} not 2xx)"

            rows.append(f"| {args.rate:.0f} req/s paced, {name} " + under_flood(app, paced))
            rows.append(f"| wrk -c64, {name} " + under_flood(app, unpaced))
        # Many clients at once: a shared scrape answers all that arrived before it started.
        rows.append("| wrk -c256, admin port " + under_flood(app, lambda: "{:.0f} req/s ({} not 2xx)".format(
            *wrk_flood(admin, args.seconds, connections=256))))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
