"""Only the orphans of a dead nginx master are cleared before a new master starts."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.nginx_master import clear_orphans, orphaned_workers


def test_no_pid_file_means_nothing_to_clear(tmp_path: Path) -> None:
    assert orphaned_workers(tmp_path / "nginx.pid") == []
    assert clear_orphans(tmp_path / "nginx.pid") == 0


def test_processes_that_are_not_nginx_are_never_touched(tmp_path: Path) -> None:
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text(f"{os.getpgid(0)}\n")  # this test's own process group: python, not nginx
    assert orphaned_workers(pid_file) == []
    pid_file.write_text("not a pid\n")
    assert orphaned_workers(pid_file) == []
