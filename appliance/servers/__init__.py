"""Built-in MCP servers hosted by the appliance."""
