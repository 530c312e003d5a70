"""Finding the external tools the deploy checks run, and what to do when one is missing.

scripts/test.sh installs them (Debian packages on PATH; ansible, ansible-lint … into the
tool venv `$MCP_TOOLS_VENV`). A developer running one test file by hand may not
have them: the test is skipped, saying what is missing. Under CI a missing tool fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

TOOLS_VENV = Path(os.environ.get("MCP_TOOLS_VENV", "/opt/mcp-appliance-tools"))


def missing(reason: str) -> NoReturn:
    """Fail under CI (the test command installs everything), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: scripts/test.sh should have installed it)")
    pytest.skip(reason)


def require_tool(name: str, installed_by: str) -> str:
    """Path of `name` from the tool venv or PATH."""
    in_venv = TOOLS_VENV / "bin" / name
    if in_venv.is_file() and os.access(in_venv, os.X_OK):
        return str(in_venv)
    found = shutil.which(name)
    if not found:
        missing(f"{name} not found in {TOOLS_VENV}/bin or on PATH ({installed_by})")
    return found


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        missing(f"needs root: {why}")


def tools_env(**extra: str) -> dict[str, str]:
    """The environment for running tools: the tool venv's bin first on PATH (ansible-lint
    and ansible-playbook start their siblings by name), no colours."""
    env = dict(os.environ)
    env["PATH"] = f"{TOOLS_VENV / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.update({"ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "NO_COLOR": "1", "PY_COLORS": "0"})
    env.update(extra)
    return env
