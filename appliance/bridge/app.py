"""`stdio_app(spec)`: the ASGI app that serves one stdio server over Streamable HTTP, both eras."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import mcp_types as types
from anyio.abc import TaskGroup
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.types import Receive, Scope, Send

from appliance.bridge import status
from appliance.bridge.child import Child, ChildGone
from appliance.bridge.children import Children, Refused
from appliance.bridge.liveness import ChildFleet, child_watchdog_metrics
from appliance.bridge.metrics import bridge_metrics
from appliance.bridge.proxy import bridge_server
from appliance.bridge.rounds import Replay
from appliance.bridge.spec import StdioSpec
from appliance.gate.responses import INTERNAL_ERROR, send_rpc_error
from appliance.watchdog import Watchdog

logger = logging.getLogger("appliance.bridge")

#: Seconds the children get to end when the worker stops.
STOP_WAIT = 3.0

_REQUESTS: dict[str, tuple[type[Any], type[Any]]] = {
    "sampling/createMessage": (types.CreateMessageRequest, types.CreateMessageResult),
    "elicitation/create": (types.ElicitRequest, types.ElicitResult),
    "roots/list": (types.ListRootsRequest, types.ListRootsResult),
}
_CHANGES = {
    "notifications/tools/list_changed": ToolsListChanged,
    "notifications/prompts/list_changed": PromptsListChanged,
    "notifications/resources/list_changed": ResourcesListChanged,
}


def stdio_app(spec: StdioSpec) -> Bridge:
    """An ASGI app answering MCP at `spec.path` by bridging to `spec.command`'s children."""
    return Bridge(spec)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _session_id(ctx: ServerRequestContext[Any, Any]) -> str | None:
    request = ctx.request
    headers = getattr(request, "headers", None)
    return headers.get("mcp-session-id") if headers is not None else None


class BridgeSessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager, telling the bridge when a legacy session ends (DELETE, idle, crash).

    `_discard_session` is the one place every session's end passes through; the SDK offers
    no public hook for it, and the bridge must stop a session's child with the session.
    """

    def __init__(self, bridge: Bridge, **options: Any) -> None:
        super().__init__(**options)
        self._bridge = bridge

    async def _discard_session(self, session_id: str, transport: Any) -> None:
        await super()._discard_session(session_id, transport)
        self._bridge.session_ended(session_id)

    async def end_session(self, session_id: str) -> None:
        """End a live session now: its next request gets 404 (re-initialize)."""
        transport = self._server_instances.get(session_id)
        if transport is not None:
            await self._discard_session(session_id, transport)


class Bridge:
    """One stdio server in this worker: the SDK server in front, the children behind."""

    def __init__(self, spec: StdioSpec) -> None:
        self.spec = spec
        self.metrics = bridge_metrics()
        self.bus = InMemorySubscriptionBus()
        self.children = Children(spec, self._ask, self._notify, self.metrics, self._child_gone, self._learn)
        #: session isolation: each legacy session's own child.
        self.by_session: dict[str, Child] = {}
        #: Each legacy session's latest ServerSession: its standalone (GET) stream for the child's notifications.
        self.peers: dict[str, ServerSession] = {}
        self._template: dict[str, Any] | None = None
        self._tg: TaskGroup | None = None
        #: Resource URIs each legacy session subscribed to (a child's updates go to those sessions only).
        self.subscriptions: dict[str, set[str]] = {}
        #: The 2026-07-28 calls in flight that can answer a child's question by a new round, by id(ctx).
        self.replays: dict[int, Replay] = {}
        self.server = bridge_server(spec.server, self._lease, self.bus, self._initialize_result, self._roots_changed,
                                    self.replays)
        self.manager = BridgeSessionManager(
            self,
            app=self.server,
            json_response=spec.json_response,
            stateless=not spec.sessions,
            # The gate checks Host and Origin against the public names (see worker.hosted_app).
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            session_idle_timeout=spec.idle_timeout,
            max_sessions=spec.max_sessions,
        )

    def status(self) -> dict[str, Any]:
        return self.children.status()

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] != self.spec.path:
            await send_rpc_error(send, 404, -32600, f"Not found: this server answers at {self.spec.path}")
            return
        # A crash-looping session server still serves the sessions it has; only new ones are refused.
        if self.children.crash_looping and self.spec.isolation == "shared":
            self.metrics.refused.labels(self.spec.server, "crash_loop").inc()
            await send_rpc_error(send, 503, INTERNAL_ERROR, f"stdio server {self.spec.server!r} is crash-looping: "
                                 "its children keep dying; see the worker's log", data={"reason": "crash_loop"})
            return
        if self._opens_session(scope):
            await self._open_session(scope, receive, send)
            return
        await self.manager.handle_request(scope, receive, send)

    def _opens_session(self, scope: Scope) -> bool:
        """A request that would open a legacy session of a `session` server (it needs a child of its own)."""
        if self.spec.isolation != "session" or not self.spec.sessions or scope["method"] != "POST":
            return False
        if _header(scope, b"mcp-session-id") is not None:
            return False
        version = _header(scope, b"mcp-protocol-version")
        return version is None or version in HANDSHAKE_PROTOCOL_VERSIONS

    async def _open_session(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the session's child first (503 beyond max_children), bind it to the id the SDK issues."""
        try:
            child = await self.children.start()
        except Refused as exc:
            await send_rpc_error(send, 503, INTERNAL_ERROR, str(exc), data={"reason": exc.reason})
            return
        except ChildGone as exc:
            await send_rpc_error(send, 503, INTERNAL_ERROR, str(exc), data={"reason": "child_gone"})
            return
        bound = False

        async def bind(message: Any) -> None:
            nonlocal bound
            if message["type"] == "http.response.start" and message["status"] < 400:
                sid = next((v.decode("latin-1") for k, v in message.get("headers", []) if k == b"mcp-session-id"), None)
                if sid is not None and child.alive:
                    self.by_session[sid] = child
                    child.session_ids.add(sid)
                    bound = True
            await send(message)

        try:
            await self.manager.handle_request(scope, receive, bind)
        finally:
            if not bound:
                child.stop()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        started = False
        try:
            async with anyio.create_task_group() as tg, self.manager.run():
                self._tg = tg
                await self.children.run(tg)
                # Hung children are restarted like hung workers (appliance/bridge/liveness.py).
                tg.start_soon(Watchdog(ChildFleet(self.children), self.spec.hang_timeout,
                                       child_watchdog_metrics()).run)
                status.register(self.spec.server, self)
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
                self.children.close()
                with anyio.move_on_after(STOP_WAIT):
                    while self.children.live:
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        except Exception as exc:
            logger.exception("stdio server %s: lifespan failed", self.spec.server)
            await send({"type": "lifespan.shutdown.failed" if started else "lifespan.startup.failed",
                        "message": repr(exc)})
            raise
        finally:
            status.unregister(self.spec.server, self)
        await send({"type": "lifespan.shutdown.complete"})

    # -- which child serves a request -----------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease(self, ctx: ServerRequestContext[Any, Any]) -> AsyncIterator[Child]:
        sid = _session_id(ctx)
        if sid is not None:
            self.peers[sid] = ctx.session
            uri = (ctx.params or {}).get("uri")
            if ctx.method == "resources/subscribe" and isinstance(uri, str):
                self.subscriptions.setdefault(sid, set()).add(uri)
            elif ctx.method == "resources/unsubscribe" and isinstance(uri, str):
                self.subscriptions.get(sid, set()).discard(uri)
        if self.spec.isolation == "shared":
            child = await self.children.shared()
            if sid is not None:
                child.session_ids.add(sid)
            yield child
            return
        if sid is not None and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            child = self.by_session.get(sid)
            if child is None or not child.alive:
                raise ChildGone(f"stdio server {self.spec.server!r}: this session's child is gone")
            yield child
            return
        async with self.children.pooled() as child:
            yield child

    async def _initialize_result(self) -> dict[str, Any] | None:
        """The children's `initialize` answer (a shared server's first session waits for its child)."""
        if self._template is None and self.spec.isolation == "shared":
            with contextlib.suppress(Refused, ChildGone):
                await self.children.shared()
        return self._template

    def _learn(self, child: Child) -> None:
        """A child started: remember what it answers to `initialize` (for the bridge's own answer) and its tools."""
        if self._template is None and child.initialize_result is not None:
            self._template = child.initialize_result.model_dump(by_alias=True, mode="json", exclude_none=True)
        self._schemas_known()

    def _schemas_known(self) -> None:
        """The SDK checks Mcp-Param-* headers against the children's tool listings once one is known;
        until then (None) it lists the tools itself, through a child, before each 2026-07-28 call."""
        known = any(child.tool_schemas is not None for child in self.children.live)
        self.server.get_tool_input_schema = self._tool_input_schema if known else None

    def _tool_input_schema(self, name: str) -> Any | None:
        """`name`'s inputSchema as a live child lists it (None: no child lists it, nothing to check)."""
        for child in self.children.live:
            if child.tool_schemas is not None and name in child.tool_schemas:
                return child.tool_schemas[name]
        return None

    async def _relearn_tools(self, child: Child) -> None:
        """The child's tools changed: read its listing again."""
        await child.learn_tools()
        self._schemas_known()

    def session_ended(self, session_id: str) -> None:
        """A legacy session ended: forget it; a `session` server's child ends with it."""
        self.peers.pop(session_id, None)
        self.subscriptions.pop(session_id, None)
        child = self.by_session.pop(session_id, None)
        if child is not None:
            child.stop()
        for live in self.children.live:
            live.session_ids.discard(session_id)

    def _child_gone(self, child: Child) -> None:
        """A child ended: the sessions it served end too (their next request gets 404)."""
        for sid in list(child.session_ids):
            if self._tg is not None:
                self._tg.start_soon(self.manager.end_session, sid)
        child.session_ids.clear()
        self._schemas_known()

    async def _roots_changed(self, ctx: ServerRequestContext[Any, Any]) -> None:
        """A client's roots changed: only a child of that one session hears it (see `_sole_session`)."""
        sid = _session_id(ctx)
        child = self.by_session.get(sid) if sid else None
        if child is not None and self._sole_session(child) is not None:
            await child.notify(types.RootsListChangedNotification())

    # -- what the child sends -------------------------------------------------------------

    def _caller(self, child: Child) -> ServerRequestContext[Any, Any] | None:
        """The one client the child's requests in flight come from, when there is one that can be asked.

        Every request in flight must be of the same legacy session: a shared child serving
        several clients cannot say which one its server-to-client request or log is for, and
        sending it to any of them would show one client another's traffic.
        """
        if not child.in_flight:
            return None
        sids = {_session_id(ctx) for ctx in child.in_flight}
        last = child.in_flight[-1]
        if len(child.in_flight) == 1 or (len(sids) == 1 and None not in sids):
            return last if last.protocol_version not in MODERN_PROTOCOL_VERSIONS else None
        return None

    def _sole_session(self, child: Child) -> ServerSession | None:
        """The legacy session of a `session` child that serves that one session alone."""
        if self.spec.isolation != "session" or len(child.session_ids) != 1:
            return None
        return self.peers.get(next(iter(child.session_ids)))

    def _own_session(self, child: Child) -> ServerSession | None:
        """A `session` child's one legacy session, when nothing is in flight (its standalone stream)."""
        return None if child.in_flight else self._sole_session(child)

    async def _ask(self, child: Child, method: str, params: Any) -> Any:
        """A request from the child (sampling, elicitation, roots) to the client it serves.

        roots/list goes only to the session of a child that serves one session alone. For the
        others: a 2026-07-28 call that is the child's only one in flight answers it by multi-round-trip
        (rounds.py). Otherwise it goes on the stream of the request in flight on that child
        when they all come from one legacy session; with none in flight, on the standalone
        stream of a `session` child's session. A shared child with several callers cannot
        say whose question it is: the child gets an error.
        """
        request_type, result_type = _REQUESTS[method]
        request = request_type(params=params) if params is not None else request_type()
        if method == "roots/list":
            # Roots say what a client lets the server see, and a server keeps them for what it does
            # next (server-filesystem narrows its directories to them; server-everything asks at
            # start, while the call that started it is in flight). Asked of whichever client has a
            # call in flight, one client's roots would rule the child for every other: only a child
            # of one legacy session asks its client.
            peer = self._sole_session(child)
            if peer is None:
                return types.ErrorData(code=types.INVALID_REQUEST, message=(
                    "roots/list: this stdio server's process serves several clients (isolation 'shared', or the "
                    "pool for 2026-07-28 calls), so no one client's roots are its own"))
            caller = self._caller(child)  # on the stream of its call in flight, when it has one
            try:
                if caller is not None and caller.session is peer and caller.session.can_send_request:
                    return await peer.send_request(
                        request, result_type, metadata=ServerMessageMetadata(related_request_id=caller.request_id))
                return await peer.send_request(request, result_type)
            except MCPError as exc:
                return types.ErrorData(code=exc.code, message=exc.message, data=exc.data)
        if len(child.in_flight) == 1 and (replay := self.replays.get(id(child.in_flight[0]))) is not None:
            answer = await replay.answer(request)
            if answer is None:
                return types.ErrorData(code=types.INTERNAL_ERROR, message="the client is asked in a new round")
            return result_type.model_validate(answer, by_name=False)
        try:
            caller = self._caller(child)
            if caller is not None and caller.session.can_send_request:
                return await caller.session.send_request(
                    request, result_type, metadata=ServerMessageMetadata(related_request_id=caller.request_id))
            peer = self._own_session(child)
            if peer is not None:
                return await peer.send_request(request, result_type)
        except MCPError as exc:
            return types.ErrorData(code=exc.code, message=exc.message, data=exc.data)
        return types.ErrorData(code=types.INVALID_REQUEST,
                               message=f"{method}: no single client of this bridge can answer it")

    async def _notify(self, child: Child, notification: types.ServerNotification) -> None:
        """A notification from the child: list changes to all its sessions and to 2026-07-28
        listeners; resource updates to the sessions that subscribed; log messages to the one
        client it serves (the caller in flight, else a `session` child's session)."""
        method = notification.method
        if method in _CHANGES:
            if method == "notifications/tools/list_changed" and self._tg is not None:
                self._tg.start_soon(self._relearn_tools, child)
            await self.bus.publish(_CHANGES[method]())
            await self._send(notification, [(self.peers[sid], None) for sid in child.session_ids if sid in self.peers])
        elif method == "notifications/resources/updated":
            uri = str(notification.params.uri)
            await self.bus.publish(ResourceUpdated(uri=uri))
            await self._send(notification, [(self.peers[sid], None) for sid in child.session_ids
                                            if sid in self.peers and uri in self.subscriptions.get(sid, ())])
        elif method == "notifications/message":
            modern = [ctx for ctx in child.in_flight if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS]
            if len(child.in_flight) == 1 and modern:
                p = notification.params
                with contextlib.suppress(Exception):  # the request may just have ended
                    await modern[0].session.send_log_message(p.level, p.data, p.logger,
                                                             related_request_id=modern[0].request_id)
                return
            caller = self._caller(child)
            if caller is not None:
                await self._send(notification, [(caller.session, caller.request_id)])
            elif (peer := self._own_session(child)) is not None:
                await self._send(notification, [(peer, None)])
            else:
                logger.debug("stdio server %s: a log message with no single client to go to", self.spec.server)

    async def _send(self, notification: types.ServerNotification, targets: list[tuple[ServerSession, Any]]) -> None:
        for session, related in targets:
            try:
                await session.send_notification(notification, related_request_id=related)
            except Exception as exc:  # a client gone mid-send must not stop the others
                logger.debug("stdio server %s: %s not delivered: %r", self.spec.server, notification.method, exc)
