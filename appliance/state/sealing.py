"""Hosted MCPServers seal requestState with the appliance's shared ring, not a per-process key.

`MCPServer` appends a `RequestStateBoundary` to its middleware, built over
`RequestStateSecurity.ephemeral()` (a key from os.urandom, one per process) unless the app
passes `request_state_security=`. Nothing in the built boundary says which: a per-process
policy looks like any one-key ring. So the worker records every policy `ephemeral()` makes
(`track_per_process_policies`, before the hosted app is imported) and swaps exactly those
for the shared ring. A policy the app built itself (`keys=` or `codec=`) is kept.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity

_PER_PROCESS: weakref.WeakSet[RequestStateSecurity] = weakref.WeakSet()
_TRACKING = "_mcp_appliance_tracks_per_process"


def track_per_process_policies() -> None:
    """From now on, remember every policy `RequestStateSecurity.ephemeral()` returns (idempotent)."""
    original = RequestStateSecurity.__dict__["ephemeral"].__func__
    if getattr(original, _TRACKING, False):
        return

    @functools.wraps(original)
    def ephemeral(cls: type[RequestStateSecurity], **kwargs: Any) -> RequestStateSecurity:
        policy = original(cls, **kwargs)
        _PER_PROCESS.add(policy)
        return policy

    setattr(ephemeral, _TRACKING, True)
    RequestStateSecurity.ephemeral = classmethod(ephemeral)  # type: ignore[method-assign,assignment]


def _boundary(server: MCPServer) -> tuple[int, RequestStateBoundary] | None:
    for k, middleware in enumerate(server.middleware):
        if isinstance(middleware, RequestStateBoundary):
            return k, middleware
    return None


def _policy(boundary: RequestStateBoundary) -> RequestStateSecurity:
    # The SDK keeps the policy private; this module is the one place that reads it.
    return boundary._security  # noqa: SLF001


def seals_per_process(server: MCPServer) -> bool:
    """Whether `server` would seal under a key only this process holds."""
    found = _boundary(server)
    return found is not None and _policy(found[1]) in _PER_PROCESS


def has_boundary(server: MCPServer) -> bool:
    """Whether `server` has the SDK's request-state boundary at all (every MCPServer of SDK 2.x does)."""
    return _boundary(server) is not None


def share_ring(server: MCPServer, keys: list[bytes], ttl: float) -> bool:
    """Seal `server`'s requestState with `keys` if it still has a per-process policy; True when swapped.

    The audience and principal binding of the replaced policy stay as they were.
    """
    found = _boundary(server)
    if found is None or _policy(found[1]) not in _PER_PROCESS:
        return False
    index, old = found
    policy = _policy(old)
    shared = RequestStateSecurity(keys=keys, ttl=ttl, bind_principal=policy.bind_principal, audience=policy.audience)
    server.middleware[index] = RequestStateBoundary(shared, default_audience=server.name)
    return True
