"""appliance/sockets.py on a real stopped process: the connections it holds end, the process and its listener stay."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.sockets import shut_down_connections
from tests.harness import wait_until

SERVER = textwrap.dedent("""
    import socket, sys, time
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sys.argv[1])
    listener.listen(16)
    accepted = listener.accept()[0]  # one connection it took before it froze
    print("accepted", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def stopped_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    path = tmp_path / "worker.sock"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        wait_until(path.exists, 10, "the server listens")
        yield proc, path
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # ours, by pid
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                break
        proc.wait(10)


def test_a_stopped_process_loses_the_connections_it_holds_and_keeps_its_listener(
    stopped_server: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, path = stopped_server
    held = socket.socket(socket.AF_UNIX)
    held.connect(str(path))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "accepted"
    os.kill(proc.pid, signal.SIGSTOP)
    queued = socket.socket(socket.AF_UNIX)  # waits in the accept queue: a stopped process takes none
    queued.connect(str(path))
    for sock in (held, queued):
        sock.sendall(b"POST /mcp HTTP/1.1\r\n\r\n")
        sock.settimeout(5)

    assert shut_down_connections(proc.pid, path) == 2

    # Each ends at once instead of waiting for an answer: end-of-file, or a reset for the one that
    # was taken from the queue and closed with its request unread (nginx treats both as a dead worker).
    assert held.recv(100) == b""
    try:
        assert queued.recv(100) == b""
    except ConnectionResetError:
        pass
    held.close()
    queued.close()
    assert proc.poll() is None, "the process itself lives on"
    again = socket.socket(socket.AF_UNIX)  # and still listens: it can come back into service
    again.connect(str(path))
    again.close()


def test_a_process_with_no_connections_is_left_alone(stopped_server: tuple[subprocess.Popen[str], Path],
                                                     tmp_path: Path) -> None:
    proc, _ = stopped_server
    assert shut_down_connections(proc.pid, tmp_path / "other.sock") == 0
