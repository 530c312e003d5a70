"""What `mcp-appliance check` says about state that must span workers and hosts."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from appliance.config import Settings
from appliance.state import sealing


def state_warnings(settings: Settings, target: Any) -> list[str]:
    """Warnings, each naming the app, when its requestState would be sealed under a per-process key
    while more than one process serves it (workers.count > 1 or node peers)."""
    spread = settings.workers.count > 1 or bool(settings.node.peers) or bool(settings.node.peer_address)
    if not spread:
        return []
    where = f"{settings.workers.count} workers" + (" on several nodes" if settings.node.peers or settings.node.peer_address else "")
    app = f"mcp.app = {settings.mcp.app!r}"
    if isinstance(target, MCPServer):
        if sealing.has_boundary(target):
            return []  # the worker gives a per-process policy the shared ring; an own policy is the app's choice
        return [f"{app}: no request-state boundary found in this MCPServer (an SDK change?); its multi-round-trip "
                f"calls may fail when a retry reaches another of the {where}"]
    return [f"{app} is a plain ASGI app: the appliance cannot give it the shared request-state keys; if it seals "
            f"requestState with a per-process key (RequestStateSecurity.ephemeral(), the MCPServer default), "
            f"multi-round-trip calls fail when a retry reaches another of the {where}: build it with "
            f"request_state_security=RequestStateSecurity(keys=[...]) from a shared secret, or host the MCPServer itself"]
