"""Real MCP servers nobody here wrote, where scripts/test.sh installs them (npm and PyPI)."""

from __future__ import annotations

import os
from pathlib import Path

#: scripts/test.sh installs the npm servers here (`npm install --prefix`) and mcp-server-time in a venv of its own.
ROOT = Path(os.environ.get("MCP_TEST_VENV", "/opt/mcp-appliance-test"))
NPM_BIN = ROOT / "npm" / "node_modules" / ".bin"
TIME_VENV = ROOT / "time-venv"


def _require(path: Path) -> str:
    if not os.access(path, os.X_OK):
        raise AssertionError(f"{path} is missing: run `sudo bash scripts/test.sh` (it installs the third-party "
                             "MCP servers the bridge tests run)")
    return str(path)


def everything() -> tuple[str, ...]:
    """@modelcontextprotocol/server-everything over stdio."""
    return (_require(NPM_BIN / "mcp-server-everything"),)


def filesystem(*roots: str) -> tuple[str, ...]:
    """@modelcontextprotocol/server-filesystem serving `roots`."""
    return (_require(NPM_BIN / "mcp-server-filesystem"), *roots)


def time_server() -> tuple[str, ...]:
    """mcp-server-time from PyPI, in its own venv (it pins its own mcp)."""
    return (_require(TIME_VENV / "bin" / "mcp-server-time"), "--local-timezone", "UTC")


def supergateway() -> str:
    """supergateway (npm), the stdio-to-HTTP bridge the benchmark compares against."""
    return _require(NPM_BIN / "supergateway")
