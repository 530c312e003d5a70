"""Several named servers in one appliance: the notes server at /mcp and a second Python server at
/servers/calc/mcp, both hosted by every worker (N=2), each behind its own gate."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from tests.harness import Appliance, cleanup, http, new_appliance, running, to_toml, wait_until
from tests.integration.clients import (
    LEGACY_VERSION,
    MODERN_VERSION,
    access_log,
    eventually,
    mcp_client,
    modern_request,
    owner_upstream,
    sessions_on_two_workers,
)
from tests.integration.gatekit import add_key, audit_records, bearer, write_config
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CALC_PATH = "/servers/calc/mcp"
NOTES_TOOLS = {"add_note", "get_note", "search_notes", "delete_note"}


@pytest.fixture(scope="module")
def hosted() -> Iterator[tuple[Appliance, dict[str, str]]]:
    """N=2, api_keys; calc needs the scope calc:use for every tool, a rule only calc has."""
    app = new_appliance(2, env={"PYTHONPATH": str(REPO)}, auth={"mode": "api_keys"},
                        servers={"calc": {"app": "tests.integration.calc_server:server",
                                          "policy_rules": ["tool:* = calc:use"], "json_response": True}})
    try:
        app.settings["auth"]["keys_file"] = str(app.base / "keys.json")
        write_config(app)
        keys = {"both": add_key(app, "both", "notes:write", "calc:use"),
                "notes_only": add_key(app, "notes_only", "notes:write")}
        app.start()
        app.wait_healthy(timeout=60, workers=2)
        yield app, keys
    finally:
        cleanup(app)


def calc_url(app: Appliance) -> str:
    return app.url + CALC_PATH


def structured(result: Any) -> Any:
    assert not result.is_error, result
    return result.structured_content


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", MODERN_VERSION])
async def test_each_server_lists_its_own_tools_and_calls_them_in_both_eras(hosted: Any, mode: str) -> None:
    app, keys = hosted
    async with mcp_client(app.mcp_url, mode, headers=bearer(keys["both"])) as (notes, _):
        names = {t.name for t in (await notes.list_tools()).tools}
        assert NOTES_TOOLS <= names and "multiply" not in names
        note = structured(await notes.call_tool("add_note", {"title": f"servers {mode}", "body": "x"}))
        assert note["title"] == f"servers {mode}"
    async with mcp_client(calc_url(app), mode, headers=bearer(keys["both"])) as (calc, wire):
        assert {t.name for t in (await calc.list_tools()).tools} == {"add", "multiply"}
        assert structured(await calc.call_tool("add", {"a": 2, "b": 40})) == {"result": 42}
        assert structured(await calc.call_tool("multiply", {"a": 6, "b": 7})) == {"result": 42}
        assert (wire.session_id is None) == (mode == MODERN_VERSION)


@pytest.mark.anyio
async def test_legacy_sessions_of_each_server_stay_with_their_owner_worker(hosted: Any) -> None:
    app, keys = hosted
    marker = uuid.uuid4().hex
    headers = {**bearer(keys["both"]), "User-Agent": f"owner-{marker}"}
    for url in (app.mcp_url, calc_url(app)):
        async with sessions_on_two_workers(url, headers=headers) as (first, second):
            assert {first.owner, second.owner} == {0, 1}
            for _ in range(5):
                for session in (first, second):
                    await session.client.list_tools()
            sessions = {first.wire.session_id: first.owner, second.wire.session_id: second.owner}

            def logged(path: str = url.removeprefix(app.url)) -> list[dict[str, Any]] | None:
                mine = [e for e in access_log(app) if e["session"] in sessions and e["method"] == "POST"
                        and e["uri"] == path]
                return mine if len(mine) >= 10 else None

            entries = await eventually(logged, 30, f"the sessions' POSTs to {url} in nginx's access log")
            for entry in entries:
                assert entry["upstream"] == owner_upstream(app, sessions[entry["session"]]), entry


def answer(raw: bytes) -> Any:
    """The JSON-RPC message of a JSON body or of an SSE stream's data line (the notes server streams)."""
    text = raw.decode()
    if not text.lstrip().startswith("{"):
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:") and line[5:].strip())
    return json.loads(text)


