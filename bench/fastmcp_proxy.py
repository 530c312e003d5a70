"""fastmcp's proxy of a stdio server over Streamable HTTP, as its documentation builds one.

Issue 13 names fastmcp's proxy as the library the bridge could be built on instead of the SDK's
client and server; bench/stdio.py measures it next to the bridge. fastmcp needs a venv of its
own (scripts/test.sh makes it), so this file imports nothing of the appliance.

Usage: <fastmcp venv>/bin/python bench/fastmcp_proxy.py PORT COMMAND [ARG...]
"""

from __future__ import annotations

import sys

from fastmcp.client.transports import StdioTransport
from fastmcp.server import create_proxy


def main(argv: list[str]) -> None:
    port, command = int(argv[0]), argv[1:]
    # create_proxy with a transport: fastmcp's recommended way, with its default session strategy.
    proxy = create_proxy(StdioTransport(command=command[0], args=command[1:]), name="bench")
    proxy.run(transport="http", host="127.0.0.1", port=port, path="/mcp", show_banner=False, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
