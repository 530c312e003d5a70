"""What the workers' shared rate limit costs per call, in-process: CPU µs of the real code path.

Three figures, each the process CPU time over many calls:
  take      SharedBuckets.take() alone (keyed hash, fcntl lock of the group, refill, write back);
  layer     the RateLimit layer around an app that does nothing, minus that app called bare;
  keys      take() cycling over 10,000 principals (another slot, another group, each call).

Usage: python bench/limiter_cost.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any


def cpu_per_call(fn: Any, calls: int) -> float:
    """CPU µs per call of `fn()` (best of three runs)."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls * 1e6)
    return best


def drive(coro: Any) -> None:
    """Run a coroutine that never waits (the layer and the app below do not)."""
    try:
        coro.send(None)
    except StopIteration:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    calls = parser.parse_args().calls

    from appliance.gate.auth import Principal
    from appliance.gate.buckets import SharedBuckets
    from appliance.gate.exchange import STATE_KEY, Exchange
    from appliance.gate.limits import RateLimit

    directory = Path(tempfile.mkdtemp(prefix="limiter-cost-"))
    # A rate no call reaches: every call takes the "allowed" path, as almost all real calls do.
    buckets = SharedBuckets(directory / "limits.buckets", rate=10**9, burst=10**9, size_mb=10)

    async def nothing(scope: Any, receive: Any, send: Any) -> None:
        return None

    layer = RateLimit(nothing, buckets, retry_after=1, by_address=False, refused=lambda limit: None)
    ex = Exchange(started=0.0, http_method="POST", client="192.0.2.1")
    ex.principal = Principal("alice", frozenset({"*"}))
    scope = {"type": "http", "headers": [(b"x-appliance-limit-exempt", b"0"), (b"content-type", b"application/json")],
             "state": {STATE_KEY: ex}}

    take = cpu_per_call(lambda: buckets.take(b"p:\0alice"), calls)
    bare = cpu_per_call(lambda: drive(nothing(scope, None, None)), calls)
    wrapped = cpu_per_call(lambda: drive(layer(scope, None, None)), calls)
    keys = itertools.cycle([f"p:\0principal-{k}".encode() for k in range(10_000)])
    many = cpu_per_call(lambda: buckets.take(next(keys)), calls)
    print(f"take: {take:.2f} µs/call  layer: {wrapped - bare:.2f} µs/call  keys(10k): {many:.2f} µs/call")


if __name__ == "__main__":
    main()
