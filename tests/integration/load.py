"""Constant client load for the operations and fault tests: bounded loops, every outcome counted.

- `ModernLoad`: loops of self-contained 2026-07-28 tool calls, raw POSTs over keep-alive
  connections (httpx2), as many as the appliance answers.
- `LegacyLoad`: legacy sessions through the official SDK client, each calling a tool now
  and then; a session that ends with 404 re-initializes (a new session) and goes on.
- `RawSession`: one legacy session over plain HTTP, for holding thousands of them open
  (2,000 SDK clients in one process would measure the client, not the appliance).

Both stop when asked or at their time limit, whichever comes first.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import anyio
import httpx2

from tests.integration.clients import LEGACY_VERSION, legacy_request_headers, mcp_client, modern_request


@contextlib.contextmanager
def first_error() -> Iterator[None]:
    """Re-raise the first real error out of nested task-group exception groups (readable failures)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from group


@dataclass
class Outcomes:
    """Counts of what the clients saw, with a sample of every kind of failure."""

    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: dict[str, str] = field(default_factory=dict)

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        self.samples.setdefault(kind, detail[:3000])

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def __str__(self) -> str:
        return f"ok={self.ok} failures={dict(self.failures)} samples={self.samples}"


class BackgroundLoad:
    """What both loads share: their clients run for the duration of a block, outcomes counted."""

    outcomes: Outcomes
    _stop: anyio.Event

    def _tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """Run the clients in the background for the duration of the block."""
        async with anyio.create_task_group() as tg:
            for task in self._tasks():
                tg.start_soon(task)
            try:
                yield self
            finally:
                self._stop.set()

    async def wait_for_calls(self, count: int, timeout: float = 30) -> None:
        """Until at least `count` more calls succeeded (the load is really flowing)."""
        target = self.outcomes.ok + count
        with anyio.fail_after(timeout):
            while self.outcomes.ok < target:
                await anyio.sleep(0.02)


class ModernLoad(BackgroundLoad):
    """`loops` concurrent clients sending 2026-07-28 tools/call requests back to back."""

    def __init__(self, url: str, loops: int = 4, tool: str = "search_notes",
                 arguments: dict[str, Any] | None = None, limit: float = 120) -> None:
        self.url = url
        self.loops = loops
        self.tool = tool
        self.arguments = arguments if arguments is not None else {"query": "load"}
        self.limit = limit
        self.outcomes = Outcomes()
        #: X-Request-ID of every call answered with a result, to match against the audit trail.
        self.answered: list[str] = []
        #: X-Request-ID of calls a worker was handling when it died: a 502 (see nginx.conf), or an
        #: answer cut off when the worker had begun to send it.
        self.interrupted: list[str] = []
        self.tag = uuid.uuid4().hex[:12]
        self._stop = anyio.Event()

    async def _loop(self, n: int) -> None:
        deadline = time.monotonic() + self.limit
        async with httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30)) as client:
            i = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                i += 1
                headers, body = modern_request("tools/call", self.tool, {"name": self.tool, "arguments": self.arguments},
                                               request_id=n * 1_000_000 + i)
                rid = headers["X-Request-ID"] = f"load-{self.tag}-{n}-{i}"
                try:
                    response = await client.post(self.url, headers=headers, content=body)
                except httpx2.RemoteProtocolError as exc:
                    if "complete message body" not in str(exc):
                        self.outcomes.fail(type(exc).__name__, repr(exc))
                        continue
                    # The worker died while sending its answer: nginx had passed the headers on
                    # already, so the answer is cut off instead of becoming a 502. Mid-call too.
                    self.interrupted.append(rid)
                    self.outcomes.fail("cut off", repr(exc))
                    continue
                except httpx2.HTTPError as exc:
                    self.outcomes.fail(type(exc).__name__, repr(exc))
                    continue
                if response.status_code == 200 and '"result"' in response.text and '"isError":false' in response.text:
                    self.outcomes.ok += 1
                    self.answered.append(rid)
                elif response.status_code == 502:
                    self.interrupted.append(rid)
                    self.outcomes.fail("502", response.text)
                else:
                    self.outcomes.fail(str(response.status_code), response.text)

    def _tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [functools.partial(self._loop, n) for n in range(self.loops)]


@dataclass
class SessionRecord:
    """One legacy client over the test: its sessions and what ended them."""

    session_ids: list[str] = field(default_factory=list)
    #: Session ids that ended with 404 (their worker restarted or was removed).
    ended: list[str] = field(default_factory=list)


