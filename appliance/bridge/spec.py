"""What the bridge needs to know about one stdio server (built from `[servers.<name>]` by the config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ISOLATIONS = ("shared", "session")


@dataclass(frozen=True)
class StdioSpec:
    """One stdio MCP server as the bridge runs it; `env` holds resolved secrets: never log it."""

    server: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    cwd: Path | None = None
    isolation: str = "shared"
    max_children: int = 16
    idle_timeout: float = 1800.0
    json_response: bool = False
    sessions: bool = True
    path: str = "/mcp"
    max_sessions: int = 10000
    log_name: str = ""
    #: Seconds a child may stay alive but not answer ping before it is restarted (workers.hang_timeout).
    hang_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(f"server {self.server!r}: command is empty")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"server {self.server!r}: isolation {self.isolation!r} is not one of {ISOLATIONS}")
        if self.max_children < 1:
            raise ValueError(f"server {self.server!r}: max_children must be at least 1")

    @property
    def tag(self) -> str:
        """How the child's stderr lines are tagged in the JSON logs."""
        return self.log_name or self.server
