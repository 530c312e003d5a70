"""State that spans workers and hosts: multi-round-trip calls whose retries land anywhere."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.request_state import AESGCMRequestStateCodec
from mcp_types import CreateMessageResult, ElicitResult, TextContent

from appliance.preflight import find_nginx
from tests.harness import Appliance, free_port_block, http, new_appliance, running, to_toml, wait_until
from tests.integration.clients import mcp_client, modern_request

pytestmark = pytest.mark.integration

CALLS = 50  # of each kind
CLIENTS = 10


async def answer_question(context: Any, params: Any) -> ElicitResult:
    """The user answers the notes server's question."""
    return ElicitResult(action="accept", content={"query": "rotation"})


async def answer_sampling(context: Any, params: Any) -> CreateMessageResult:
    """The client's model answers."""
    return CreateMessageResult(role="assistant", content=TextContent(type="text", text="An abstract."),
                               model="test-model")


def asking_client(url: str) -> Any:
    return mcp_client(url, mode="2026-07-28", elicitation_callback=answer_question, sampling_callback=answer_sampling)


async def seed_note(url: str) -> int:
    async with mcp_client(url, mode="2026-07-28") as (client, _):
        result = await client.call_tool("add_note", {"title": "Key rotation", "body": "Rotate keys in three phases."})
        assert not result.is_error, result
        return int(result.structured_content["id"])


async def asking_calls(url: str, note_id: int, calls: int = CALLS) -> tuple[int, list[str]]:
    """`calls` eliciting and `calls` sampling tool calls at once; (completed, failures)."""
    completed = 0
    failures: list[str] = []

    async def one(client: Client, tool: str, arguments: dict[str, Any]) -> None:
        nonlocal completed
        try:
            result = await client.call_tool(tool, arguments)
        except Exception as exc:  # a failed round surfaces as an MCPError from the client
            failures.append(f"{tool}: {exc!r}")
            return
        if result.is_error:
            failures.append(f"{tool}: {result.content}")
        else:
            completed += 1

    async with anyio.create_task_group() as outer:
        for c in range(CLIENTS):
            async def client_calls(c: int = c) -> None:
                async with asking_client(url) as (client, _):
                    async with anyio.create_task_group() as tg:
                        for k in range(c, calls, CLIENTS):
                            tg.start_soon(one, client, "search_notes_asking", {"topic": f"t{k}"})
                            tg.start_soon(one, client, "abstract_note", {"id": note_id})
            outer.start_soon(client_calls)
    return completed, failures


def tool_rounds_by_worker(appliance: Appliance, tool: str) -> dict[str, int]:
    """Audit records of `tool` per worker file (each round of a call is one request)."""
    counts: dict[str, int] = {}
    for path in sorted((Path(appliance.settings["log_dir"]) / "audit").glob("worker-*.jsonl")):
        counts[path.stem] = sum(1 for line in path.read_text().splitlines() if f'"{tool}"' in line)
    return counts


@pytest.fixture(scope="module")
def three_workers() -> Iterator[Appliance]:
    with running(new_appliance(3)) as app:
        yield app


@pytest.mark.anyio
async def test_multi_round_trip_calls_complete_through_three_workers(three_workers: Appliance) -> None:
    note_id = await seed_note(three_workers.mcp_url)
    completed, failures = await asking_calls(three_workers.mcp_url, note_id)
    assert failures == []
    assert completed == 2 * CALLS
    # The rounds really were spread: more than one worker served the eliciting tool.
    assert sum(1 for n in tool_rounds_by_worker(three_workers, "search_notes_asking").values() if n) >= 2


def ring_secrets(appliance: Appliance) -> list[str]:
    text = (Path(appliance.settings["data_dir"]) / "request-state.keys").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def expired_state(appliance: Appliance) -> str:
    """A requestState sealed with the appliance's own key whose time is up."""
    now = time.time()
    claims = {"v": 1, "iat": now - 1000, "exp": now - 400, "m": "tools/call", "t": "search_notes_asking", "s": "{}"}
    codec = AESGCMRequestStateCodec([s.encode() for s in ring_secrets(appliance)])
    return codec.seal(json.dumps(claims).encode())


def sse_or_json(raw: bytes) -> dict[str, Any]:
    text = raw.decode()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:") and line[5:].strip()]
    return json.loads(data[-1])


