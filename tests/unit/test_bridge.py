"""The bridge's pure parts and its child guard, without an appliance."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.bridge import StdioSpec
from appliance.bridge.child import GUARD
from appliance.bridge.proxy import child_params


def test_spec_refuses_an_empty_command_and_an_unknown_isolation() -> None:
    with pytest.raises(ValueError, match="command is empty"):
        StdioSpec(server="files", command=())
    with pytest.raises(ValueError, match="isolation 'per-user'"):
        StdioSpec(server="files", command=("x",), isolation="per-user")


def test_spec_never_shows_its_environment() -> None:
    spec = StdioSpec(server="gh", command=("x",), env=(("GITHUB_TOKEN", "ghp_secret"),))
    assert "ghp_secret" not in repr(spec) and "ghp_secret" not in str(spec)


def test_child_params_drop_the_2026_envelope_and_the_clients_progress_token() -> None:
    params = {"name": "echo", "arguments": {"m": 1}, "_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "progressToken": 7, "traceparent": "00-ab-cd-01"}}
    assert child_params(params) == {"name": "echo", "arguments": {"m": 1}, "_meta": {"traceparent": "00-ab-cd-01"}}
    assert child_params({"_meta": {"progressToken": 1}}) == {}
    assert child_params(None) is None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_guard_refuses_to_run_when_its_worker_is_already_gone(tmp_path: Path) -> None:
    touched = tmp_path / "ran"
    done = subprocess.run([sys.executable, "-I", "-S", GUARD, "1", "--", "touch", str(touched)], timeout=10)
    assert done.returncode == 75 and not touched.exists()


def test_guard_ends_a_process_that_left_the_group_when_the_command_exits() -> None:
    # setsid: the sleeper leaves the command's process group and session, as a daemonizing server would.
    guard = subprocess.Popen([sys.executable, "-I", "-S", GUARD, str(os.getpid()), "--", "sh", "-c",
                              "setsid sleep 300 & echo $!; exit 4"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert guard.stdout is not None
    sleeper = int(guard.stdout.readline())
    assert guard.wait(10) == 4, "the guard exits with the command's status"
    deadline = time.monotonic() + 5
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(sleeper), "the escaped process outlived the guard"


def test_a_replay_carries_the_clients_answers_in_order_and_refuses_a_foreign_state() -> None:
    import anyio
    import mcp_types as types
    from mcp.shared.exceptions import MCPError

    from appliance.bridge.rounds import Replay

    question = types.ListRootsRequest()

    async def rounds() -> None:
        first = Replay.from_params({"name": "t"})
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.answer, question)
            await first.asked.wait()
            first.ended.set()
        asked = first.input_required()
        assert asked["resultType"] == "input_required" and list(asked["inputRequests"]) == ["r0"]
        second = Replay.from_params({"requestState": asked["requestState"], "inputResponses": {"r0": {"roots": []}}})
        assert await second.answer(question) == {"roots": []}

    anyio.run(rounds)
    with pytest.raises(MCPError, match="Invalid or expired requestState"):
        Replay.from_params({"requestState": "sealed-by-someone-else", "inputResponses": {}})
    with pytest.raises(MCPError, match="must answer 'r0'"):
        Replay.from_params({"requestState": asked_state(), "inputResponses": {}})


def asked_state() -> str:
    from appliance.bridge.rounds import STATE_PREFIX

    return STATE_PREFIX + "W10="  # base64 of []
