"""A hosted app with a tool that blocks its worker's event loop: a stop cannot reach the loop meanwhile."""

import os
import time
from pathlib import Path

from mcp.server.mcpserver import MCPServer

#: Written to the data directory when the tool starts blocking.
MARKER = "stalled"

server = MCPServer("stalling")


@server.tool()
async def stall(seconds: float) -> str:
    """Block the whole worker for `seconds`: a blocking call inside a coroutine (the bug it stands for)."""
    (Path(os.environ["MCP_APPLIANCE_DATA_DIR"]) / MARKER).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "done"