@pytest.mark.parametrize("state", ["expired", "v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "forged", ""])
def test_forged_or_expired_request_state_gets_the_sdks_invalid_params_error(three_workers: Appliance, state: str) -> None:
    headers, body = modern_request("tools/call", "search_notes_asking", {
        "name": "search_notes_asking", "arguments": {"topic": "x"}, "inputResponses": {},
        "requestState": expired_state(three_workers) if state == "expired" else state})
    doc = json.loads(body)
    doc["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = {"elicitation": {"form": {}}}
    status, _, raw = http("POST", three_workers.mcp_url, json.dumps(doc).encode(), headers)
    assert status < 500, raw
    error = sse_or_json(raw)["error"]
    assert (error["code"], error["message"]) == (-32602, "Invalid or expired requestState")
    assert three_workers.health()[0] == 200


def test_the_shared_key_is_absent_from_config_logs_and_audit(three_workers: Appliance) -> None:
    secrets = ring_secrets(three_workers)
    assert secrets and all(len(s) >= 32 for s in secrets)
    assert oct((Path(three_workers.settings["data_dir"]) / "request-state.keys").stat().st_mode & 0o777) == "0o640"
    status, _, config = http("GET", three_workers.url + "/config")
    assert status == 200
    _, _, metrics = http("GET", three_workers.url + "/metrics")
    places = {"/config": config.decode(), "/metrics": metrics.decode()}
    for path in Path(three_workers.settings["log_dir"]).rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_text(errors="replace")
    assert any("audit" in p for p in places)
    for secret in secrets:
        assert [p for p, text in places.items() if secret in text] == []
    # What the workers do log is the key's fingerprint.
    assert any(re.search(r"seals requestState with the shared ring \(key ids [0-9a-f]{8}\)", text) for text in places.values())


@pytest.mark.anyio
async def test_key_rotation_under_load_fails_no_round() -> None:
    with running(new_appliance(3, state={"request_ttl": 3})) as app:
        note_id = await seed_note(app.mcp_url)
        before = ring_secrets(app)
        rotation: dict[str, Any] = {}

        def rotate() -> None:
            started = time.monotonic()
            rotation["result"] = app.command("keys", "rotate-state", timeout=300)
            rotation["seconds"] = time.monotonic() - started

        completed, failures = 0, []
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, rotate)
            while "result" not in rotation:
                done, failed = await asking_calls(app.mcp_url, note_id, calls=10)
                completed += done
                failures += failed
        result = rotation["result"]
        assert result.returncode == 0, result.stdout + result.stderr
        assert failures == []
        assert completed >= 3 * 20  # load ran through all three phases
        after = ring_secrets(app)
        assert len(after) == 1 and after != before
        for secret in before + after:
            assert secret not in result.stdout + result.stderr
        print(f"rotation: {rotation['seconds']:.1f}s with request_ttl 3s; {completed} asking calls during it, 0 failed")


FRONT_NGINX = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream nodes {{
        server 127.0.0.1:{node0};
        server 127.0.0.1:{node1};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_buffering off;
        }}
    }}
}}
"""


@contextlib.contextmanager
def round_robin_front(nodes: list[Appliance]) -> Iterator[str]:
    """A real nginx on loopback sending each request to the next node in turn; yields its MCP URL."""
    base = Path(tempfile.mkdtemp(prefix="mcp-appliance-front-", dir="/tmp"))
    base.chmod(0o777)  # nginx's workers (nobody) write their temp files here
    port = free_port_block(1)
    (base / "nginx.conf").write_text(FRONT_NGINX.format(dir=base, port=port, node0=nodes[0].port, node1=nodes[1].port))
    proc = subprocess.Popen([find_nginx(), "-p", str(base), "-c", str(base / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/health")[0] == 200, 20, "front nginx serving")
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.anyio
async def test_retries_landing_on_the_other_node_complete() -> None:
    shared = Path(tempfile.mkdtemp(prefix="mcp-appliance-ring-", dir="/tmp"))
    shared.chmod(0o755)
    ring = str(shared / "request-state.keys")
    nodes = [new_appliance(2, node={"ordinal": k}, state={"keys_file": ring}) for k in range(2)]
    peers = [f"127.0.0.1:{n.port}" for n in nodes]
    for node in nodes:
        node.settings["node"]["peers"] = peers
    try:
        with running(nodes[0]), running(nodes[1]), round_robin_front(nodes) as url:
            # Each node has its own notes database (one host's SQLite): the same note on both.
            note_id, again = [await seed_note(node.mcp_url) for node in nodes]
            assert note_id == again
            completed, failures = await asking_calls(url, note_id)
            assert failures == []
            assert completed == 2 * CALLS
            for node in nodes:  # both nodes served rounds of the calls
                assert sum(tool_rounds_by_worker(node, "abstract_note").values()) > 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def worker_url(appliance: Appliance, index: int) -> str:
    """Worker `index` itself (its loopback port, behind its own gate), bypassing nginx's choice."""
    workers = appliance.settings["workers"]
    return f"http://127.0.0.1:{int(workers['base_port']) + index}{appliance.settings.get('mcp', {}).get('path', '/mcp')}"


