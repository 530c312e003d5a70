"""The guard between a worker and one stdio child: the child never outlives the worker.

Run as `python -I -S guard.py <worker-pid> -- <command…>` (standard library only, so it
starts in ~15 ms and holds ~8 MB). The worker starts it as the leader of a new session
(mcp.client.stdio does); it then

- asks the kernel for SIGTERM when the worker dies (PR_SET_PDEATHSIG), even on kill -9,
  and exits at once when the worker is already gone (died between fork and prctl);
- becomes a child subreaper, so processes the command starts and abandons (npx → node,
  a shell's background job, a double fork) are re-parented to it, not to init;
- runs the command in a process group of its own, with the guard's stdin, stdout and
  stderr (the MCP pipes and the stderr pipe pass through untouched: no copying);
- when the command exits, or on SIGTERM/SIGINT/SIGHUP (the worker's death, or the
  SDK's shutdown sending SIGTERM to the session), ends the command's group (SIGTERM,
  then SIGKILL after GRACE) and every process re-parented to it, then exits with the
  command's status.

PR_SET_PDEATHSIG alone would not do: it reaches only the direct child, and `npx` or a
shell wrapper leaves the real server behind as an orphan.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

#: Seconds the command's processes get between SIGTERM and SIGKILL.
GRACE = 0.5
#: Exit status when the worker was gone before the guard could tie itself to it.
ORPHANED = 75


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _children() -> list[int]:
    """Pids whose parent is this process (read from /proc: no psutil in an isolated interpreter)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.append(int(entry))
    return found


def _reap() -> None:
    """Collect every exited child without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _end_all(group: int) -> None:
    """SIGTERM the command's group, SIGKILL it after GRACE, then kill whatever was re-parented here."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
        for pid in _children():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + GRACE
            while time.monotonic() < deadline:
                _reap()
                if not _children():
                    return
                time.sleep(0.02)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        _reap()
        left = _children()
        if not left:
            return
        for pid in left:  # re-parented after the group was killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


class _Stop(Exception):
    """Raised by the signal handler: a plain flag would not end a blocking waitpid (PEP 475 retries it)."""


def _stop(sig: int, _frame: object) -> None:
    raise _Stop(sig)


def main(argv: list[str]) -> int:
    worker, sep, command = int(argv[0]), argv[1], argv[2:]
    if sep != "--" or not command:
        print("usage: guard.py <worker-pid> -- <command…>", file=sys.stderr)
        return 2
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != worker:  # checked after the prctl: a later death sends the signal
        return ORPHANED
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop)
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)
    try:
        os.setpgid(pid, pid)  # also here: whichever runs first, the group exists before any signal
    except OSError:
        pass
    print(f"mcp-appliance-guard: pid={pid}", file=sys.stderr, flush=True)
    # The guard holds no copy of the MCP pipes: only the command reads and writes them.
    for fd in (0, 1):
        os.close(fd)
    status = 0
    try:
        while True:
            try:
                done, raw = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if done == pid:
                status = os.waitstatus_to_exitcode(raw)
                break
    except _Stop:
        pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _end_all(pid)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