def modern_call(app: Appliance, path: str, key: str, tool: str, arguments: dict[str, Any]) -> tuple[int, Any]:
    headers, body = modern_request("tools/call", tool, {"name": tool, "arguments": arguments})
    status, _, raw = http("POST", app.url + path, body, {**headers, **bearer(key)})
    return status, answer(raw)


def test_a_policy_rule_of_one_server_applies_to_that_server_only(hosted: Any) -> None:
    app, keys = hosted
    # Without calc:use: refused by calc's own rule …
    status, doc = modern_call(app, CALC_PATH, keys["notes_only"], "add", {"a": 1, "b": 2})
    assert status == 403 and "calc:use" in json.dumps(doc["error"]), doc
    # … while the notes server (the [policy] rules) serves the same key.
    status, doc = modern_call(app, "/mcp", keys["notes_only"], "search_notes", {"query": "servers"})
    assert status == 200 and "error" not in doc, doc
    # calc's rules replace [policy]'s there: the key with calc:use needs no notes scope for calc.
    status, doc = modern_call(app, CALC_PATH, keys["both"], "add", {"a": 1, "b": 2})
    assert status == 200 and doc["result"]["structuredContent"] == {"result": 3}, doc


def test_lists_are_filtered_by_the_servers_own_policy(hosted: Any) -> None:
    app, keys = hosted
    headers, body = modern_request("tools/list", None, {})
    status, _, raw = http("POST", app.url + CALC_PATH, body, {**headers, **bearer(keys["notes_only"])})
    assert status == 200 and answer(raw)["result"]["tools"] == []


def test_metrics_and_audit_records_name_the_server(hosted: Any) -> None:
    app, keys = hosted
    before = scrape(app)
    marker = uuid.uuid4().hex
    for path, tool, arguments in ((CALC_PATH, "add", {"a": 1, "b": 1}), ("/mcp", "search_notes", {"query": marker})):
        headers, body = modern_request("tools/call", tool, {"name": tool, "arguments": arguments})
        status, _, _ = http("POST", app.url + path, body, {**headers, **bearer(keys["both"]),
                                                          "X-Request-ID": f"{marker}-{tool}"})
        assert status == 200

    def grew() -> bool:
        after = scrape(app)
        return all(total(after, "mcp_appliance_tool_calls_total", server=server, tool=tool, outcome="ok")
                   > total(before, "mcp_appliance_tool_calls_total", server=server, tool=tool, outcome="ok")
                   for server, tool in (("calc", "add"), ("default", "search_notes")))

    wait_until(grew, 10, "tools/call counted under each server's label")
    after = scrape(app)
    assert total(after, "mcp_appliance_requests_total", server="calc", method="tools/call") > 0
    assert total(after, "mcp_appliance_tool_calls_total", server="calc", tool="search_notes") == 0

    records = {r["request_id"]: r for r in audit_records(app) if r["request_id"].startswith(marker)}
    assert records[f"{marker}-add"]["server"] == "calc"
    assert records[f"{marker}-search_notes"]["server"] == "default"


def test_health_and_status_show_every_server(hosted: Any) -> None:
    app, _ = hosted
    status, doc = app.health()
    assert status == 200, doc
    servers = {s["name"]: s for s in doc["servers"]}
    assert servers["default"]["path"] == "/mcp" and servers["calc"]["path"] == CALC_PATH
    assert all(s["kind"] == "app" and s["status"] == "ok" and set(s["workers"]) == {"0", "1"}
               for s in servers.values()), servers
    for probe in doc["probes"]:
        assert [s["name"] for s in probe["servers"]] == ["default", "calc"]
    result = app.command("status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:4] == ["calc", "app", "ok", CALC_PATH] for line in lines), result.stdout


def test_a_path_under_no_server_gets_a_json_404(hosted: Any) -> None:
    app, keys = hosted
    headers, body = modern_request("tools/list", None, {})
    status, _, raw = http("POST", app.url + "/servers/nothing/mcp", body, {**headers, **bearer(keys["both"])})
    assert status == 404 and json.loads(raw)["error"]["code"] == -32600


def test_each_server_answers_in_its_own_mode(hosted: Any) -> None:
    """calc sets json_response = true; the notes server keeps [mcp]'s SSE answers (seen on a legacy initialize)."""
    app, keys = hosted
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "m", "version": "1"}}}
    types = {}
    for path in (CALC_PATH, "/mcp"):
        status, out, _ = http("POST", app.url + path, init, {"Content-Type": "application/json", **bearer(keys["both"]),
                                                            "Accept": "application/json, text/event-stream"})
        assert status == 200
        types[path] = out["content-type"].split(";")[0]
    assert types == {CALC_PATH: "application/json", "/mcp": "text/event-stream"}


