"""A bridged stdio server hosted by the appliance: the children's logs, a worker's kill -9, a crash loop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import Appliance, http, new_appliance, running, wait_until
from tests.integration.bridgekit import alive, bridged_appliance, commands, guards, tree
from tests.integration.clients import modern_request
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.integration

TINY = str(Path(__file__).with_name("tiny_stdio_server.mjs"))
MARKER = f"supervision-{os.getpid()}"
SECRET = f"s3cret-{os.getpid()}"


@pytest.fixture(scope="module")
def wrapped() -> Iterator[Appliance]:
    """The tiny server behind a shell (as `npx` puts node behind itself): the real server is a grandchild."""
    command = ["sh", "-c", f'echo "tiny starting {MARKER}" >&2; node {TINY} {MARKER}; exit $?']
    with running(bridged_appliance(2, command=command, isolation="shared", env={"TINY_TOKEN": SECRET})) as app:
        for k in range(2):
            wait_until(lambda k=k: servers_of(app.worker_pid(k)), 30, f"worker {k}'s child started")
        yield app


def servers_of(worker: int) -> list[int]:
    """The tiny servers running under `worker` (grandchildren of its guards)."""
    return [pid for pid in tree(worker) if MARKER in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            and b"node" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_child_stderr_reaches_the_worker_log_as_json_tagged_with_the_server(wrapped: Appliance) -> None:
    log = Path(wrapped.settings["log_dir"]) / "worker-00.log"

    def tagged_line() -> dict[str, object] | None:
        for line in log.read_text(errors="replace").splitlines():
            if MARKER in line and line.startswith("{"):
                return json.loads(line)
        return None
    record = wait_until(tagged_line, 10, "the child's stderr line in worker-00's JSON log")
    assert record["message"] == f"tiny starting {MARKER}" and record["server"] == "test"
    assert record["logger"] == "appliance.bridge.child"
    assert SECRET not in log.read_text(errors="replace"), "a secret from the child's env reached the log"


def test_killed_worker_takes_its_children_with_it_within_2s(wrapped: Appliance) -> None:
    worker = wrapped.worker_pid(0)
    family = tree(worker)
    assert guards(worker) and servers_of(worker), family
    other = servers_of(wrapped.worker_pid(1))
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in family), 2.0,
               f"worker 0's guard, shell and server ({family}) gone after its kill -9")
    assert all(alive(pid) for pid in other), "worker 1's child is not affected"
    # supervisord restarts the worker, which starts a child of its own again.
    wait_until(lambda: wrapped.worker_pid(0) != worker and servers_of(wrapped.worker_pid(0)), 30,
               "the restarted worker's child")


@pytest.fixture(scope="module")
def crashing() -> Iterator[Appliance]:
    with running(bridged_appliance(1, command=["sh", "-c", "echo always failing >&2; exit 3"])) as app:
        yield app


def test_a_crash_looping_server_is_reported_and_refused_with_503(crashing: Appliance) -> None:
    def looping() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        samples = scrape(crashing)
        return samples if total(samples, "mcp_appliance_stdio_crash_looping", server="test") == 1 else None
    samples = wait_until(looping, 30, "the crash loop in /metrics")
    assert total(samples, "mcp_appliance_stdio_child_restarts_total", server="test") >= 5
    assert total(samples, "mcp_appliance_stdio_children", server="test") == 0
    worker = crashing.worker_pid(0)
    headers, body = modern_request("tools/list", None, {})
    status, _, raw = http("POST", crashing.mcp_url, body, headers)
    assert status == 503, raw
    error = json.loads(raw)["error"]
    assert error["data"]["reason"] == "crash_loop" and "crash-looping" in error["message"]
    # Not retried in a hot loop: nothing is starting now.
    assert not commands(worker)


def test_stopping_the_appliance_ends_every_child() -> None:
    marker = f"stop-{os.getpid()}"
    app = bridged_appliance(1, command=["node", TINY, marker], isolation="shared")
    with running(app):
        wait_until(lambda: commands(app.worker_pid(0)), 30, "the worker's child started")
        child = commands(app.worker_pid(0))[0].pid
    # running() stopped the appliance (SIGTERM to supervisord, which stops the worker).
    wait_until(lambda: not alive(child), 5, "the child ended with the appliance")
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]


def test_a_hung_child_is_restarted_after_hang_timeout_and_the_server_answers_again() -> None:
    """A stdio server that is alive but answers nothing (SIGSTOP: as a blocked event loop) holds every call
    sent to it: the watchdog pings each child and restarts one silent for workers.hang_timeout."""
    marker = f"hung-{os.getpid()}"
    app = new_appliance(1)
    app.settings["workers"]["hang_timeout"] = 3
    app.settings["servers"] = {"tiny": {"command": ["node", TINY, marker]}}

    def tiny() -> list[int]:
        found = []
        for pid in tree(app.worker_pid(0)):  # node itself, not its guard (whose arguments name it too)
            with contextlib.suppress(FileNotFoundError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"node") and marker.encode() in argv:
                    found.append(pid)
        return found

    def answers() -> bool:
        headers, body = modern_request("tools/call", "ping", {"name": "ping", "arguments": {}})
        status, _, out = http("POST", app.url + "/servers/tiny/mcp", body, headers, timeout=5)
        return status == 200 and b"pong" in out

    with running(app):
        [hung] = wait_until(tiny, 30, "the tiny server started")
        restarts = total(scrape(app), "mcp_appliance_stdio_child_hang_restarts_total", stdio_child="tiny")
        os.kill(hung, signal.SIGSTOP)
        try:
            wait_until(lambda: tiny() and hung not in tiny(), 30, "a new child in place of the hung one")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
        wait_until(answers, 30, "the server answers again")
        assert total(scrape(app), "mcp_appliance_stdio_child_hang_restarts_total", stdio_child="tiny") == restarts + 1
