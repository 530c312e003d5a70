"""Limits through real nginx and workers: per address at the edge, per verified principal in the
workers (shared by all of them), legacy session caps, and who counts as the host itself.

Clients are told apart by X-Forwarded-For from a trusted proxy on loopback; the proxy tests
connect from other loopback addresses (127.0.0.2, …) to play a pod in front of the appliance.
"""

from __future__ import annotations

import http.client
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mcp import MCPError

from tests.harness import Appliance, cleanup, http as http_request, new_appliance, wait_until
from tests.integration.clients import LEGACY_VERSION, mcp_client, modern_request, probes
from tests.integration.gatekit import add_key, audit_records, write_config
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.integration

RATE, BURST = 1, 4
RETRY_AFTER = 2


def start(app: Appliance) -> Appliance:
    app.start()
    app.wait_healthy(timeout=60, workers=int(app.settings["workers"]["count"]))
    return app


def post(app: Appliance, headers: dict[str, str], source: str = "127.0.0.1",
         method: str = "tools/list") -> tuple[int, dict[str, str], Any]:
    """One 2026-07-28 request from loopback address `source`: status, headers, parsed body."""
    base, body = modern_request(method, None, {})
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", app.settings.get("mcp", {}).get("path", "/mcp"), body, {**base, **headers})
        response = conn.getresponse()
        raw = response.read()
        out = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    try:
        return response.status, out, json.loads(raw)
    except ValueError:
        return response.status, out, raw


def allowed_at_most(started: float, extra: int = 1) -> int:
    """What one bucket of RATE/s and BURST lets through since `started` (one more for rounding)."""
    return BURST + 1 + int((time.monotonic() - started) * RATE) + extra


def records_of(app: Appliance, request_ids: list[str]) -> list[dict[str, Any]] | None:
    """The audit records of these requests, once there is one for each."""
    found = [r for r in audit_records(app) if r["request_id"] in set(request_ids)]
    return found if len(found) == len(request_ids) else None


def limited(samples: dict[Any, float], limit: str) -> float:
    return total(samples, "mcp_appliance_rate_limited_total", limit=limit)


# --- per address and per principal -----------------------------------------------------------


def with_keys(app: Appliance, principals: tuple[str, ...]) -> Iterator[tuple[Appliance, dict[str, str]]]:
    """`app` in api_keys mode with a key per principal, started; stopped and removed afterwards."""
    try:
        app.settings["auth"]["keys_file"] = str(app.base / "keys.json")
        write_config(app)
        keys = {name: add_key(app, name) for name in principals}
        yield start(app), keys
    finally:
        cleanup(app)


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[Appliance, dict[str, str]]]:
    app = new_appliance(2, auth={"mode": "api_keys"}, http={"trusted_proxies": ["127.0.0.1/32"]},
                        limits={"rate": RATE, "burst": BURST, "address_rate": RATE, "address_burst": BURST,
                                "retry_after": RETRY_AFTER})
    yield from with_keys(app, ("alice", "bob", "carol"))


def test_a_made_up_token_per_request_is_refused_by_the_address_limit(keyed: Any) -> None:
    app, _ = keyed
    before = limited(scrape(app), "request")
    started = time.monotonic()
    statuses = [post(app, {"Authorization": f"Bearer mcp_{secrets.token_hex(8)}_{secrets.token_hex(16)}",
                           "X-Forwarded-For": "203.0.113.10"})[0] for _ in range(30)]
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) <= allowed_at_most(started), statuses
    assert statuses.count(429) > 0, statuses
    wait_until(lambda: limited(scrape(app), "request") >= before + statuses.count(429), 10,
               "nginx's 429s counted as limit=request")


def spellings(key: str) -> list[dict[str, str]]:
    """One valid key as a client may spell it: scheme case, spaces, the other header, junk beside it."""
    return [
        {"Authorization": f"Bearer {key}"},
        {"Authorization": f"bearer {key}"},
        {"Authorization": f"BEARER   {key}  "},
        {"X-API-Key": key},
        {"X-API-Key": f"  {key}"},
        {"Authorization": f"Bearer {key}", "X-API-Key": "junk-" + secrets.token_hex(8)},
        {"Authorization": f"Bearer {key}", "X-Appliance-Limit-Exempt": "1"},
    ]


def test_a_valid_key_in_any_spelling_gets_one_share_across_workers(keyed: Any) -> None:
    app, keys = keyed
    before = limited(scrape(app), "principal")
    forms = spellings(keys["alice"])
    started = time.monotonic()
    answers = []
    request_ids = []
    for k in range(35):
        # A fresh client address each time: only the principal's own bucket can refuse it.
        request_ids.append(secrets.token_hex(16))
        headers = {**forms[k % len(forms)], "X-Forwarded-For": f"198.51.100.{k + 1}", "X-Request-ID": request_ids[-1]}
        answers.append(post(app, headers))
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) <= allowed_at_most(started), statuses
    status, headers, body = next(a for a in answers if a[0] == 429)
    assert headers["retry-after"] == str(RETRY_AFTER)
    assert body["jsonrpc"] == "2.0" and body["error"]["message"].startswith("Too many requests")
    wait_until(lambda: limited(scrape(app), "principal") >= before + statuses.count(429), 10,
               "the workers' 429s counted as limit=principal")
    # Both workers answered: the share is one for the host, not one per worker.
    records = wait_until(lambda: records_of(app, request_ids), 10, "an audit record per request")
    assert {r["worker"] for r in records} == {0, 1}