@pytest.mark.anyio
async def test_a_listen_stream_on_worker_0_hears_a_note_deleted_through_worker_2(three_workers: Appliance) -> None:
    note_id = await seed_note(worker_url(three_workers, 2))
    uri = f"notes://{note_id}"
    async with mcp_client(worker_url(three_workers, 0), mode="2026-07-28") as (listener, _), \
            mcp_client(worker_url(three_workers, 2), mode="2026-07-28") as (writer, _):
        async with listener.listen(resource_subscriptions=[uri], resources_list_changed=True) as subscription:
            deleted_at = time.monotonic()
            result = await writer.call_tool("delete_note", {"id": note_id})
            assert not result.is_error, result
            kinds: list[str] = []
            with anyio.fail_after(1.0):  # the bound the issue sets for delivery across workers
                async for event in subscription:
                    kinds.append(type(event).__name__)
                    if getattr(event, "uri", None) == uri:
                        break
            latency = time.monotonic() - deleted_at
    assert kinds[-1] == "ResourceUpdated"
    print(f"resources/updated from worker 2 to a stream on worker 0 after {latency * 1000:.1f} ms")


def test_check_warns_naming_a_hosted_asgi_app_that_would_seal_per_process() -> None:
    app = new_appliance(3, mcp={"app": "asgi_app:app"})
    try:
        app.config_path.write_text(to_toml(app.settings))
        fixture_dir = str(Path(__file__).parent)
        result = app.command("check", env={"PYTHONPATH": fixture_dir})
        assert result.returncode == 0, result.stderr
        assert "warning" in result.stderr and "mcp.app = 'asgi_app:app'" in result.stderr
        assert "per-process key" in result.stderr
        # The default MCPServer gets the shared ring from the worker: nothing to warn about.
        app.settings["mcp"] = {}
        app.config_path.write_text(to_toml(app.settings))
        result = app.command("check")
        assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    finally:
        shutil.rmtree(app.base, ignore_errors=True)


@pytest.mark.anyio
async def test_a_fleet_rotation_phase_by_phase_on_every_node_fails_no_round_across_nodes() -> None:
    """What the Ansible role does with the vault variable: each phase on every host, then the next."""
    shared = Path(tempfile.mkdtemp(prefix="mcp-appliance-ring-", dir="/tmp"))
    shared.chmod(0o755)
    ring_file = shared / "request-state.keys"
    nodes = [new_appliance(2, node={"ordinal": k}, state={"keys_file": str(ring_file), "request_ttl": 3})
             for k in range(2)]
    try:
        with running(nodes[0]), running(nodes[1]), round_robin_front(nodes) as url:
            note_id, again = [await seed_note(node.mcp_url) for node in nodes]
            assert note_id == again
            old = ring_file.read_text().split()[-1]
            new = "f" * 64
            done: list[str] = []

            def rotate_fleet() -> None:
                for phase in ([old, new], [new, old], [new]):
                    if len(phase) == 1:
                        time.sleep(3)  # one state.request_ttl after [NEW, OLD] is on every node
                    ring_file.write_text("\n".join(phase) + "\n")
                    for node in nodes:
                        result = node.command("reload", timeout=300)
                        assert result.returncode == 0, result.stdout + result.stderr
                done.append("yes")

            completed, failures = 0, []
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, rotate_fleet)
                while not done:
                    ok, failed = await asking_calls(url, note_id, calls=10)
                    completed, failures = completed + ok, failures + failed
            assert failures == []
            assert completed >= 3 * 20
    finally:
        shutil.rmtree(shared, ignore_errors=True)
