"""What each layer of the gate costs, with default settings, in-process: CPU µs per call.

The gate is built exactly as a worker builds it (`build_gate` with `gate_services` of the
default settings: auth "none", no policy rules, the rate limit, audit on with fsync
"interval", metrics in multiprocess files) around an ASGI app that answers at once, and
called with the same 2026-07-28 tools/call (`add`) without HTTP. Each layer's cost is the
difference between the gate cut just below it and cut just above it (each layer holds the
next in `.app`), so the figures add up to the whole gate; the Outcome layer's sinks (audit
record, metrics) are timed on their own: the cut gates run without them. JsonRpcBody's
figure includes reading the answer for its outcome (Outcome does that once the call is parsed).

Usage (from the repo root): python -m bench.gate_layers [--requests 20000] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.clients import modern_request

ROOT = Path(__file__).resolve().parents[1]
TOOL, ARGUMENTS = "add", {"a": 1, "b": 2}
ANSWER = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "3"}],
                                                          "isError": False}}).encode()


async def instant(scope: Any, receive: Any, send: Any) -> None:
    """The hosted app's place: reads the body, answers the JSON-RPC result at once."""
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]})
    await send({"type": "http.response.body", "body": ANSWER})


def request() -> tuple[dict[str, Any], bytes]:
    """The scope and body nginx would hand a worker for one 2026-07-28 tools/call."""
    headers, body = modern_request("tools/call", TOOL, {"name": TOOL, "arguments": ARGUMENTS})
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    # What nginx adds (conf/nginx.conf.j2): the request id, the client address, the scheme.
    raw += [(b"host", b"127.0.0.1"), (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
            (b"x-real-ip", b"127.0.0.1"), (b"x-forwarded-proto", b"http"), (b"content-length", b"%d" % len(body))]
    scope = {"type": "http", "method": "POST", "path": "/mcp", "raw_path": b"/mcp", "query_string": b"",
             "headers": raw, "client": ("127.0.0.1", 40000), "scheme": "http", "http_version": "1.1"}
    return scope, body


async def call(app: Any, scope: dict[str, Any], body: bytes) -> None:
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Any:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise AssertionError(message)

    await app({**scope, "headers": list(scope["headers"])}, receive, send)


async def cpu_us(app: Any, scope: dict[str, Any], body: bytes, requests: int) -> float:
    for _ in range(min(requests // 10, 2000)):
        await call(app, scope, body)
    started = time.process_time()
    for _ in range(requests):
        await call(app, scope, body)
    return (time.process_time() - started) / requests * 1e6


def chain(gate: Any) -> list[Any]:
    """The gate's layers, outermost first (each holds the next in `.app`)."""
    layers = []
    while gate is not instant:
        layers.append(gate)
        gate = gate.app
    return layers


async def measure(directory: Path, requests: int, rounds: int) -> dict[str, Any]:
    from appliance.config import LimitsSettings, Settings
    from appliance.gate import WorkerStats, build_gate, gate_services
    from appliance.gate.outcome import Outcome

    # The default rate, but a bucket this loop cannot empty: the limiter is paid as a remote client pays it
    # (nginx marks loopback clients exempt by default, limits.exempt, which skips it).
    settings = Settings(log_dir=directory / "log", run_dir=directory / "run", data_dir=directory / "data",
                        limits=LimitsSettings(rate=10**6, burst=10**9))
    (directory / "run").mkdir(parents=True, exist_ok=True)
    gate = build_gate(instant, settings, 0, WorkerStats(index=0), gate_services(settings, 0))
    layers = chain(gate)
    scope, body = request()
    names = [type(layer).__name__ for layer in layers]
    best: dict[str, float] = {}
    outcome = next(layer for layer in layers if isinstance(layer, Outcome))
    sinks = outcome.sinks
    for _ in range(rounds):
        figures = {"hosted app alone": await cpu_us(instant, scope, body, requests)}
        outcome.sinks = ()  # the layers first, without the sinks: they are timed on their own below
        try:
            for depth, layer in enumerate(layers):  # the gate cut below layer `depth`
                inner, layer.app = layer.app, instant
                try:
                    figures[f"gate down to {names[depth]}"] = await cpu_us(gate, scope, body, requests)
                finally:
                    layer.app = inner
        finally:
            outcome.sinks = sinks
        figures["whole gate"] = await cpu_us(gate, scope, body, requests)
        for sink in sinks:  # each sink alone on top of the layers
            outcome.sinks = (sink,)
            try:
                figures[f"sink {type(sink).__name__}"] = await cpu_us(gate, scope, body, requests)
            finally:
                outcome.sinks = sinks
        for name, value in figures.items():
            best[name] = min(best.get(name, value), value)
    per_layer: dict[str, float] = {}
    previous = best["hosted app alone"]
    for name in names:
        here = best[f"gate down to {name}"]
        per_layer[name] = here - previous
        previous = here
    whole = best["whole gate"]
    for sink in sinks:
        name = type(sink).__name__
        per_layer[f"Outcome sink: {name}"] = best[f"sink {name}"] - previous
    return {"requests": requests, "rounds": rounds, "hosted_app_alone_us": best["hosted app alone"],
            "gate_us": whole - best["hosted app alone"], "per_layer_us": per_layer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(measure(Path(args.child), args.requests, args.rounds))))
        return
    directory = Path(tempfile.mkdtemp(prefix="gate-layers-"))
    (directory / "run" / "metrics").mkdir(parents=True)
    # prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is imported: a child process, as in a worker.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory / "run" / "metrics")}
    out = subprocess.run([sys.executable, "-m", "bench.gate_layers", "--child", str(directory),
                          "--requests", str(args.requests), "--rounds", str(args.rounds)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        sys.exit(out.stderr)
    figures = json.loads(out.stdout.splitlines()[-1])
    print(f"hosted app alone (answers at once): {figures['hosted_app_alone_us']:.1f} µs CPU per call")
    print(f"the gate with default settings: {figures['gate_us']:.1f} µs CPU per call, by layer:")
    for name, value in figures["per_layer_us"].items():
        print(f"  {name:<42} {value:6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
