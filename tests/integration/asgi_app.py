"""A plain ASGI app for the appliance to host (not an MCPServer): what a user builds themselves.

The integration tests copy this file next to an appliance's config and name it in
`mcp.app = "asgi_app:app"`; the appliance then serves it as an opaque ASGI app.
"""

import os

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

server = MCPServer("plain-asgi")


@server.tool()
def whoami(ctx: Context) -> dict[str, object]:
    """Which process served this call, and the session id the app itself was given."""
    headers = ctx.headers or {}
    return {"pid": os.getpid(), "session_header": headers.get("mcp-session-id")}


# The appliance's gate checks Host and Origin for every hosted app; the app's own check
# would only ever see nginx's loopback view.
app = server.streamable_http_app(
    streamable_http_path="/mcp",
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)
