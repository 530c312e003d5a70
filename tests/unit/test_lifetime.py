"""Processes tied to their parent's life: they get their signal when it dies, and exit if it is gone already."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from appliance.lifetime import ORPHANED, is_worker_command, supervisord_pidfile

#: A parent playing supervisord: writes its pid file, starts a child that ties its life to the
#: parent's (CHILD), reports the child's pid, then waits.
PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from appliance.lifetime import supervisord_pidfile
    from pathlib import Path
    supervisord_pidfile(Path(sys.argv[2])).write_text(f"{os.getpid()}\\n")
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
    print(child.pid, flush=True)
    time.sleep(120)
""")
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from appliance.lifetime import die_with_supervisord
    die_with_supervisord(Path(sys.argv[1]), "test")
    print("tied", flush=True)
    time.sleep(120)
""")


def test_a_child_dies_when_its_supervisord_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        assert parent.stdout.readline().strip() == "tied"  # the child shares the parent's stdout
        parent.kill()
        parent.wait(10)
        child.wait(10)  # raises TimeoutExpired if the child outlived its parent
    finally:
        for proc in (parent, child):  # only what this test started, by pid
            with contextlib.suppress(psutil.Error, ProcessLookupError, AttributeError):
                proc.kill()  # type: ignore[union-attr]
        parent.wait(10)


def test_a_program_whose_parent_is_not_its_supervisord_exits_at_once(tmp_path: Path) -> None:
    supervisord_pidfile(tmp_path).write_text("1\n")  # supervisord was someone else: ours is gone
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == ORPHANED
    assert "tied" not in result.stdout
    assert "is not supervisord" in result.stderr


def test_a_program_without_a_supervisord_pid_file_exits_at_once(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == ORPHANED


def test_worker_command_lines_are_told_from_the_other_programs() -> None:
    base = ["/opt/mcp-appliance/bin/python", "-m", "appliance", "--config", "/etc/a.toml"]
    assert is_worker_command([*base, "worker", "--index", "3"])
    for other in (["admin"], ["events"], ["nginx", "/usr/sbin/nginx", "-c", "x"], ["worker", "--index", "x"], []):
        assert not is_worker_command([*base, *other])
