"""The default notes server plus a tool that blocks its worker's event loop: a sync `time.sleep`
in an `async def` tool, the classic mistake. While it sleeps the worker answers nothing, not
even its probe, exactly like a hung process."""

import os
import time

from appliance.servers.notes import server


@server.tool()
async def block_event_loop(seconds: float) -> dict[str, object]:
    """Sleep without yielding to the event loop (on purpose), then say which process did it."""
    time.sleep(seconds)  # the bug under test: blocks every other request of this worker
    return {"pid": os.getpid(), "slept": seconds}


__all__ = ["server"]
