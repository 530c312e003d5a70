"""The live state of a running appliance where it may differ from appliance.toml.

`mcp-appliance run` writes `<run_dir>/runtime.json`; `scale`, `reload` and the admin
operations update it. It holds the live worker count (a `scale N` lasts until the next
restart, or until a reload finds a changed `workers.count` in appliance.toml), the
settings last applied (so a reload knows what changed) and how `run` rendered the files
(so a re-render from the unprivileged admin app produces the same supervisord.conf).
run_dir is emptied at every start (systemd's RuntimeDirectory, a container's tmpfs):
a restart always begins from appliance.toml, the one source of truth.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import Settings

STATE_FILE = "runtime.json"


@dataclass(frozen=True)
class RuntimeState:
    """What `run` and the operations since then decided."""

    #: The appliance.toml this appliance was started with.
    config_path: str
    #: The fields of render.RenderContext that `run` used.
    render_context: dict[str, Any]
    #: workers.count of appliance.toml when it was last applied (run or reload).
    config_workers: int
    #: The live worker count: config_workers, or what `scale` set since.
    workers: int
    #: The settings last applied (config.redacted form), to tell what a reload changes.
    applied: dict[str, Any] = field(default_factory=dict)


def state_path(run_dir: Path) -> Path:
    """Where the state is kept."""
    return run_dir / STATE_FILE


def read_state(run_dir: Path) -> RuntimeState | None:
    """The state, or None before the first `run` wrote it."""
    try:
        data = json.loads(state_path(run_dir).read_text())
    except FileNotFoundError:
        return None
    return RuntimeState(**data)


def write_state(run_dir: Path, state: RuntimeState) -> None:
    """Replace the state atomically (readers see the old or the new one, never half)."""
    target = state_path(run_dir)
    tmp = target.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(state), indent=1, sort_keys=True) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, target)


def with_workers(settings: Settings, count: int) -> Settings:
    """`settings` with `workers.count` = count."""
    return dataclasses.replace(settings, workers=dataclasses.replace(settings.workers, count=count))


def live_settings(settings: Settings) -> Settings:
    """`settings` with the live worker count of the running appliance (unchanged when none runs)."""
    state = read_state(settings.run_dir)
    if state is None or state.workers == settings.workers.count:
        return settings
    return with_workers(settings, state.workers)


def live_worker_count(settings: Settings) -> int:
    """How many workers the running appliance has now."""
    state = read_state(settings.run_dir)
    return settings.workers.count if state is None else state.workers
