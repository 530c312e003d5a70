"""What the worker's /health reads about its stdio servers: `bridge_status()`."""

from __future__ import annotations

from typing import Any, Protocol


class _Reports(Protocol):
    def status(self) -> dict[str, Any]: ...


_SERVERS: dict[str, _Reports] = {}


def register(server: str, children: _Reports) -> None:
    """A bridge's lifespan began: its children are reported from now on."""
    _SERVERS[server] = children


def unregister(server: str, children: _Reports) -> None:
    if _SERVERS.get(server) is children:
        del _SERVERS[server]


def bridge_status() -> dict[str, dict[str, Any]]:
    """Per stdio server in this worker: isolation, children (running), max_children, up, restarts,
    crash_looping, pids. `up` is false while a shared server has no child or any server crash-loops."""
    return {server: children.status() for server, children in sorted(_SERVERS.items())}
