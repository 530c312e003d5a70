"""Failover figures: a worker that hangs (SIGSTOP) under constant load of 2026-07-28 tool calls.

Measures, on one appliance with 2 workers and the default workers.hang_timeout (30 s):
  1. time from the freeze until no pool slot leads to the frozen worker (several freezes);
  2. a hang of 5 s (SIGCONT after 5 s): calls failed, calls answered, time back in the pool;
  3. a hang of 60 s: the watchdog restarts the worker; calls failed, time to restart and rejoin;
  4. A/B/A/B: windows of a healthy single worker (the other one drained) alternating with
     windows of a freeze (from 3 s after it to 3 s + window), each freeze compared with the
     mean of the single-worker windows on either side of it: the rate of one worker swings by
     10-15 % between windows here, so only neighbours are compared.
The load: 8 clients sending tool calls back to back, each giving up on a call after 5 s (as
wrk's timeout does) and sending the next one. Timings belong here, not in the tests.

Usage: python -m bench.failover [--freezes 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import anyio

# Run from the repository root (python -m bench.failover): it drives appliances the way the tests do.
from appliance import pool
from tests.harness import new_appliance, running, wait_until
from tests.integration.clients import probes
from tests.integration.test_failover import CallLoad

CLIENT_TIMEOUT = 5.0


def in_pool(app: Any, index: int) -> bool:
    return index in pool.members(app.run_dir) and probes(app)[index].get("ok") is True


async def freeze_to_out(app: Any, load: CallLoad) -> tuple[float, float]:
    """(seconds until out of the pool, seconds from SIGCONT until back) for one 3 s freeze of worker 1."""
    pid = app.worker_pid(1)
    os.kill(pid, signal.SIGSTOP)
    froze = time.monotonic()
    try:
        while 1 in pool.members(app.run_dir):
            await anyio.sleep(0.01)
        out = time.monotonic() - froze
        await anyio.sleep(max(0.0, froze + 3 - time.monotonic()))
    finally:
        os.kill(pid, signal.SIGCONT)
    thawed = time.monotonic()
    await anyio.to_thread.run_sync(lambda: wait_until(lambda: in_pool(app, 1), 30, "back in the pool", 0.01))
    back = time.monotonic() - thawed
    await load.wait_for_calls(200)
    return out, back


async def hang(app: Any, load: CallLoad, seconds: float) -> dict[str, float]:
    """SIGSTOP worker 1 for `seconds` (or until the watchdog restarts it) and count what the clients saw."""
    pid = app.worker_pid(1)
    start_calls = len(load.calls)
    os.kill(pid, signal.SIGSTOP)
    froze = time.monotonic()
    figures: dict[str, float] = {}
    try:
        while time.monotonic() - froze < seconds:
            current = app.worker_pid(1)
            if current not in (0, pid) and "restarted" not in figures:
                figures["restarted"] = time.monotonic() - froze
            if "restarted" in figures and await anyio.to_thread.run_sync(in_pool, app, 1):
                figures["rejoined"] = time.monotonic() - froze
                break
            await anyio.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    ended = time.monotonic()
    await anyio.to_thread.run_sync(lambda: wait_until(lambda: in_pool(app, 1), 60, "back in the pool", 0.02))
    figures["back_after_freeze"] = time.monotonic() - froze
    figures["back_after_end"] = time.monotonic() - ended
    if "restarted" in figures:
        figures["rejoined_after_restart"] = figures.get("rejoined", figures["back_after_freeze"]) - figures["restarted"]
    await load.wait_for_calls(500)
    calls = [c for c in load.calls[start_calls:] if c.sent >= froze - 1]
    ended = min(ended, froze + seconds)
    sent_during = [c for c in calls if c.sent < ended]
    figures["calls"] = len(sent_during)
    figures["failed"] = sum(1 for c in sent_during if not c.ok)
    figures["failed_after_3s"] = sum(1 for c in sent_during if not c.ok and c.sent >= froze + 3)
    figures["ok_per_s_from_3s"] = sum(1 for c in sent_during if c.ok and c.sent >= froze + 3) / max(0.1, ended - froze - 3)
    kinds: dict[str, int] = {}
    for c in sent_during:
        if not c.ok:
            kinds[c.status] = kinds.get(c.status, 0) + 1
    figures["kinds"] = kinds  # type: ignore[assignment]
    return figures


async def single_worker_rate(app: Any, load: CallLoad, seconds: float = 10) -> float:
    """Calls/s answered with worker 1 out of the pool (as for a drain) and nginx's connections to it gone."""
    pool.assign(app.run_dir, [0])
    try:
        await anyio.sleep(pool.UPSTREAM_IDLE_TIMEOUT + 1)
        start = time.monotonic()
        await anyio.sleep(seconds)
        return load.succeeded(start, start + seconds) / seconds
    finally:
        pool.assign(app.run_dir, [0, 1])
        await anyio.sleep(pool.UPSTREAM_IDLE_TIMEOUT + 1)


