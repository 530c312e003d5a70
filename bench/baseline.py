"""The baseline a user would otherwise deploy: the hosted app alone in one hypercorn process.

No nginx, no gate: the default notes server's (or `--app`'s) Streamable HTTP app, built with
the same transport options the appliance's workers use, on hypercorn with uvloop. With
`--workers 2` it is what a user gets by typing `hypercorn -w 2 -k uvloop module:app`: two
processes sharing the port (no session affinity, no gate).

Usage (bench/run.py starts it): python -m bench.baseline --port P --data-dir D [--app bench.add_server:server]
                                [--json] [--stateless] [--gc-freeze] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True, help="where the notes server keeps its database")
    parser.add_argument("--stateless", action="store_true", help="legacy era without sessions")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="the appliance workers' garbage-collector treatment: gc.freeze() once the app is built, "
                             "then their thresholds (appliance.worker.GC_THRESHOLDS)")
    parser.add_argument("--app", default="appliance.servers.notes:server", help="module:attribute of an MCPServer")
    parser.add_argument("--json", action="store_true", help="answer POSTs with one JSON body (json_response=True)")
    parser.add_argument("--workers", type=int, default=1,
                        help="above 1: `hypercorn -w N` of bench.add_server (the --app must be it)")
    args = parser.parse_args()
    os.environ["MCP_APPLIANCE_DATA_DIR"] = args.data_dir  # read by the notes server
    if args.workers > 1:
        if args.app != "bench.add_server:server" or args.stateless or args.gc_freeze:
            parser.error("--workers N serves bench.add_server only, with sessions, without --gc-freeze")
        target = f"bench.add_server:streamable_app({args.json})"
        # exec: the benchmark's SIGTERM reaches hypercorn's parent, which stops its workers.
        os.execv(sys.executable, [sys.executable, "-m", "hypercorn", "-w", str(args.workers), "-k", "uvloop",
                                  "--bind", f"127.0.0.1:{args.port}", "--keep-alive", "75", "--backlog", "4096",
                                  target])

    import uvloop
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    from mcp.server.transport_security import TransportSecuritySettings

    module, _, attribute = args.app.partition(":")
    server = getattr(importlib.import_module(module), attribute)
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        json_response=args.json,
        stateless_http=args.stateless,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    if args.gc_freeze:  # like for like with the workers (appliance/worker.py)
        from appliance.worker import GC_THRESHOLDS

        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75.0
    config.backlog = 4096

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    uvloop.run(run())


if __name__ == "__main__":
    main()
