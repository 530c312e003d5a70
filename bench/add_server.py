"""The smallest real MCP server: one tool, `add(a: int, b: int) -> int`.

Its SDK cost is small, so the benchmarks that use it show what the appliance itself adds
(`get_note` of the notes server costs ~1.3 ms of CPU per call and hides it). Served by
the appliance with `mcp.app = "bench.add_server:server"`, and bare by bench/baseline.py.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

server = MCPServer("add")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def streamable_app(json_response: bool) -> object:
    """The Streamable HTTP app a bare deployment builds (no DNS-rebinding check: loopback only).

    For `hypercorn -w 2 "bench.add_server:streamable_app(True)"` (bench/baseline.py --workers 2).
    """
    from mcp.server.transport_security import TransportSecuritySettings

    return server.streamable_http_app(
        streamable_http_path="/mcp", json_response=json_response,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))

