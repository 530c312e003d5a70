"""A hosted MCPServer for the tracing tests: a cheap tool that logs one line while it runs.

The integration tests copy this file next to an appliance's config and name it in
`mcp.app = "traced_app:server"`.
"""

import logging

from mcp.server.mcpserver import MCPServer

logger = logging.getLogger("traced_app")
server = MCPServer("traced")


@server.tool()
def add(a: int, b: int) -> int:
    """a + b, logged (the log line carries the request's trace id)."""
    logger.info("adding %d and %d", a, b)
    return a + b
