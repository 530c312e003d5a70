"""MCP clients for integration tests: the official SDK client, watched at the HTTP level.

The SDK's `Client` hides the transport (session id, the GET stream it opens, the DELETE
it sends on exit). A recording httpx2 client shows what went over the wire, so tests can
then look for the same requests on the server side (nginx's access log, worker probes).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from appliance.gate.sessions import parse_owner
from appliance.pool import UPSTREAM_IDLE_TIMEOUT, session_socket
from tests.harness import Appliance

T = TypeVar("T")

#: The protocol version of the 2025 (session) era that the SDK's legacy mode negotiates.
LEGACY_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"


@dataclass
class Wire:
    """Every HTTP exchange of one client: (method, request session id, status)."""

    exchanges: list[tuple[str, str | None, int]] = field(default_factory=list)
    session_id: str | None = None
    issued_session_ids: set[str] = field(default_factory=set)
    get_stream_opened: anyio.Event = field(default_factory=anyio.Event)

    async def on_response(self, response: httpx2.Response) -> None:
        sid = response.request.headers.get("mcp-session-id")
        self.exchanges.append((response.request.method, sid, response.status_code))
        issued = response.headers.get("mcp-session-id")
        if issued:
            self.issued_session_ids.add(issued)
            self.session_id = self.session_id or issued
        if response.request.method == "GET" and response.status_code == 200:
            self.get_stream_opened.set()

    @property
    def owner(self) -> int:
        """The worker index named by the session id."""
        assert self.session_id is not None, "no session id was issued"
        parsed = parse_owner(self.session_id)
        assert parsed is not None, f"session id {self.session_id!r} carries no owner tag"
        return parsed[1]


@contextlib.asynccontextmanager
async def mcp_client(url: str, mode: str = "legacy", headers: dict[str, str] | None = None,
                     **client_options: Any) -> AsyncIterator[tuple[Client, Wire]]:
    """An SDK `Client` over Streamable HTTP plus the record of its HTTP exchanges."""
    wire = Wire()
    http_client = httpx2.AsyncClient(
        headers=headers, trust_env=False, timeout=httpx2.Timeout(30, read=300),
        event_hooks={"response": [wire.on_response]},
    )
    async with http_client:
        async with Client(streamable_http_client(url, http_client=http_client), mode=mode, **client_options) as client:
            yield client, wire


def modern_request(method: str, name: str | None, params: dict[str, Any], request_id: int = 1) -> tuple[dict[str, str], bytes]:
    """Headers and body of one self-contained 2026-07-28 request, built to the spec (MCP-NOTES.md)."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": method,
    }
    if name is not None:
        headers["Mcp-Name"] = name
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "mcp-appliance-tests", "version": "1"},
    }
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**params, "_meta": meta}}
    return headers, json.dumps(body).encode()


def legacy_request_headers(session_id: str) -> dict[str, str]:
    """Headers of a later request inside a 2025-era session."""
    return {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": LEGACY_VERSION,
        "Mcp-Session-Id": session_id,
    }


def access_log(appliance: Appliance) -> list[dict[str, Any]]:
    """nginx's JSON access log lines (supervisord writes nginx's stdout to log_dir)."""
    path = Path(appliance.settings["log_dir"]) / "nginx.out.log"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
    return [entry for entry in lines if entry.get("logger") == "nginx.access"]


def probes(appliance: Appliance) -> dict[int, dict[str, Any]]:
    """Each worker's own probe answer, from /health, by worker index."""
    _, doc = appliance.health()
    return {p["worker"]: p for p in doc["probes"]}


def owner_upstream(appliance: Appliance, index: int) -> str:
    """How nginx's access log names worker `index` when it routes a session to its owner."""
    return f"unix:{session_socket(appliance.run_dir, index)}"


async def eventually(predicate: Callable[[], T], timeout: float, message: str, interval: float = 0.1) -> T:
    """Async twin of `wait_until`: run a blocking check in a thread until it is truthy."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = await anyio.to_thread.run_sync(predicate)
        except Exception as exc:  # not checkable yet
            last_error = exc
        else:
            if value:
                return value
        await anyio.sleep(interval)
    raise TimeoutError(f"{message} (not within {timeout:.0f}s; last error: {last_error!r})")


@dataclass
class OpenSession:
    """A live legacy session: the SDK client, its wire record and the owning worker."""

    client: Client
    wire: Wire

    @property
    def owner(self) -> int:
        return self.wire.owner


@contextlib.asynccontextmanager
async def sessions_on_two_workers(url: str, tries: int = 10,
                                  headers: dict[str, str] | None = None) -> AsyncIterator[tuple[OpenSession, OpenSession]]:
    """Two open legacy sessions owned by different workers (extra ones opened on the way stay open)."""
    async with contextlib.AsyncExitStack() as stack:
        found: dict[int, OpenSession] = {}
        for n in range(tries):
            if n and n % 10 == 0:
                # nginx's pooled connections opened while one worker was out (a restart just
                # before) still lead to the other until idle this long: let them go.
                await anyio.sleep(UPSTREAM_IDLE_TIMEOUT + 0.5)
            client, wire = await stack.enter_async_context(mcp_client(url, "legacy", headers=headers))
            # With its GET stream open the session holds a connection, which least_conn sees.
            with anyio.fail_after(30):
                await wire.get_stream_opened.wait()
            found.setdefault(wire.owner, OpenSession(client, wire))
            if len(found) == 2:
                first, second = sorted(found.values(), key=lambda s: s.owner)
                yield first, second
                return
        raise AssertionError(f"{tries} sessions all landed on worker(s) {sorted(found)}")