async def frozen_rate(app: Any, load: CallLoad, seconds: float = 10) -> float:
    """Calls/s answered from 3 s after a SIGSTOP of worker 1 for `seconds` (below hang_timeout: no restart)."""
    pid = app.worker_pid(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        await anyio.sleep(3)
        start = time.monotonic()
        await anyio.sleep(seconds)
        return load.succeeded(start, start + seconds) / seconds
    finally:
        os.kill(pid, signal.SIGCONT)
        await anyio.to_thread.run_sync(lambda: wait_until(lambda: in_pool(app, 1), 30, "back in the pool", 0.02))
        await anyio.sleep(pool.UPSTREAM_IDLE_TIMEOUT + 1)


async def interleaved(app: Any, load: CallLoad, rounds: int) -> list[dict[str, float]]:
    """A/B/A/B: single, freeze, single, freeze, …, single; each freeze with the mean of its two neighbours."""
    singles = [await single_worker_rate(app, load)]
    pairs = []
    for _ in range(rounds):
        frozen = await frozen_rate(app, load)
        singles.append(await single_worker_rate(app, load))
        neighbours = (singles[-2] + singles[-1]) / 2
        pairs.append({"frozen": frozen, "single": neighbours, "ratio": frozen / neighbours})
    return pairs


async def measure(freezes: int, rounds: int) -> dict[str, Any]:
    app = new_appliance(2)
    results: dict[str, Any] = {}
    with running(app):
        load = CallLoad(app.mcp_url, loops=8, timeout=CLIENT_TIMEOUT, limit=3600)
        async with load.running():
            await load.wait_for_calls(500)
            start = time.monotonic()
            await anyio.sleep(5)
            results["healthy_ok_per_s"] = load.succeeded(start, start + 5) / 5
            # A healthy single worker under the same load, what "from 3 s after the freeze on" is
            # compared with: measured before and after the hangs (windows of it differ by 10-15 %
            # on a 2-core machine with the load generator on it), the mean of the two.
            before = await single_worker_rate(app, load)
            results["freezes"] = [await freeze_to_out(app, load) for _ in range(freezes)]
            results["hang_5s"] = await hang(app, load, 5)
            results["hang_60s"] = await hang(app, load, 60)
            await anyio.sleep(5)  # the restarted worker settles
            after = await single_worker_rate(app, load)
            results["single_ok_per_s_each"] = [before, after]
            results["single_ok_per_s"] = (before + after) / 2
            results["interleaved"] = await interleaved(app, load, rounds)
    return results


def report(r: dict[str, Any]) -> str:
    outs = [o for o, _ in r["freezes"]]
    backs = [b for _, b in r["freezes"]]
    lines = [
        f"# Failover figures ({os.cpu_count()} cores, load generator on the same cores)",
        "",
        f"- 8 clients, 2026-07-28 tool calls, {CLIENT_TIMEOUT:g} s client timeout; both workers healthy: "
        f"{r['healthy_ok_per_s']:.0f} calls/s; one healthy worker alone: {r['single_ok_per_s']:.0f} calls/s "
        f"(mean of {r['single_ok_per_s_each'][0]:.0f} before and {r['single_ok_per_s_each'][1]:.0f} after the hangs)",
        f"- freeze (SIGSTOP) to out of nginx's pool, {len(outs)} freezes: median {statistics.median(outs):.2f} s, "
        f"max {max(outs):.2f} s; SIGCONT to back in the pool: median {statistics.median(backs):.2f} s",
    ]
    for name in ("hang_5s", "hang_60s"):
        h = r[name]
        line = (f"- {name.replace('_', ' of ')}: {h['failed']} of {h['calls']} calls failed "
                f"({h['failed_after_3s']} of them sent 3 s or more after the freeze; kinds {h['kinds']}); "
                f"{h['ok_per_s_from_3s']:.0f} calls/s answered from 3 s after the freeze on "
                f"({h['ok_per_s_from_3s'] / r['single_ok_per_s']:.0%} of one healthy worker)")
        if "restarted" in h:
            line += (f"; restarted by the watchdog {h['restarted']:.1f} s after the freeze, back in the pool "
                     f"{h['rejoined_after_restart']:.1f} s later")
        else:
            line += f"; back in the pool {h['back_after_end']:.2f} s after SIGCONT"
        lines.append(line)
    pairs = r["interleaved"]
    lines.append(
        f"- A/B/A/B, {len(pairs)} freezes of 13 s between 10 s windows of one healthy worker: calls/s answered from 3 s "
        f"after the freeze on, against the mean of the neighbouring single-worker windows: "
        + ", ".join(f"{p['frozen']:.0f}/{p['single']:.0f} ({p['ratio']:.0%})" for p in pairs)
        + f"; median {statistics.median(p['ratio'] for p in pairs):.0%}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freezes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="freezes in the A/B/A/B comparison")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = report(anyio.run(measure, args.freezes, args.rounds))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