def test_one_principal_over_its_share_does_not_starve_another(keyed: Any) -> None:
    app, keys = keyed
    flood = [post(app, {"Authorization": f"Bearer {keys['bob']}", "X-Forwarded-For": f"192.0.2.{k + 1}"})[0]
             for k in range(BURST + 4)]
    assert 429 in flood, flood
    other = [post(app, {"Authorization": f"Bearer {keys['carol']}", "X-Forwarded-For": f"192.0.2.{100 + k}"})[0]
             for k in range(BURST)]
    assert other == [200] * BURST


# --- legacy session caps and the one session registry ----------------------------------------


def mcp_errors(exc: BaseException) -> list[MCPError]:
    """The MCPErrors in `exc` (the SDK raises them inside exception groups)."""
    if isinstance(exc, MCPError):
        return [exc]
    return [e for sub in getattr(exc, "exceptions", ()) for e in mcp_errors(sub)]

PER_PRINCIPAL = 2
IDLE = 3


@pytest.fixture(scope="module")
def sessions() -> Iterator[tuple[Appliance, dict[str, str]]]:
    # Nothing exempt: the test's clients on loopback are held to the caps like any other.
    app = new_appliance(1, auth={"mode": "api_keys"}, limits={"exempt": []},
                        mcp={"max_sessions_per_principal": PER_PRINCIPAL, "session_idle_timeout": IDLE})
    yield from with_keys(app, ("hog", "other", "idler"))


@pytest.mark.anyio
async def test_one_principal_cannot_take_every_session_slot(sessions: Any) -> None:
    app, keys = sessions
    before = limited(scrape(app), "principal_sessions")
    hog = {"Authorization": f"Bearer {keys['hog']}"}
    async with mcp_client(app.mcp_url, "legacy", hog) as (first, _), mcp_client(app.mcp_url, "legacy", hog) as (second, _):
        with pytest.raises(BaseException) as refused:
            async with mcp_client(app.mcp_url, "legacy", hog) as (third, _):
                await third.list_tools()
        assert any("Too many open sessions for this caller" in e.message for e in mcp_errors(refused.value))
        async with mcp_client(app.mcp_url, "legacy", {"Authorization": f"Bearer {keys['other']}"}) as (other, _):
            assert (await other.list_tools()).tools
        assert (await first.list_tools()).tools and (await second.list_tools()).tools
    assert limited(scrape(app), "principal_sessions") >= before + 1
    # Its sessions ended (DELETE on exit): the principal may open new ones.
    async with mcp_client(app.mcp_url, "legacy", hog) as (again, _):
        assert (await again.list_tools()).tools


def test_a_refused_session_gets_429_with_a_json_rpc_error(sessions: Any) -> None:
    app, keys = sessions
    headers = {"Authorization": f"Bearer {keys['idler']}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 7, "method": "initialize",
            "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    opened = [http_request("POST", app.mcp_url, init, headers) for _ in range(PER_PRINCIPAL)]
    assert [o[0] for o in opened] == [200] * PER_PRINCIPAL
    status, out, body = http_request("POST", app.mcp_url, init, headers)
    assert status == 429 and out["retry-after"]
    error = json.loads(body)
    assert error["id"] == 7 and "Too many open sessions" in error["error"]["message"]
    # Left open without DELETE: they expire (see the next test).


def test_idle_sessions_expire_and_the_gauge_and_health_come_back_to_zero(sessions: Any) -> None:
    app, keys = sessions
    headers = {"Authorization": f"Bearer {keys['other']}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    for _ in range(PER_PRINCIPAL):
        assert http_request("POST", app.mcp_url, init, headers)[0] == 200
    assert sum(p["sessions_open"] for p in probes(app).values()) >= PER_PRINCIPAL
    assert total(scrape(app), "mcp_appliance_sessions_open") >= PER_PRINCIPAL

    def all_closed() -> bool:
        return (sum(p["sessions_open"] for p in probes(app).values()) == 0
                and total(scrape(app), "mcp_appliance_sessions_open") == 0)

    # No request touches them: only the idle timeout can end them.
    wait_until(all_closed, IDLE + 30, "idle sessions gone from /health and the gauge")


# --- trusted proxies: exemptions and internal endpoints look at the connection ---------------

PROXY = "127.0.0.2"


@pytest.fixture(scope="module")
def proxied() -> Iterator[Appliance]:
    app = new_appliance(1, http={"trusted_proxies": [f"{PROXY}/32"]},
                        limits={"exempt": ["127.0.0.1/32"], "address_rate": RATE, "address_burst": BURST,
                                "rate": 0})
    try:
        yield start(app)
    finally:
        cleanup(app)


def raw_get(app: Appliance, path: str, source: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_a_trusted_proxy_saying_the_client_is_loopback_is_still_limited(proxied: Appliance) -> None:
    statuses = [post(proxied, {"X-Forwarded-For": "127.0.0.1"}, source=PROXY)[0] for _ in range(BURST + 12)]
    assert 429 in statuses, statuses


def test_the_host_itself_stays_exempt(proxied: Appliance) -> None:
    assert [post(proxied, {})[0] for _ in range(BURST + 6)] == [200] * (BURST + 6)


def test_the_nginx_status_page_answers_only_connections_from_the_host(proxied: Appliance) -> None:
    path = "/_appliance/nginx_status"
    assert raw_get(proxied, path, "127.0.0.1", {}) == 200
    assert raw_get(proxied, path, PROXY, {"X-Forwarded-For": "127.0.0.1"}) == 403
    assert raw_get(proxied, path, "127.0.0.3", {"X-Forwarded-For": "127.0.0.1"}) == 403
