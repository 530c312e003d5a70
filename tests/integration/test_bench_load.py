"""The benchmark's load generator measures real MCP calls: wrk's Lua scripts against a real appliance.

Not a timing test (bench/run.py reports timings): each kind of traffic the benchmark
sends must be answered with successful tool results through nginx and the gate, and an
answer that is not a successful tool result must be counted as an error, or the
benchmark's figures would count failures as throughput.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import wrk
from bench.run import seed
from tests.harness import Appliance, new_appliance, running
from tests.integration.gatekit import add_key, write_config

pytestmark = pytest.mark.integration

CONNECTIONS = 4


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    with running(new_appliance(2)) as app:
        seed(app.mcp_url)
        yield app


def audited_calls(app: Appliance) -> int:
    """tools/call records in every worker's audit file."""
    audit = Path(app.settings["log_dir"]) / "audit"
    return sum(path.read_text().count('"method":"tools/call"') for path in audit.glob("worker-*.jsonl"))


@pytest.mark.parametrize("kind", ["modern", "sessions"])
def test_benchmark_traffic_is_successful_tool_calls(appliance: Appliance, kind: str) -> None:
    before = audited_calls(appliance)
    figures = wrk.run(appliance.mcp_url, kind, 1, CONNECTIONS, "get_note", {"id": 1})
    assert figures.requests > 0
    assert figures.errors == 0, figures.detail
    # wrk's count is of real calls: every one reached a worker and was audited (sessions:
    # initialize and initialized once per connection are requests too, and not tool calls;
    # a call still in flight on each connection when wrk stops may be cut short).
    setup = 2 * CONNECTIONS if kind == "sessions" else 0
    assert audited_calls(appliance) - before >= figures.requests - setup - CONNECTIONS


def test_stateless_benchmark_traffic_is_successful_tool_calls(make_appliance: Callable[..., Appliance]) -> None:
    app = make_appliance(1, mcp={"sessions": False})
    app.start()
    app.wait_healthy(timeout=60, workers=1)
    seed(app.mcp_url)
    figures = wrk.run(app.mcp_url, "stateless", 1, CONNECTIONS, "get_note", {"id": 1})
    assert figures.requests > 0
    assert figures.errors == 0, figures.detail


def test_an_answer_that_is_not_a_successful_tool_result_counts_as_an_error(appliance: Appliance) -> None:
    # get_note of a note that does not exist: HTTP 200 with isError true.
    figures = wrk.run(appliance.mcp_url, "modern", 1, 2, "get_note", {"id": 999_999})
    assert figures.requests > 0
    assert figures.errors == figures.requests, figures.detail


def test_benchmark_traffic_carries_the_credentials_it_is_given(make_appliance: Callable[..., Appliance]) -> None:
    # bench/gate_overhead.py measures the gate with an API key: wrk must send it with every call.
    app = make_appliance(1, auth={"mode": "api_keys"})
    app.settings["auth"]["keys_file"] = str(app.base / "keys.json")
    write_config(app)
    key = add_key(app, "bench")
    app.start()
    app.wait_healthy(timeout=60, workers=1)
    keyed = wrk.run(app.mcp_url, "modern", 1, 2, "list_notes", {}, headers={"Authorization": f"Bearer {key}"})
    assert keyed.requests > 0 and keyed.errors == 0, keyed.detail
    anonymous = wrk.run(app.mcp_url, "modern", 1, 2, "list_notes", {})
    assert anonymous.requests > 0 and anonymous.errors == anonymous.requests, anonymous.detail  # 401s
