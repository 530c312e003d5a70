"""The baseline a user would otherwise deploy: the hosted app alone in one hypercorn process.

No nginx, no gate: the default notes server's Streamable HTTP app, built with the same
transport options the appliance's workers use, on hypercorn with uvloop.

Usage (bench/run.py starts it): python -m bench.baseline --port P --data-dir D [--stateless] [--gc-freeze]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True, help="where the notes server keeps its database")
    parser.add_argument("--stateless", action="store_true", help="legacy era without sessions")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="call gc.freeze() once the app is built, as the appliance's workers do")
    args = parser.parse_args()
    os.environ["MCP_APPLIANCE_DATA_DIR"] = args.data_dir  # read by the notes server

    import uvloop
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    from mcp.server.transport_security import TransportSecuritySettings

    from appliance.servers.notes import server

    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=args.stateless,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    if args.gc_freeze:
        gc.freeze()
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
