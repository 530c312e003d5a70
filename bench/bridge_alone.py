"""The appliance's stdio bridge alone: one hypercorn process (uvloop) serving `stdio_app`, no gate, no nginx.

The like-for-like library comparison of bench/stdio.py: the same one process per side as
fastmcp's proxy (bench/fastmcp_proxy.py), so what differs is the bridging code itself.

Usage: python -m bench.bridge_alone PORT COMMAND [ARG...]
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config

from appliance.bridge import StdioSpec, stdio_app


def main(argv: list[str]) -> None:
    port, command = int(argv[0]), tuple(argv[1:])
    app = stdio_app(StdioSpec(server="everything", command=command, isolation="shared", path="/mcp"))
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    uvloop.run(run())


if __name__ == "__main__":
    main(sys.argv[1:])
