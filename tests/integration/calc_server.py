"""A second, tiny Python server for the tests that host several servers in one appliance."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("calc")


@server.tool()
def add(a: int, b: int) -> int:
    """The sum of two integers."""
    return a + b


@server.tool()
def multiply(a: int, b: int) -> int:
    """The product of two integers."""
    return a * b


__all__ = ["server"]
