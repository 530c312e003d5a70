"""/metrics of a real appliance: every process aggregated, counters that survive worker restarts.

One appliance for the module; the tests that kill workers run last.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.scrape import exported_names
from tests.harness import Appliance, http, new_appliance, running, wait_until
from tests.integration.clients import LEGACY_VERSION, modern_request
from tests.integration.gatekit import call

pytestmark = pytest.mark.integration

WORKERS = 2


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    # Anonymous callers hold no scope: the default policy refuses them add_note and delete_note.
    with running(new_appliance(WORKERS, auth={"anonymous_scopes": []}, mcp={"allowed_hosts": ["127.0.0.1:*"]})) as app:
        yield app


def scrape(app: Appliance) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, headers, body = http("GET", app.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: dict[tuple[str, Any], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def open_session(app: Appliance) -> str:
    """A legacy session opened with raw HTTP; returns its id."""
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "m", "version": "1"}}}
    status, headers, _ = http("POST", app.mcp_url, init, {"Content-Type": "application/json",
                                                        "Accept": "application/json, text/event-stream"})
    assert status == 200
    return headers["mcp-session-id"]


def traffic(app: Appliance) -> None:
    """A bit of everything the metrics count."""
    assert call(app, "tools/call", "search_notes", {"arguments": {"query": "x"}})[0] == 200
    assert call(app, "tools/call", "get_note", {"arguments": {"id": 424242}})[0] == 200  # a tool error
    assert call(app, "tools/call", "add_note", {"arguments": {"title": "t", "body": "b"}})[0] == 403
    assert call(app, "tools/list", headers={"Host": "evil.example"})[0] == 421
    headers, _ = modern_request("tools/list", None, {})
    assert http("POST", app.mcp_url, b"{oops", headers)[0] == 400
    open_session(app)


def test_every_exported_metric_name_is_in_a_real_scrape(appliance: Appliance) -> None:
    traffic(appliance)
    names = {name for name, _ in scrape(appliance)}
    assert exported_names() <= names, sorted(exported_names() - names)


def test_requests_tools_authz_and_violations_are_counted_by_label(appliance: Appliance) -> None:
    before = scrape(appliance)
    traffic(appliance)
    after = scrape(appliance)

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return total(after, name, **labels) - total(before, name, **labels) >= by

    assert grew("mcp_appliance_requests_total", method="tools/call", status="200", by=2)
    assert grew("mcp_appliance_tool_calls_total", tool="get_note", outcome="tool_error")
    assert grew("mcp_appliance_tool_calls_total", tool="add_note", outcome="denied")
    assert grew("mcp_appliance_tool_calls_total", tool="search_notes", outcome="ok")
    assert grew("mcp_appliance_authz_decisions_total", decision="denied", reason="missing_scope")
    for kind in ("policy", "bad_host", "malformed_jsonrpc"):
        assert grew("mcp_appliance_security_violations_total", kind=kind), kind
    assert grew("mcp_appliance_request_duration_seconds_count", method="tools/call", by=3)
    assert grew("mcp_appliance_tool_call_duration_seconds_count", tool="search_notes")


def test_processes_nginx_build_and_workers_are_reported(appliance: Appliance) -> None:
    samples = scrape(appliance)
    programs = {dict(ls)["program"] for n, ls in samples if n == "mcp_appliance_process_resident_memory_bytes"}
    assert {"worker-00", "worker-01", "admin", "nginx", "events", "supervisord"} <= programs
    assert all(total(samples, "mcp_appliance_process_resident_memory_bytes", program=p) > 1e6 for p in programs)
    assert total(samples, "mcp_appliance_process_cpu_seconds_total", program="supervisord") > 0
    assert total(samples, "mcp_appliance_nginx_up") == 1
    assert total(samples, "mcp_appliance_nginx_http_requests_total") > 0
    assert total(samples, "mcp_appliance_workers_ready") == WORKERS == total(samples, "mcp_appliance_workers_configured")
    assert total(samples, "mcp_appliance_uptime_seconds") > 0
    build = next(dict(ls) for n, ls in samples if n == "mcp_appliance_build_info")
    assert build["mcp_sdk"] and build["environment"] == "development"


def test_open_sessions_are_reported_per_worker(appliance: Appliance) -> None:
    before = total(scrape(appliance), "mcp_appliance_sessions_open")
    sid = open_session(appliance)
    worker = sid.split("w", 1)[1].split("-", 1)[0]
    assert total(scrape(appliance), "mcp_appliance_sessions_open") == before + 1
    headers = {"Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION}
    assert http("DELETE", appliance.mcp_url, headers=headers)[0] == 200
    after = scrape(appliance)
    assert total(after, "mcp_appliance_sessions_open") == before
    assert ("mcp_appliance_sessions_open", (("worker", worker),)) in after


def test_counters_survive_a_worker_crash_and_the_restart_is_counted(appliance: Appliance) -> None:
    """Last but one: kills worker 1. Totals never go back; its sessions leave the gauge."""
    sid = open_session(appliance)
    owner = int(sid.split("w", 1)[1].split("-", 1)[0])
    before = scrape(appliance)
    pid = appliance.worker_pid(owner)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: appliance.worker_pid(owner) not in (0, pid), 30, "worker restarted")
    appliance.wait_healthy(timeout=30, workers=WORKERS)

    def restart_counted() -> dict[tuple[str, Any], float] | None:
        samples = scrape(appliance)
        return samples if total(samples, "mcp_appliance_worker_restarts_total", worker=str(owner)) >= 1 else None

    after = wait_until(restart_counted, 15, "restart counted")
    for name in ("mcp_appliance_requests_total", "mcp_appliance_tool_calls_total",
                 "mcp_appliance_request_duration_seconds_count", "mcp_appliance_security_violations_total"):
        assert total(after, name) >= total(before, name), name
    assert total(after, "mcp_appliance_sessions_open", worker=str(owner)) == 0  # the dead process's gauge is gone
    assert call(appliance, "tools/call", "search_notes", {"arguments": {"query": "x"}})[0] == 200
    assert total(scrape(appliance), "mcp_appliance_requests_total") > total(after, "mcp_appliance_requests_total")


def test_metrics_body_is_prometheus_text_not_json(appliance: Appliance) -> None:
    status, _, body = http("GET", appliance.url + "/metrics")
    assert status == 200 and body.startswith(b"# HELP")
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