class LegacyLoad(BackgroundLoad):
    """`sessions` SDK clients in legacy mode, each calling a tool every `pause` seconds."""

    def __init__(self, url: str, sessions: int = 4, pause: float = 0.05, limit: float = 120) -> None:
        self.url = url
        self.sessions = sessions
        self.pause = pause
        self.limit = limit
        self.outcomes = Outcomes()
        self.records = [SessionRecord() for _ in range(sessions)]
        self._stop = anyio.Event()

    async def _client(self, record: SessionRecord) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            wire = None
            try:
                async with mcp_client(self.url, "legacy") as (client, wire):
                    record.session_ids.append(wire.session_id or "?")
                    while not self._stop.is_set() and time.monotonic() < deadline:
                        result = await client.call_tool("search_notes", {"query": "legacy"})
                        if result.is_error:
                            self.outcomes.fail("tool error", str(result))
                        else:
                            self.outcomes.ok += 1
                        await anyio.sleep(self.pause)
            except Exception as exc:  # the SDK raises MCPError (or a group of it) when the session is gone
                if wire is not None and _ended_by_404(wire.exchanges):
                    record.ended.append(wire.session_id or "?")
                else:
                    self.outcomes.fail(type(exc).__name__, repr(exc))

    def _tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [functools.partial(self._client, record) for record in self.records]

    @property
    def ended(self) -> list[str]:
        """Every session id that ended with 404."""
        return [sid for record in self.records for sid in record.ended]


def _ended_by_404(exchanges: list[tuple[str, str | None, int]]) -> bool:
    """The session's first refused request was a 404 (the spec's "re-initialize")."""
    refused = [status for method, sid, status in exchanges if sid is not None and status >= 400]
    return bool(refused) and refused[0] == 404


def sse_json(text: str) -> dict[str, Any]:
    """The JSON-RPC message of a response that is either JSON or one SSE event."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1])


class RawSession:
    """One legacy session over plain HTTP: initialize, initialized, GET stream, calls, DELETE."""

    def __init__(self, client: httpx2.AsyncClient, url: str, n: int) -> None:
        self.client = client
        self.url = url
        self.n = n
        self.sid = ""
        self.stream_open = anyio.Event()
        self.stream_error: str | None = None

    async def open(self) -> None:
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": f"many-{self.n}", "version": "1"}}}
        response = await self.client.post(self.url, json=body, headers={
            "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": LEGACY_VERSION})
        assert response.status_code == 200, (response.status_code, response.text)
        assert "result" in sse_json(response.text), response.text
        self.sid = response.headers["mcp-session-id"]
        response = await self.client.post(self.url, headers=legacy_request_headers(self.sid),
                                          json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert response.status_code == 202, (response.status_code, response.text)

    async def hold_stream(self, done: anyio.Event) -> None:
        """Keep the session's GET stream open until `done`; note it if the stream ends before."""
        headers = {**legacy_request_headers(self.sid), "Accept": "text/event-stream"}
        try:
            async with self.client.stream("GET", self.url, headers=headers) as response:
                if response.status_code != 200:
                    self.stream_error = f"GET {response.status_code}"
                    return
                self.stream_open.set()
                async with anyio.create_task_group() as tg:

                    async def read() -> None:
                        async for _ in response.aiter_bytes():
                            pass
                        if not done.is_set():
                            self.stream_error = "stream ended early"
                        tg.cancel_scope.cancel()

                    tg.start_soon(read)
                    await done.wait()
                    tg.cancel_scope.cancel()
        except httpx2.HTTPError as exc:
            self.stream_error = repr(exc)
        finally:
            self.stream_open.set()

    async def call(self, i: int) -> None:
        body = {"jsonrpc": "2.0", "id": 10 + i, "method": "tools/call",
                "params": {"name": "search_notes", "arguments": {"query": f"session {self.n}"}}}
        response = await self.client.post(self.url, json=body, headers=legacy_request_headers(self.sid))
        assert response.status_code == 200, (response.status_code, response.text)
        assert sse_json(response.text)["result"]["isError"] is False, response.text

    async def close(self) -> None:
        response = await self.client.delete(self.url, headers=legacy_request_headers(self.sid))
        assert response.status_code in (200, 204), (response.status_code, response.text)
