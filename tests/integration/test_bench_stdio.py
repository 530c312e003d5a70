"""bench.stdio measures real calls to a real stdio server, and tells the server's processes from the bridge's.

Not a timing test (bench/stdio.py reports timings): each side must answer with successful
echo results (an answer that is not one must count as an error), and the CPU and memory
of the stdio server's own processes must not be booked on the bridge that starts them.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil
import pytest

from bench import stdio, wrk
from tests.deploy.deploy_tools import missing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server_bin() -> Path:
    for path in (stdio.SERVER_BIN, stdio.SUPERGATEWAY_BIN):
        if not path.exists():
            missing(f"{path} not found (scripts/test.sh installs the npm packages into {stdio.NPM_PREFIX})")
    return stdio.SERVER_BIN


def test_bare_child_calls_are_successful_echo_results(server_bin: Path) -> None:
    figures, cost = asyncio.run(stdio._bare(server_bin, 2, 1))
    assert figures.requests > 0 and figures.errors == 0
    assert cost.server_processes == 1 and cost.server_cpu_s > 0


def test_supergateway_sessions_are_counted_with_one_server_child_per_session(server_bin: Path) -> None:
    if os.geteuid() != 0:
        missing("supergateway runs in a network namespace of its own (root)")
    connections = 2
    # Long enough for every session's first answer: supergateway starts a child per session
    # (about 1.5 s on a loaded 2-core machine), and a run shorter than that has no answer at all.
    seconds = 5
    with stdio.supergateway(server_bin, stdio.SUPERGATEWAY_BIN, stateful=True) as side:
        figures, cost = stdio.measure(side.root, server_bin, lambda: wrk.run(
            side.url, "sessions", seconds, connections, stdio.TOOL, stdio.ARGUMENTS, success=stdio.SUCCESS,
            prefix=side.prefix))
        wrong = wrk.run(side.url, "sessions", seconds, 1, stdio.TOOL, {"message": "not the bench's"},
                        success=stdio.SUCCESS, prefix=side.prefix)
        gateway = [p for p in stdio.tree(side.root) if "supergateway" in " ".join(p.cmdline())]
    assert figures.requests > 0 and figures.errors == 0, figures.detail
    assert wrong.requests > 0 and wrong.errors == wrong.requests - 2  # all but initialize + initialized
    # Each session's child (a shell and node), and the probe's session; the gateway is the bridge.
    assert gateway and not any(stdio.is_server(p, server_bin) for p in gateway)
    assert cost.server_processes >= connections + 1 and cost.bridge_cpu_s > 0 and cost.bridge_rss_mib > 0
    assert not psutil.pid_exists(side.root.pid) or side.root.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("side", ["fastmcp", "bridge"])
def test_one_process_bridges_are_counted_with_their_one_server_child(server_bin: Path, side: str) -> None:
    if side == "fastmcp" and not stdio.FASTMCP_PYTHON.exists():
        missing(f"{stdio.FASTMCP_PYTHON} not found (scripts/test.sh makes fastmcp's venv)")
    start = stdio.fastmcp_proxy if side == "fastmcp" else stdio.bridge_alone
    with start(server_bin) as running:
        figures, cost = stdio.measure(running.root, server_bin, lambda: wrk.run(
            running.url, "sessions", 3, 2, stdio.TOOL, stdio.ARGUMENTS, success=stdio.SUCCESS))
    assert figures.requests > 0 and figures.errors == 0, figures.detail
    # One child serves every session; the bridge's own process is not booked as the server.
    assert cost.server_processes == 1 and cost.server_cpu_s > 0
    assert cost.bridge_cpu_s > 0 and cost.bridge_rss_mib > 0
    assert not psutil.pid_exists(running.root.pid) or running.root.status() == psutil.STATUS_ZOMBIE
