"""Cross-pod session routing: appliances on loopback play the pods of a StatefulSet.

A legacy session id names its owner node (`n<node>w<worker>-…`). A request for another
node's session is proxied by nginx to that node's nginx (once: a forwarded request is
never forwarded again), and a session whose node is gone gets 404, never 502.

Two ways to find peers are proven: an explicit `node.peers` list (IP addresses, no DNS),
and Kubernetes' way, a `node.peer_address` name template looked up per request. There is
no cluster DNS here, so a few lines of UDP stand in for it (`StubDns`); everything else
is real: nginx, supervisord, hypercorn workers and the official SDK client.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from appliance.gate.sessions import parse_owner
from appliance.peers import FORWARDED_HEADER
from tests.harness import Appliance, cleanup, free_port_block, http, new_appliance, wait_until
from tests.integration.clients import Wire, access_log, legacy_request_headers

pytestmark = pytest.mark.integration


class PodSwitch(httpx2.AsyncBaseTransport):
    """A load balancer that does not stick: every request inside a session goes to another pod."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.inner = httpx2.AsyncHTTPTransport()
        self.sent: list[tuple[str, str, int | None]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if "mcp-session-id" in request.headers:
            request.url = request.url.copy_with(host=self.host, port=self.port)
            request.headers["host"] = f"{self.host}:{self.port}"
        self.sent.append((request.method, request.url.host, request.url.port))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def client_switching_to(first: Appliance, then: Appliance, *, terminate: bool = True,
                              ) -> AsyncIterator[tuple[Client, Wire, PodSwitch]]:
    """An SDK client that opens its session through `first` and sends everything after through `then`."""
    wire, switch = Wire(), PodSwitch(then.host, then.port)
    http_client = httpx2.AsyncClient(transport=switch, trust_env=False, timeout=httpx2.Timeout(30, read=60),
                                     event_hooks={"response": [wire.on_response]})
    async with http_client:
        transport = streamable_http_client(first.mcp_url, http_client=http_client, terminate_on_close=terminate)
        async with Client(transport, mode="legacy") as client:
            yield client, wire, switch


def post(appliance: Appliance, session_id: str, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One raw JSON-RPC POST inside a session."""
    return http("POST", appliance.mcp_url, body, {**legacy_request_headers(session_id), **headers})


def tools_list(request_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/list", "params": {}}


def assert_session_not_found(status: int, body: bytes) -> None:
    """The spec's "re-initialize" answer: 404 with a JSON-RPC error (not nginx's 502 page)."""
    assert status == 404, body
    assert json.loads(body)["error"]["message"] == "Session not found"


class Pod(Appliance):
    """An appliance whose nginx may listen on any loopback address (pods share a port, not an IP)."""

    @property
    def host(self) -> str:
        return str(self.settings["http"]["host"])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def make_pod(ordinal: int, workers: int, **node: Any) -> Pod:
    base = new_appliance(workers, log_target="files")  # the tests read nginx's access log file
    pod = Pod(base=base.base, settings=base.settings, env=base.env)
    pod.settings["node"] = {"ordinal": ordinal, **node}
    return pod


@contextlib.contextmanager
def running(*pods: Pod) -> Iterator[None]:
    try:
        for pod in pods:
            pod.start()
        for pod in pods:
            pod.wait_healthy(workers=pod.settings["workers"]["count"])
        yield
    finally:
        for pod in pods:
            cleanup(pod)


# --- peers from an explicit list of IP addresses ------------------------------------------


@pytest.fixture(scope="module")
def pods() -> Iterator[tuple[Pod, Pod]]:
    """Pod 0 and pod 1, two workers each, each knowing the other's address."""
    pod0, pod1 = make_pod(0, 2), make_pod(1, 2)
    peers = [f"127.0.0.1:{pod0.port}", f"127.0.0.1:{pod1.port}"]
    for pod in (pod0, pod1):
        pod.settings["node"]["peers"] = peers
    with running(pod0, pod1):
        yield pod0, pod1


@pytest.mark.anyio
async def test_session_opened_on_pod_0_is_used_through_pod_1_with_no_error(pods: tuple[Pod, Pod]) -> None:
    pod0, pod1 = pods
    async with client_switching_to(pod0, pod1) as (client, wire, switch):
        added = await client.call_tool("add_note", {"title": "cross-pod", "body": "routed by the session tag"})
        assert not added.is_error
        note_id = added.structured_content["id"]  # type: ignore[index]
        tools = await client.list_tools()
        assert {"add_note", "search_notes"} <= {t.name for t in tools.tools}
        found = await client.call_tool("search_notes", {"query": "routed"})
        assert not found.is_error and note_id in [hit["id"] for hit in found.structured_content["result"]]  # type: ignore[index]
        resource = await client.read_resource(f"notes://{note_id}")
        assert "routed by the session tag" in resource.contents[0].text  # type: ignore[union-attr]
        prompt = await client.get_prompt("research_prompt", {"topic": "routing"})
        assert prompt.messages
    assert wire.session_id is not None and parse_owner(wire.session_id)[0] == 0  # type: ignore[index]
    assert [status for _, _, status in wire.exchanges if status >= 400] == [], wire.exchanges
    # Only the initialize went to pod 0; every request of the session (POSTs, the GET
    # stream, the closing DELETE) went to pod 1 ...
    assert switch.sent[0] == ("POST", pod0.host, pod0.port)
    later = switch.sent[1:]
    assert len(later) >= 6 and all(port == pod1.port for _, _, port in later), switch.sent
    assert {"POST", "DELETE"} <= {method for method, _, _ in later}
    # ... and pod 1's nginx passed every one of them on to pod 0's.
    assert set(logged_upstreams(pod1, wire.session_id, len(later))) == {f"127.0.0.1:{pod0.port}"}


def test_a_forwarded_request_is_never_forwarded_again(pods: tuple[Pod, Pod]) -> None:
    pod0, pod1 = pods
    session = open_session(pod0)
    status, _, body = post(pod1, session, tools_list(), **{FORWARDED_HEADER: "n0"})
    assert_session_not_found(status, body)
    status, _, body = post(pod1, session, tools_list())  # unmarked: pod 1 forwards it, pod 0 answers
    assert status == 200, body


def test_a_session_of_a_node_with_no_peer_address_gets_404(pods: tuple[Pod, Pod]) -> None:
    _, pod1 = pods
    status, _, body = post(pod1, "n7w0-" + "0" * 32, tools_list())
    assert_session_not_found(status, body)


def test_pod_1_keeps_serving_its_own_sessions(pods: tuple[Pod, Pod]) -> None:
    _, pod1 = pods
    session = open_session(pod1)
    assert parse_owner(session)[0] == 1  # type: ignore[index]
    status, _, body = post(pod1, session, tools_list())
    assert status == 200, body


def test_sessions_of_a_stopped_pod_get_404_through_its_peer(pods: tuple[Pod, Pod]) -> None:
    """Last in this module: it stops pod 0."""
    pod0, pod1 = pods
    session = open_session(pod0)
    assert post(pod1, session, tools_list())[0] == 200
    pod0.stop()
    status, _, body = post(pod1, session, tools_list())
    assert_session_not_found(status, body)
    assert pod1.health()[0] == 200


def logged_upstreams(pod: Pod, session_id: str, count: int) -> list[str]:
    """Where `pod`'s nginx sent the session's requests, once `count` of them are in its access log
    (supervisord copies nginx's output to the file as it comes, so the last lines may lag)."""

    def logged() -> list[str] | None:
        upstreams = [e["upstream"] for e in access_log(pod) if e["session"] == session_id]
        return upstreams if len(upstreams) >= count else None

    return wait_until(logged, 10, f"{count} requests of session {session_id} in the access log")


def open_session(pod: Pod) -> str:
    """A live legacy session opened by the SDK client (left open: it does not send DELETE)."""

    async def main() -> str:
        async with client_switching_to(pod, pod, terminate=False) as (client, wire, _):
            await client.list_tools()
        assert wire.session_id is not None
        return wire.session_id

    return anyio.run(main)


# --- peers found by name, per request (Kubernetes' headless Service) ----------------------


class StubDns:
    """Answers A queries for the names it knows, NXDOMAIN for the rest (no DNS server runs here)."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Held bound for the test, but picked like every port an appliance is given.
        self.sock.bind(("127.0.0.1", free_port_block(1)))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, client = self.sock.recvfrom(512)
            except OSError:  # closed
                return
            self.sock.sendto(self.answer(query), client)

    def answer(self, query: bytes) -> bytes:
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1:i + 1 + query[i]].decode())
            i += 1 + query[i]
        question = query[12:i + 5]
        qtype = struct.unpack("!H", query[i + 1:i + 3])[0]
        address = self.records.get(".".join(labels).lower())
        if address is None:
            return query[:2] + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + question  # NXDOMAIN
        if qtype != 1:  # the name exists, but has no AAAA record
            return query[:2] + struct.pack("!HHHHH", 0x8180, 1, 0, 0, 0) + question
        record = struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(address)
        return query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + record

    def close(self) -> None:
        self.sock.close()


def free_port_on(*hosts: str) -> int:
    """A port free on every one of `hosts` (pods listen on the same port, each on its own address)."""
    for _ in range(50):
        port = free_port_block(1)
        with contextlib.ExitStack() as stack:
            try:
                for host in hosts:
                    stack.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on all of " + ", ".join(hosts))


def test_peers_are_found_by_dns_name_at_request_time() -> None:
    dns = StubDns()
    port = free_port_on("127.0.0.2", "127.0.0.3")
    node = {"peer_address": f"pod-{{ordinal}}.peers.test:{port}", "resolver": [dns.address]}
    pod0, pod1 = make_pod(0, 1, **node), make_pod(1, 1, **node)
    pod0.settings["http"].update(host="127.0.0.2", port=port)
    pod1.settings["http"].update(host="127.0.0.3", port=port)
    try:
        dns.records["pod-0.peers.test"] = "127.0.0.2"
        with running(pod0):  # pod 1's name does not resolve yet: nginx starts all the same
            dns.records["pod-1.peers.test"] = "127.0.0.3"
            with running(pod1):
                session = open_session(pod0)
                for request_id in range(1, 4):
                    status, _, body = post(pod1, session, tools_list(request_id))
                    assert status == 200, body
                assert logged_upstreams(pod1, session, 3) == [f"127.0.0.2:{port}"] * 3
                # Pod 0 is deleted: its name is gone from DNS, its sessions are gone too.
                del dns.records["pod-0.peers.test"]
                pod0.stop()
                assert_session_not_found(*post(pod1, session, tools_list())[::2])
                # A pod that never existed (scaled away long ago) is no different.
                assert_session_not_found(*post(pod1, "n5w0-" + "0" * 32, tools_list())[::2])
    finally:
        dns.close()
