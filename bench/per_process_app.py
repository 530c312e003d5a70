"""The "before" of bench/state.py: the notes server as a plain ASGI app, which the appliance cannot
reach into, so each worker seals requestState under its own per-process key (the SDK default)."""

from mcp.server.transport_security import TransportSecuritySettings

from appliance.servers.notes import create_server

app = create_server().streamable_http_app(
    streamable_http_path="/mcp",
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)
