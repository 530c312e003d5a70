"""`mcp.app = "tests.integration.bridge_apps:app"`: a bridged stdio server as the appliance's hosted app.

The spec is read from the JSON file named by $BRIDGE_TEST_SPEC (written by the test before
the start; supervisord passes the environment on) when a worker imports `app`; the
`servers` config will build it from `[servers.<name>]`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from appliance.bridge import stdio_app
from tests.integration.bridge_host import spec_from_json

SPEC_VARIABLE = "BRIDGE_TEST_SPEC"


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(name)
    return stdio_app(spec_from_json(json.loads(Path(os.environ[SPEC_VARIABLE]).read_text())))