def nginx_workers(app: Appliance) -> list[int]:
    """The pids of nginx's worker processes that accept connections (children of its master; one
    that was told to quit says "shutting down" in its title)."""
    master = psutil.Process(int((app.run_dir / "nginx.pid").read_text()))
    titles = {p.pid: " ".join(p.cmdline()) for p in master.children()}
    return [pid for pid, title in titles.items() if "worker process" in title and "shutting down" not in title]


@pytest.mark.anyio
async def test_a_server_added_to_the_config_is_served_after_reload() -> None:
    with running(new_appliance(2, env={"PYTHONPATH": str(REPO)})) as app:
        headers, body = modern_request("tools/list", None, {})
        status, _, _ = http("POST", app.url + CALC_PATH, body, headers)
        assert status == 404
        app.settings["servers"] = {"calc": {"app": "tests.integration.calc_server:server"}}
        app.config_path.write_text(to_toml(app.settings))
        old_nginx = set(nginx_workers(app))
        result = await anyio.to_thread.run_sync(lambda: app.command("reload", timeout=300))
        assert result.returncode == 0, result.stdout + result.stderr
        # Once reload has returned, nginx's old worker processes (the old routing, the path's 404) take
        # no new connection: every call on a new one reaches the new server at once.
        assert not old_nginx & set(nginx_workers(app))
        for _ in range(20):
            assert http("POST", app.url + CALC_PATH, body, headers)[0] == 200
        async with mcp_client(calc_url(app), MODERN_VERSION) as (calc, _):
            assert structured(await calc.call_tool("add", {"a": 20, "b": 22})) == {"result": 42}
        # The admin app restarts with the new settings: its /health lists calc once it is back.
        wait_until(lambda: [s["name"] for s in app.health()[1]["servers"]] == ["default", "calc"], 30,
                   "/health listing the new server")


@pytest.fixture(scope="module")
def with_stdio() -> Iterator[Appliance]:
    """The notes server, calc, two stdio servers from npm and one from PyPI in one appliance.toml (N=2)."""
    from tests import third_party

    app = new_appliance(2, env={"PYTHONPATH": str(REPO)})
    # In the appliance's world-readable directory: the children run as the service user.
    root = app.base / "files"
    root.mkdir(mode=0o755)
    (root / "hello.txt").write_text("hello from the test\n")
    (root / "hello.txt").chmod(0o644)
    app.settings["servers"] = {
        "calc": {"app": "tests.integration.calc_server:server"},
        "everything": {"command": list(third_party.everything()), "isolation": "shared"},
        "files": {"command": list(third_party.filesystem(str(root))), "path": "/files/mcp"},
        "time": {"command": list(third_party.time_server()), "isolation": "session"}}
    with running(app) as started:
        yield started


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", MODERN_VERSION])
async def test_stdio_servers_from_the_config_answer_next_to_the_python_ones(with_stdio: Appliance, mode: str) -> None:
    app = with_stdio
    async with mcp_client(app.url + "/servers/everything/mcp", mode) as (everything, _):
        assert "echo" in {t.name for t in (await everything.list_tools()).tools}
        echoed = await everything.call_tool("echo", {"message": f"servers {mode}"})
        assert not echoed.is_error and echoed.content[0].text == f"Echo: servers {mode}"
        assert (await everything.list_prompts()).prompts
        assert (await everything.list_resource_templates()).resource_templates
    async with mcp_client(app.url + "/servers/time/mcp", mode) as (clock, _):
        now = await clock.call_tool("get_current_time", {"timezone": "UTC"})
        assert not now.is_error and "UTC" in now.content[0].text
    async with mcp_client(app.url + "/files/mcp", mode) as (files, _):
        roots = await files.call_tool("list_allowed_directories", {})
        root = roots.content[0].text.splitlines()[-1].strip()
        read = await files.call_tool("read_text_file", {"path": f"{root}/hello.txt"})
        assert not read.is_error and "hello from the test" in read.content[0].text
    async with mcp_client(calc_url(app), mode) as (calc, _):
        assert structured(await calc.call_tool("add", {"a": 1, "b": 2})) == {"result": 3}
    async with mcp_client(app.mcp_url, mode) as (notes, _):
        assert NOTES_TOOLS <= {t.name for t in (await notes.list_tools()).tools}


