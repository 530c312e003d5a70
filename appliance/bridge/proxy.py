"""The SDK server side of the bridge: a lowlevel `Server` whose handlers pass each request to a child.

Requests go on raw (method and params as the client sent them, less the 2026-07-28
envelope keys), so any field a revision adds passes through; the SDK's runner shapes
each result for the client's era (cache hints, `resultType`, `serverInfo` stamp) and
the SDK client does the same towards the child, whatever revision it speaks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import mcp_types as types
from mcp.server.caching import CacheHint
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.exceptions import MCPError
from mcp_types.methods import CACHEABLE_METHODS, INPUT_REQUIRED_METHODS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from appliance.bridge.child import Child, ChildGone
from appliance.bridge.children import Refused
from appliance.bridge.rounds import Replay

#: `_meta` keys the bridge must not pass on: the 2026-07-28 envelope (the child speaks an older
#: revision) and the client's progress token (the SDK client puts its own in).
_ENVELOPE = "io.modelcontextprotocol/"
#: Params of the 2026-07-28 envelope and its multi-round-trip (the bridge's own, rounds.py).
_NOT_FOR_THE_CHILD = frozenset({"_meta", "inputResponses", "requestState"})
#: Capabilities the bridge proxies; others a child advertises (tasks, extensions) are not offered.
PROXIED_CAPABILITIES = ("tools", "resources", "prompts", "logging", "completions")
#: Requests the bridge passes to a child.
FORWARDED = (
    ("tools/list", types.PaginatedRequestParams), ("tools/call", types.CallToolRequestParams),
    ("resources/list", types.PaginatedRequestParams), ("resources/templates/list", types.PaginatedRequestParams),
    ("resources/read", types.ReadResourceRequestParams), ("resources/subscribe", types.SubscribeRequestParams),
    ("resources/unsubscribe", types.UnsubscribeRequestParams), ("prompts/list", types.PaginatedRequestParams),
    ("prompts/get", types.GetPromptRequestParams), ("completion/complete", types.CompleteRequestParams),
    ("logging/setLevel", types.SetLevelRequestParams),
)

#: The child for one request, held for the length of it (raises Refused or ChildGone on entry).
Lease = Callable[[ServerRequestContext[Any, Any]], AbstractAsyncContextManager[Child]]


def child_params(params: Any) -> dict[str, Any] | None:
    """The params to send the child: the client's, less the envelope and progress `_meta` keys."""
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return {k: v for k, v in params.items() if k not in _NOT_FOR_THE_CHILD}
    kept = {k: v for k, v in meta.items() if not k.startswith(_ENVELOPE) and k != "progressToken"}
    out = {k: v for k, v in params.items() if k not in _NOT_FOR_THE_CHILD}
    if kept:
        out["_meta"] = kept
    return out


async def with_replay(child: Child, ctx: ServerRequestContext[Any, Any], replay: Replay, on_progress: Any) -> Any:
    """The child's result, or (once it asks beyond the answers the request brought) the question for the client."""
    outcome: list[Any] = []
    failure: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        async def call() -> None:
            try:
                outcome.append(await child.forward(ctx.method, child_params(ctx.params), on_progress))
            except Exception as exc:  # raised after the group: a group would wrap it
                failure.append(exc)
            tg.cancel_scope.cancel()

        async def asked() -> None:
            await replay.asked.wait()
            tg.cancel_scope.cancel()  # cancels the call at the child: the retry runs it again

        tg.start_soon(call)
        tg.start_soon(asked)
    if failure:
        raise failure[0]
    return outcome[0] if outcome else replay.input_required()


def bridge_server(name: str, lease: Lease, bus: InMemorySubscriptionBus,
                  capabilities: Callable[[], Awaitable[dict[str, Any] | None]],
                  on_roots_changed: Callable[[ServerRequestContext[Any, Any]], Awaitable[None]],
                  replays: dict[int, Replay]) -> Server[Any]:
    """The lowlevel server that forwards every MCP request to the child `lease` picks."""

    async def forward(ctx: ServerRequestContext[Any, Any], _typed: Any) -> HandlerResult:
        async def report(progress: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(progress, total, message)

        # Only when the client asked: the SDK client then gives the child a token of its own.
        on_progress = report if (ctx.meta or {}).get("progress_token") is not None else None
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        replay = Replay.from_params(ctx.params) if modern and ctx.method in INPUT_REQUIRED_METHODS else None
        try:
            async with lease(ctx) as child:
                child.in_flight.append(ctx)
                try:
                    if replay is None:
                        result = await child.forward(ctx.method, child_params(ctx.params), on_progress)
                    else:
                        replays[id(ctx)] = replay
                        result = await with_replay(child, ctx, replay, on_progress)
                finally:
                    child.in_flight.remove(ctx)
                    if replay is not None:
                        replays.pop(id(ctx), None)
                        replay.ended.set()
        except Refused as exc:
            raise MCPError(code=types.INTERNAL_ERROR, message=str(exc), data={"reason": exc.reason}) from None
        except ChildGone as exc:
            raise MCPError(code=types.INTERNAL_ERROR, message=f"{exc}: the stdio server is not running",
                           data={"reason": "child_gone"}) from None
        if modern:
            # A child of an older revision never answers "input required": its result is complete.
            result.setdefault("resultType", "complete")
        return result

    async def initialize_like_the_child(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """`initialize` answers with the child's capabilities and instructions, not the bridge's own."""
        result = await call_next(ctx)
        if ctx.method != "initialize" or not isinstance(result, dict):
            return result
        child = await capabilities()
        if child is not None:
            caps = child.get("capabilities") or {}
            result["capabilities"] = {k: v for k, v in caps.items() if k in PROXIED_CAPABILITIES}
            if child.get("instructions"):
                result["instructions"] = child["instructions"]
        return result

    async def roots_changed(ctx: ServerRequestContext[Any, Any], _params: Any) -> None:
        await on_roots_changed(ctx)

    server: Server[Any] = Server(
        name,
        on_subscriptions_listen=ListenHandler(bus),
        # Nothing the bridge passes on may be cached across clients: a child may answer per session.
        cache_hints={method: CacheHint(ttl_ms=0, scope="private") for method in CACHEABLE_METHODS
                     if method != "server/discover"},
    )
    for method, params_type in FORWARDED:
        server.add_request_handler(method, params_type, forward)
    server.add_notification_handler("notifications/roots/list_changed", types.NotificationParams, roots_changed)
    server.middleware.append(initialize_like_the_child)
    return server
