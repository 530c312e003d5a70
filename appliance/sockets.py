"""Ending the connections another process holds on its unix socket, without stopping that process.

A worker that stops answering (SIGSTOP, a blocked event loop) keeps every request nginx
already sent it: nginx waits for an answer up to `http.read_timeout`, and nothing but the
worker can close those connections. The watchdog (appliance/watchdog.py) can: it takes a
duplicate of each such socket from the worker (pidfd_getfd(2), Linux 5.6+; same user, and
the worker stays dumpable, see appliance/lifetime.py) and shuts it down. nginx then reads
end-of-file at once and answers as for a worker that died mid-call (a read is retried on
another worker, anything else gets the "may or may not have taken effect" JSON-RPC error),
while the worker itself lives on: when it answers again it only finds those connections
closed. Its listening socket is left alone, so it can come back into nginx's pool.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from pathlib import Path

#: pidfd_getfd's system call number on x86-64 and arm64 alike (both use the generic table here).
_SYS_PIDFD_GETFD = 438
#: /proc/net/unix "Flags": a listening socket.
_SO_ACCEPTCON = 0x10000
#: /proc/net/unix "St": SS_CONNECTED (an accepted socket).
_CONNECTED = 3

_libc = ctypes.CDLL(None, use_errno=True)


def socket_inodes(path: Path) -> tuple[set[int], set[int]]:
    """Inodes of the sockets bound to the unix socket `path`: (listening, accepted and connected)."""
    wanted = os.fsencode(str(path))
    listening, connected = set(), set()
    with open("/proc/net/unix", "rb") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            if len(fields) < 8 or fields[7] != wanted:
                continue
            flags, state, inode = int(fields[3], 16), int(fields[5], 16), int(fields[6])
            if flags & _SO_ACCEPTCON:
                listening.add(inode)
            elif state == _CONNECTED:
                connected.add(inode)
    return listening, connected


def fds_of(pid: int, inodes: set[int]) -> list[tuple[int, int]]:
    """(fd, inode) of the file descriptors of process `pid` that are the sockets `inodes`."""
    fds = []
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(entry.path)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            fds.append((int(entry.name), int(target[8:-1])))
    return fds


def shut_down_connections(pid: int, path: Path) -> int:
    """Shut down every connection to process `pid`'s unix socket `path`; how many.

    Those it accepted, and those still waiting in its accept queue (a stopped or blocked
    process accepts none: nginx's request is already in them), which are accepted here and
    shut down. OSError when the process cannot be reached (gone, another user, not dumpable,
    a seccomp filter that forbids pidfd_getfd): the caller falls back on restarting it.
    """
    listening, connected = socket_inodes(path)
    fds = fds_of(pid, listening | connected)
    if not fds:
        return 0
    pidfd = os.pidfd_open(pid)
    try:
        done = 0
        for fd, inode in fds:
            dup = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if dup < 0:
                err = ctypes.get_errno()
                if err == errno.EBADF:  # closed since we listed it
                    continue
                raise OSError(err, f"pidfd_getfd(pid {pid}, fd {fd}): {os.strerror(err)}")
            with socket.socket(fileno=dup) as sock:
                if inode in listening:
                    done += _refuse_queued(sock)
                else:
                    done += _shut(sock)
        return done
    finally:
        os.close(pidfd)


def _shut(sock: socket.socket) -> int:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # the peer closed it meanwhile
        return 0
    return 1


def _refuse_queued(listener: socket.socket) -> int:
    """Accept and shut down what waits in `listener`'s queue (the worker's own fd stays open)."""
    # The same open file as the worker's: it is non-blocking there already (an event loop's).
    listener.settimeout(0.0)
    done = 0
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return done
        with conn:
            done += _shut(conn)
