"""One stdio child: the server process (under its guard) and the SDK client session to it."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from anyio.abc import TaskStatus
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from pydantic import TypeAdapter

from appliance.bridge.spec import StdioSpec

logger = logging.getLogger("appliance.bridge")
child_logger = logging.getLogger("appliance.bridge.child")

GUARD = str(Path(__file__).with_name("guard.py"))
#: The guard's first stderr line names the command's pid (it is not logged).
GUARD_MARK = "mcp-appliance-guard: pid="
#: Seconds a child gets to start and answer `initialize`.
START_TIMEOUT = 30.0
#: Longest stderr line logged as one record; longer output is logged in pieces.
STDERR_LINE = 16384
#: Pages of a child's tools/list read when learning its tools (the SDK's own walk stops at 100 too).
TOOL_PAGES = 100
#: Seconds a child's tools/list may take when learning its tools.
LIST_TIMEOUT = 10.0

_RAW_RESULT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])
#: The request model the bridge sends (parametrised once: pydantic builds the class per subscript).
_RAW_REQUEST = types.Request[Any, Any]

#: Handles a server-to-client request the child sent: (method, params) -> result or ErrorData.
AskFn = Callable[["Child", str, Any], Awaitable[Any]]
#: Handles a notification the child sent (list changes, log messages, resource updates).
NotifyFn = Callable[["Child", types.ServerNotification], Awaitable[None]]


class ChildGone(Exception):
    """The child is not running (died, stopping, or never started)."""


class Child:
    """A running stdio server; `forward` sends it one request as the SDK client."""

    def __init__(self, spec: StdioSpec, ask: AskFn, notify: NotifyFn) -> None:
        self.spec = spec
        self._ask = ask
        self._notify = notify
        self.session: ClientSession | None = None
        self.pid: int | None = None
        self.initialize_result: types.InitializeResult | None = None
        self.gone = anyio.Event()
        self.started = False
        self.stopping = False
        #: Called (synchronously) once the child is gone.
        self.gone_hooks: list[Callable[[Child], None]] = []
        #: Legacy session ids this child serves (its death ends them).
        self.session_ids: set[str] = set()
        #: Server request contexts of the requests in flight on this child.
        self.in_flight: list[Any] = []
        #: Each tool's inputSchema as the child lists it (None: not known, see `learn_tools`).
        self.tool_schemas: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return self.session is not None and not self.gone.is_set()

    def stop(self) -> None:
        """End the child (its task closes stdin, then the guard ends the rest)."""
        self.stopping = True
        self.gone.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the child, report started once it answered `initialize`, return when it is gone."""
        read_fd, write_fd = os.pipe()
        errlog = os.fdopen(write_fd, "w")
        params = StdioServerParameters(
            command=sys.executable,
            args=["-I", "-S", GUARD, str(os.getpid()), "--", *self.spec.command],
            env=dict(self.spec.env),
            cwd=self.spec.cwd,
        )
        try:
            async with anyio.create_task_group() as tg:
                async with stdio_client(params, errlog=errlog) as (read, write):
                    errlog.close()  # the guard and the command hold the write end now: EOF means both are gone
                    tg.start_soon(self._pump_stderr, read_fd)
                    read_fd = -1
                    async with ClientSession(
                        read, write,
                        sampling_callback=self._on_sampling,
                        elicitation_callback=self._on_elicitation,
                        list_roots_callback=self._on_list_roots,
                        message_handler=self._on_message,
                    ) as session:
                        with anyio.fail_after(START_TIMEOUT):
                            self.initialize_result = await session.initialize()
                        self.session = session
                        await self.learn_tools()
                        self.started = True
                        task_status.started()
                        await self.gone.wait()
                tg.cancel_scope.cancel()
        finally:
            self.session = None
            self.gone.set()
            if not errlog.closed:
                errlog.close()
            if read_fd >= 0:
                os.close(read_fd)

    async def _pump_stderr(self, fd: int) -> None:
        """The child's stderr, line by line, to the JSON logs tagged with the server; EOF: the child is gone."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STDERR_LINE)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
        extra = {"server": self.spec.tag}
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line longer than the limit: log what is buffered
                    line = await reader.read(STDERR_LINE)
                if not line:
                    break
                text = line.decode("utf-8", "replace").rstrip("\n")
                if self.pid is None and text.startswith(GUARD_MARK):
                    self.pid = int(text.removeprefix(GUARD_MARK))
                    continue
                child_logger.info(text, extra=extra)
        finally:
            transport.close()
            if not self.gone.is_set():
                logger.warning("stdio server %s: child %s exited", self.spec.server, self.pid, extra=extra)
            self.gone.set()

    async def forward(self, method: str, params: dict[str, Any] | None,
                      on_progress: Callable[[float, float | None, str | None], Awaitable[None]] | None) -> dict[str, Any]:
        """Send one request to the child and return its raw result (cancelling this cancels it at the child)."""
        session = self.session
        if session is None or self.gone.is_set():
            raise ChildGone(self.spec.server)
        request = _RAW_REQUEST(method=method, params=params)
        return await session.send_request(request, _RAW_RESULT, progress_callback=on_progress)

    async def learn_tools(self) -> None:
        """Read the child's tools' input schemas (every page), for `tool_schemas`.

        The SDK checks a 2026-07-28 call's Mcp-Param-* headers against the tool's schema; without
        these it lists the tools itself before every call, a second round trip to the child.
        A child without tools, or one whose listing fails, leaves `tool_schemas` None.
        """
        if self.initialize_result is None or self.initialize_result.capabilities.tools is None:
            return
        schemas: dict[str, Any] = {}
        try:
            with anyio.fail_after(LIST_TIMEOUT):
                await self._list_tools(schemas)
        except Exception as exc:  # whatever went wrong, the SDK lists the tools itself per call, as before
            logger.debug("stdio server %s: the child's tools/list failed: %r", self.spec.server, exc)
            self.tool_schemas = None
            return
        self.tool_schemas = schemas

    async def _list_tools(self, schemas: dict[str, Any]) -> None:
        cursor: Any = None
        for _ in range(TOOL_PAGES):
            page = await self.forward("tools/list", {"cursor": cursor} if cursor is not None else None, None)
            for tool in page.get("tools") or ():
                if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                    schemas[tool["name"]] = tool.get("inputSchema")
            cursor = page.get("nextCursor")
            if not isinstance(cursor, str):
                return
        raise MCPError(code=types.INTERNAL_ERROR, message=f"tools/list did not end within {TOOL_PAGES} pages")

    async def notify(self, notification: types.ClientNotification) -> None:
        """Pass a client notification on (roots changed)."""
        if self.session is not None and not self.gone.is_set():
            await self.session.send_notification(notification)

    async def _on_sampling(self, context: Any, params: types.CreateMessageRequestParams) -> Any:
        return await self._ask(self, "sampling/createMessage", params)

    async def _on_elicitation(self, context: Any, params: types.ElicitRequestParams) -> Any:
        return await self._ask(self, "elicitation/create", params)

    async def _on_list_roots(self, context: Any) -> Any:
        return await self._ask(self, "roots/list", None)

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, Exception):
            logger.warning("stdio server %s sent something unreadable: %s", self.spec.server, message,
                           extra={"server": self.spec.tag})
            return
        await self._notify(self, message)
