"""A tiny tmpfs for tests of full and read-only disks (needs root; always unmounted)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(path: Path, size: str, mode: str = "0777") -> Iterator[Path]:
    """`path` (created) as a tmpfs of `size` (mount's syntax, e.g. "512k") for the block."""
    need_root()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        # Lazy: a process of the test that still holds a file there must not keep the mount.
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    """Remount the tmpfs at `path` with `options` ("ro", "rw")."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(path: Path, leave: int) -> Path:
    """Fill the filesystem of directory `path` with one ballast file until about `leave` bytes are free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    ballast = path / "ballast"
    with open(ballast, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
