"""The default notes server, but a worker that starts while `<data_dir>/crash-on-start` exists exits
at once: a bad deploy whose worker keeps crashing, for the crash-loop test."""

import os
from pathlib import Path

from appliance.servers.notes import server

MARKER = "crash-on-start"

if (Path(os.environ.get("MCP_APPLIANCE_DATA_DIR", "/nonexistent")) / MARKER).exists():
    raise SystemExit(f"{MARKER} present: this worker fails on purpose")

__all__ = ["server"]