def test_health_shows_the_stdio_servers_children(with_stdio: Appliance) -> None:
    _, doc = with_stdio.health()
    servers = {s["name"]: s for s in doc["servers"]}
    assert [s["name"] for s in doc["servers"]] == ["default", "calc", "everything", "files", "time"]
    everything = servers["everything"]
    assert (everything["kind"], everything["status"], everything["path"]) == ("command", "ok", "/servers/everything/mcp")
    for worker in ("0", "1"):
        assert everything["workers"][worker]["isolation"] == "shared"
        assert everything["workers"][worker]["up"] is True


def test_a_server_with_a_rate_of_its_own_limits_calls_to_it_and_no_other() -> None:
    # calc: 1 call/s per principal and a burst of 2, a budget of its own; the notes server keeps limits.rate's.
    # Nothing exempt: the test's client on loopback is held to the limits like any other.
    app = new_appliance(2, env={"PYTHONPATH": str(REPO)}, auth={"mode": "api_keys"}, limits={"exempt": []},
                        servers={"calc": {"app": "tests.integration.calc_server:server", "json_response": True,
                                          "rate": 1, "burst": 2}})
    try:
        app.settings["auth"]["keys_file"] = str(app.base / "keys.json")
        write_config(app)
        first, second = add_key(app, "first", "notes:write"), add_key(app, "second", "notes:write")
        app.start()
        app.wait_healthy(timeout=60, workers=2)
        calc = [modern_call(app, CALC_PATH, first, "add", {"a": 1, "b": k}) for k in range(8)]
        notes = [modern_call(app, "/mcp", first, "search_notes", {"query": "rate"}) for _ in range(8)]
        other = modern_call(app, CALC_PATH, second, "add", {"a": 2, "b": 2})
        limited = [doc for status, doc in calc if status == 429]
        # The bucket holds burst + 1 = 3 calls; 8 calls in well under the seconds that would refill it.
        assert 3 <= len(calc) - len(limited) <= 5, [status for status, _ in calc]
        assert all("Too many requests" in doc["error"]["message"] for doc in limited), limited
        assert [status for status, _ in notes] == [200] * 8, "calls to calc used the notes server's budget"
        assert other[0] == 200, "one principal's calls to calc used another's budget"
        records = [r for r in audit_records(app) if r.get("server") == "calc" and r.get("reason") == "rate_limited"]
        assert len(records) == len(limited)
    finally:
        cleanup(app)


