"""External tools the deploy checks run (linters, validators, kubectl): found, or skipped/failed clearly.

Tools live in the tool venv ($MCP_TOOLS_VENV, default /opt/mcp-appliance-tools,
filled by scripts/test.sh from tests/tools-requirements.txt) or on PATH. Outside CI a
missing tool skips the test that needs it, with the reason; under CI (CI=true) it fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TOOLS_VENV = Path(os.environ.get("MCP_TOOLS_VENV", "/opt/mcp-appliance-tools"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip (developer machine) or fail (CI) because something the test needs is missing."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


def find_tool(name: str, how: str) -> str:
    """Path of tool `name` from the tool venv or PATH; `how` tells how to install it."""
    candidate = TOOLS_VENV / "bin" / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    unavailable(f"{name} not found in {TOOLS_VENV}/bin or on PATH ({how})")
    raise AssertionError("not reached")
