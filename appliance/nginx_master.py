"""nginx under supervisord: before a new master starts, the workers of a dead one go.

When the nginx master dies without stopping its workers (kill -9, OOM killer), the
workers live on as orphans and keep the listening port: a new master cannot bind it and
supervisord would restart nginx forever. supervisord runs `mcp-appliance nginx <argv>`,
which asks such orphans to finish their requests and exit (QUIT, then KILL after a
bound), then becomes nginx itself (exec: supervisord's signals reach the master).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

import psutil

from appliance.lifetime import die_with_supervisord

logger = logging.getLogger("appliance.nginx")

#: Seconds orphaned workers get to finish their requests before they are killed.
ORPHAN_GRACE = 3.0


def orphaned_workers(pid_file: Path) -> list[psutil.Process]:
    """nginx worker processes whose master (named in `pid_file`) is gone."""
    try:
        master = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return []
    if psutil.pid_exists(master):
        try:
            if psutil.Process(master).name() == "nginx":
                return []  # the master lives: nothing is orphaned
        except psutil.Error:
            pass
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            # Workers stay in their master's process group (supervisord made it a group leader).
            if proc.info["name"] == "nginx" and os.getpgid(proc.pid) == master:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


#: The title an nginx worker process takes once it has a QUIT (a reload's old workers): from then
#: on it accepts no new connection (it closes its listeners right after) and only finishes its own.
SHUTTING_DOWN = "worker process is shutting down"


def accepting_workers(pid_file: Path) -> set[int]:
    """The pids of the worker processes of the master named in `pid_file` that take new connections."""
    try:
        master = psutil.Process(int(pid_file.read_text().strip()))
        children = master.children()
    except (OSError, ValueError, psutil.Error):
        return set()
    found = set()
    for child in children:
        with contextlib.suppress(psutil.Error):  # exited meanwhile: not accepting
            title = " ".join(child.cmdline())
            if "worker process" in title and SHUTTING_DOWN not in title:
                found.add(child.pid)
    return found


def clear_orphans(pid_file: Path, grace: float = ORPHAN_GRACE) -> int:
    """Stop the orphaned workers of a dead master gracefully, then forcibly; how many there were."""
    orphans = orphaned_workers(pid_file)
    for proc in orphans:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone already: fine
            proc.send_signal(signal.SIGQUIT)  # graceful: stop accepting, finish requests
    _, alive = psutil.wait_procs(orphans, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone already: fine
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)
    return len(orphans)


def exec_nginx(argv: list[str], run_dir: Path) -> None:
    """Clear a dead master's orphans, then replace this process with nginx `argv`.

    The master dies with supervisord (appliance/lifetime.py: the setting survives exec):
    SIGTERM is nginx's fast shutdown, in which the master stops its worker processes too.
    """
    die_with_supervisord(run_dir, "nginx")
    count = clear_orphans(run_dir / "nginx.pid")
    if count:
        logger.warning("stopped %d nginx workers left behind by a master that died", count)
    os.execv(argv[0], argv)

