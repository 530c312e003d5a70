"""A stdio server bridged by appliance.bridge, served alone by hypercorn (tests only).

`python -m tests.integration.bridge_host <port> <spec.json>`. Until `[servers.<name>]`
reaches the config, this is how tests host a bridge without the appliance; the
appliance path goes through `bridge_apps:app` as `mcp.app`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from appliance.bridge import StdioSpec, bridge_status, stdio_app
from appliance.gate.responses import send_json

#: Where this host answers `bridge_status()` as JSON (what the worker's /health will show).
STATUS_PATH = "/bridge-status"


def spec_from_json(doc: dict[str, Any]) -> StdioSpec:
    """A StdioSpec from its JSON form (lists for tuples, a dict for env)."""
    doc = dict(doc)
    doc["command"] = tuple(doc["command"])
    doc["env"] = tuple(sorted(doc.get("env", {}).items()))
    if doc.get("cwd"):
        doc["cwd"] = Path(doc["cwd"])
    return StdioSpec(**doc)


class WithStatus:
    """The bridge, plus GET STATUS_PATH answering `bridge_status()`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == STATUS_PATH:
            await send_json(send, 200, json.dumps(bridge_status()).encode())
            return
        await self.app(scope, receive, send)


def main() -> None:
    port, spec_path = int(sys.argv[1]), Path(sys.argv[2])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    app = WithStatus(stdio_app(spec_from_json(json.loads(spec_path.read_text()))))
    import uvloop

    uvloop.run(serve(app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
