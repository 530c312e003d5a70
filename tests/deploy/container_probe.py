"""Run inside the container's network namespace: wait for health, then use the appliance as a client.

    nsenter --net=/proc/<pid>/ns/net python -m tests.deploy.container_probe http://127.0.0.1:8080

Prints one JSON document: the health endpoints' answers and what the official SDK client
got from a legacy session and from a 2026-07-28 request.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import anyio
from mcp import Client


def get(url: str) -> tuple[int, Any]:
    """Status and JSON body (None when the body is not JSON, e.g. nginx's 502 page while starting)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def wait_healthy(base: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, doc = get(base + "/health")
            if status == 200 and doc and doc["status"] == "ok":
                return doc
            last = doc
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.2)
    raise SystemExit(f"not healthy within {timeout}s: {last!r}")


async def use_mcp(url: str) -> dict[str, Any]:
    async with Client(url, mode="legacy") as client:
        added = await client.call_tool("add_note", {"title": "container", "body": "served from a read-only root"})
        found = await client.call_tool("search_notes", {"query": "read-only"})
    async with Client(url, mode="2026-07-28") as client:
        tools = await client.list_tools()
    return {
        "added": added.structured_content,
        "found": found.structured_content,
        "errors": [r.is_error for r in (added, found)],
        "tools": sorted(t.name for t in tools.tools),
    }


def main(base: str) -> None:
    report: dict[str, Any] = {"health": wait_healthy(base, 60)}
    for name in ("live", "ready", "startup"):
        report[name] = get(f"{base}/health/{name}")[0]
    report["mcp"] = anyio.run(use_mcp, base + "/mcp")
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