def test_a_server_with_session_caps_of_its_own_refuses_beyond_them_and_no_other_server() -> None:
    # calc: 2 legacy sessions per worker, 1 per principal; the notes server keeps mcp's caps. N=1: one
    # worker holds every session. Nothing exempt: the test's client on loopback is held to the caps.
    app = new_appliance(1, env={"PYTHONPATH": str(REPO)}, auth={"mode": "api_keys"}, limits={"exempt": []},
                        servers={"calc": {"app": "tests.integration.calc_server:server", "max_sessions": 2,
                                          "max_sessions_per_principal": 1}})
    try:
        app.settings["auth"]["keys_file"] = str(app.base / "keys.json")
        write_config(app)
        keys = [add_key(app, f"p{k}", "notes:write") for k in range(3)]
        app.start()
        app.wait_healthy(timeout=60, workers=1)
        before = scrape(app)

        def initialize(path: str, key: str) -> tuple[int, dict[str, str], Any]:
            init = {"jsonrpc": "2.0", "id": 5, "method": "initialize",
                    "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                               "clientInfo": {"name": "t", "version": "1"}}}
            status, headers, body = http("POST", app.url + path, init, {**bearer(key), "Accept": "application/json, "
                                         "text/event-stream", "Content-Type": "application/json"})
            return status, headers, body

        first = initialize(CALC_PATH, keys[0])
        assert first[0] == 200 and first[1].get("mcp-session-id")
        status, headers, body = initialize(CALC_PATH, keys[0])
        assert status == 429 and headers.get("retry-after"), body
        assert "servers.calc.max_sessions_per_principal" in json.loads(body)["error"]["message"]
        # The same principal opens sessions with the notes server: calc's caps are calc's alone.
        assert [initialize("/mcp", keys[0])[0] for _ in range(3)] == [200] * 3
        assert initialize(CALC_PATH, keys[1])[0] == 200
        status, headers, body = initialize(CALC_PATH, keys[2])
        assert status == 503, body
        assert "servers.calc.max_sessions = 2" in json.loads(body)["error"]["message"]
        after = scrape(app)
        for limit in ("server_principal_sessions", "server_sessions"):
            assert (total(after, "mcp_appliance_rate_limited_total", limit=limit)
                    == total(before, "mcp_appliance_rate_limited_total", limit=limit) + 1), limit
        reasons = [r.get("reason") for r in audit_records(app) if r.get("server") == "calc" and r.get("reason")]
        assert sorted(reasons) == ["server_principal_sessions_limit", "server_sessions_limit"]
        # A session that ends (DELETE) gives its place back: the first principal opens another.
        sid = first[1]["mcp-session-id"]
        deleted = http("DELETE", app.url + CALC_PATH, None, {**bearer(keys[0]), "Mcp-Session-Id": sid,
                                                             "MCP-Protocol-Version": LEGACY_VERSION})
        assert deleted[0] in (200, 204), deleted
        assert initialize(CALC_PATH, keys[0])[0] == 200
    finally:
        cleanup(app)


def test_a_server_with_a_worker_count_runs_and_is_served_in_its_first_workers_only() -> None:
    """N=2; calc and a stdio server with `workers = 1`: worker 0 alone hosts them (and runs the children)."""
    from tests import third_party

    app = new_appliance(2, env={"PYTHONPATH": str(REPO)}, servers={
        "calc": {"app": "tests.integration.calc_server:server", "json_response": True, "workers": 1},
        "everything": {"command": list(third_party.everything()), "workers": 1}})
    with running(app):
        _, doc = app.health()
        servers = {s["name"]: s for s in doc["servers"]}
        assert set(servers["default"]["workers"]) == {"0", "1"}
        assert set(servers["calc"]["workers"]) == set(servers["everything"]["workers"]) == {"0"}, servers
        marker = uuid.uuid4().hex
        # Calls and reads (nginx sends reads through a location of their own): every one to worker 0.
        for n in range(12):
            for path, method, name, params in ((CALC_PATH, "tools/call", "add", {"name": "add", "arguments": {"a": n, "b": 1}}),
                                               (CALC_PATH, "tools/list", None, {}),
                                               ("/mcp", "tools/list", None, {})):
                headers, body = modern_request(method, name, params)
                status, _, raw = http("POST", app.url + path, body, {**headers, "X-Request-ID": f"{marker}-{path[1:4]}-{n}-{method[6:]}"})
                assert status == 200 and "error" not in answer(raw), raw
        records = [r for r in audit_records(app) if r["request_id"].startswith(marker)]
        assert len(records) == 36
        assert {r["worker"] for r in records if r["server"] == "calc"} == {0}
        assert {r["worker"] for r in records if r["server"] == "default"} == {0, 1}, "the other servers keep both"

        async def echo() -> str:
            async with mcp_client(app.url + "/servers/everything/mcp", "legacy") as (everything, _):
                echoed = await everything.call_tool("echo", {"message": "first workers"})
                return echoed.content[0].text

        assert anyio.run(echo) == "Echo: first workers"
        pids = {p["worker"]: p["pid"] for p in doc["probes"]}
        children = {k: [c for c in psutil.Process(pid).children(recursive=True)
                        if any("server-everything" in part for part in c.cmdline())] for k, pid in pids.items()}
        assert children[0] and not children[1], children
        # Its one worker stopped: calc's calls get 503 (nothing ran; safe to retry), the others go on.
        from tests.integration.test_core import supervisorctl

        assert supervisorctl(app, "stop", "worker-00").returncode == 0
        # A call and a read (which nginx would retry elsewhere): both the JSON-RPC 503, not nginx's HTML 502.
        for method, name, params in (("tools/call", "add", {"name": "add", "arguments": {"a": 1, "b": 1}}),
                                     ("tools/list", None, {})):
            headers, body = modern_request(method, name, params)
            status, out, raw = http("POST", app.url + CALC_PATH, body, headers)
            assert status == 503 and out.get("retry-after") and "No MCP worker available" in raw.decode(), raw
        headers, body = modern_request("tools/list", None, {})
        assert http("POST", app.mcp_url, body, headers)[0] == 200
