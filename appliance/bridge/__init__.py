"""Host a stdio MCP server over Streamable HTTP, in both protocol eras, with supervised children.

`stdio_app(spec)` is the ASGI app a worker serves for one `[servers.<name>]` whose kind is
stdio; `bridge_status()` is what the worker's /health shows about the children. Both are
imported on first use: the admin app imports `appliance.bridge.metrics` alone and must
not load the SDK's server and client with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.bridge.app import stdio_app as stdio_app
    from appliance.bridge.spec import StdioSpec as StdioSpec
    from appliance.bridge.status import bridge_status as bridge_status

__all__ = ["StdioSpec", "bridge_status", "stdio_app"]


def __getattr__(name: str) -> Any:
    if name == "stdio_app":
        from appliance.bridge.app import stdio_app

        return stdio_app
    if name == "StdioSpec":
        from appliance.bridge.spec import StdioSpec

        return StdioSpec
    if name == "bridge_status":
        from appliance.bridge.status import bridge_status

        return bridge_status
    raise AttributeError(f"module 'appliance.bridge' has no attribute {name!r}")
