"""The README's command blocks that the booted-host test runs verbatim.

A block is an indented code block right after the line
`<!-- run verbatim by tests/deploy/test_install.py: NAME -->`. Each line is one command; a
line ending in a backslash goes on in the next one, as in a shell.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"^<!-- run verbatim by tests/deploy/test_install\.py: ([\w-]+) -->$")
#: The blocks the booted-host test runs (tests/deploy/test_install.py).
BLOCKS = ("install", "first-steps", "curl-tools", "admin-token", "preinstall", "upgrade", "backup", "restore",
          "uninstall")


def readme_blocks(text: str | None = None) -> dict[str, list[str]]:
    """name -> the commands of that block, exactly as printed (continuation lines joined by
    backslash-newline, which the shell reads as one line)."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks: dict[str, list[str]] = {}
    for at, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        assert marker[1] not in blocks, f"README has two blocks named {marker[1]!r}"
        commands: list[str] = []
        pending = ""
        rest = iter(lines[at + 1:])
        for code in rest:
            if code.strip():
                break
        else:
            code = ""
        while code.startswith("    ") or not code.strip():
            if code.strip():
                pending += code[4:]
                if pending.endswith("\\"):
                    pending += "\n"
                else:
                    commands.append(pending)
                    pending = ""
            code = next(rest, "end")
        assert commands and not pending, f"README block {marker[1]!r} is empty or ends in a backslash"
        blocks[marker[1]] = commands
    return blocks


def as_root(command: str) -> str:
    """The command as root types it: the guest has no sudo, and its shell is root already."""
    return re.sub(r"(^|\$\(|; |&& )sudo ", r"\1", command)
