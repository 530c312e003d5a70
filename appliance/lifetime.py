"""How the appliance's processes end: never after supervisord, and all at once when it stops.

supervisord does not take its children with it when it is killed (kill -9, the OOM
killer, a crash): they are re-parented and keep their ports, so nginx still answers and
the next start fails on a port clash. Each program therefore asks the kernel for a
signal when its parent dies (prctl PR_SET_PDEATHSIG), as the first thing it does after
supervisord exec'd it:

- in the program, not in supervisord: the kernel clears the setting when a process
  changes its credentials, and supervisord switches to the service user after the fork;
  exec keeps it (our programs and nginx are not set-user-ID and have no file capabilities);
- the signal follows the death of the parent *thread*; supervisord is single-threaded;
- supervisord may have died between the fork and the prctl: the program then finds a
  parent other than the supervisord of its run_dir and exits at once;
- SIGTERM, not SIGKILL: a worker ends its streams and lets in-flight calls finish (and
  leave their audit records) within workers.graceful_timeout; once supervisord is gone a
  thread ends it STOP_MARGIN later whatever it is doing (a blocked event loop never sees
  the SIGTERM). The nginx master takes its own worker processes down on SIGTERM (they
  get no signal of their own).

A stop (SIGTERM to supervisord) is bounded for another reason: supervisord stops one
process group at a time — nginx, then the admin app, then each worker, its own group
(supervisord.conf.j2). nginx's graceful stop waited for the SSE streams the workers held
open until supervisord killed it, then each worker's stop began after the one before.
The event listener therefore sends SIGTERM to every worker the moment supervisord starts
stopping (`terminate_workers`): they end their streams (gate/drain.py), which lets
nginx's stop finish, and drain side by side.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4

#: Seconds past its graceful timeout after which a program whose supervisord died exits regardless.
STOP_MARGIN = 3.0

#: Seconds between two looks at the parent pid by the thread that enforces STOP_MARGIN.
PARENT_POLL = 0.5

#: Exit status of a program whose supervisord was gone before it could ask to die with it.
ORPHANED = 75


class LifetimeError(OSError):
    """The kernel refused to tie this process's life to its parent's."""


def supervisord_pidfile(run_dir: Path) -> Path:
    """Where supervisord writes its pid (before it starts any program)."""
    return run_dir / "supervisord.pid"


def supervisord_pid(run_dir: Path) -> int | None:
    """The pid supervisord of `run_dir` wrote, or None."""
    try:
        return int(supervisord_pidfile(run_dir).read_text().strip())
    except (OSError, ValueError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent (thread) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise LifetimeError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def stay_reachable_by_the_watchdog() -> None:
    """Let processes of the same user take this process's sockets (pidfd_getfd, appliance/sockets.py).

    A process started as root that switched user is not dumpable, and then only root may
    reach into it; the watchdog runs as the service user. Every process of the appliance
    runs as that one user anyway, so this widens nothing beyond it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise LifetimeError(err, f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}")


def die_with_supervisord(run_dir: Path, program: str, grace: float | None = None) -> None:
    """Tie this program's life to the supervisord of `run_dir`; exit now if that is already gone.

    Call it first thing in a program supervisord starts (after its user switch, see above).
    With `grace`, the process also ends `grace` seconds after supervisord died whatever it
    is doing: SIGTERM is handled by the event loop, which a blocking call can hold, and no
    supervisord is left to send SIGKILL after stopwaitsecs.
    """
    die_with_parent(signal.SIGTERM)
    parent, expected = os.getppid(), supervisord_pid(run_dir)
    # Checked after the prctl: a parent that dies from here on sends the signal.
    if parent != expected:
        try:
            print(f"mcp-appliance {program}: parent {parent} is not supervisord ({supervisord_pidfile(run_dir)}: "
                  f"{expected}); it died, or this program was not started by it: exiting", file=sys.stderr, flush=True)
        finally:
            os._exit(ORPHANED)
    if grace is not None:
        threading.Thread(target=_end_after_parent, args=(parent, grace, program), name="parent-watch",
                         daemon=True).start()


def _end_after_parent(parent: int, grace: float, program: str) -> None:
    """In a thread: once `parent` is gone, give the process `grace` seconds, then end it."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    time.sleep(grace)
    try:  # stderr was a pipe to supervisord: the write may fail, the exit must not
        print(f"mcp-appliance {program}: supervisord died and this process still runs after {grace:.0f}s: exiting",
              file=sys.stderr, flush=True)
    finally:
        os._exit(1)


def is_worker_command(cmdline: list[str]) -> bool:
    """Whether a command line is an appliance worker's (`… worker --index K`)."""
    return len(cmdline) >= 3 and cmdline[-3] == "worker" and cmdline[-2] == "--index" and cmdline[-1].isdigit()


def terminate_workers(supervisord: int) -> list[int]:
    """SIGTERM every worker child of `supervisord` at once; their pids.

    Found as supervisord's children rather than asked for: a stopping supervisord refuses
    XML-RPC calls (SHUTDOWN_STATE), and a worker still within startsecs is already serving.
    """
    sent = []
    try:
        children = psutil.Process(supervisord).children()
    except psutil.Error:
        return sent
    for child in children:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if is_worker_command(child.cmdline()):
                child.send_signal(signal.SIGTERM)
                sent.append(child.pid)
    return sent
