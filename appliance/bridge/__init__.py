"""Host a stdio MCP server over Streamable HTTP, in both protocol eras, with supervised children.

`stdio_app(spec)` is the ASGI app a worker serves for one `[servers.<name>]` whose kind is
stdio; `bridge_status()` is what the worker's /health shows about the children.
"""

from appliance.bridge.app import stdio_app
from appliance.bridge.spec import StdioSpec
from appliance.bridge.status import bridge_status

__all__ = ["StdioSpec", "bridge_status", "stdio_app"]
