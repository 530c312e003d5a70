"""The gate through nginx: API keys, JWTs, session ownership, tool policy, admin token, edge limits, TLS.

Three appliances, each shared by a module-scoped fixture: one with API keys in production,
one with JWTs, one at the edge (TLS, trusted proxy, strict rate limit).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from tests.harness import Appliance, cleanup, free_port_block, http, new_appliance, wait_until
from tests.integration.clients import MODERN_VERSION, legacy_request_headers, mcp_client, modern_request
from tests.integration.gatekit import (
    add_key,
    audit_records,
    bearer,
    call,
    key_id,
    make_certificate,
    record_for,
    tls_client,
    write_config,
)

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "test-admin-token-" + uuid.uuid4().hex
BODY_LIMIT = 64 * 1024
ERAS = ["legacy", MODERN_VERSION]


def start(app: Appliance, workers: int | None = None) -> Appliance:
    app.start()
    app.wait_healthy(timeout=60, workers=workers)
    return app


# --- API keys in production ---------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[Appliance, dict[str, str]]]:
    app = new_appliance(2, environment="production", auth={"mode": "api_keys"},
                        http={"max_body_bytes": BODY_LIMIT},
                        mcp={"allowed_hosts": ["127.0.0.1:*", "localhost:*"], "allowed_origins": ["http://agents.example"],
                             "max_body_bytes": BODY_LIMIT})
    try:
        token_file = app.base / "admin.token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        token_file.chmod(0o644)
        app.settings["admin"]["token_file"] = str(token_file)
        app.settings["auth"]["keys_file"] = str(app.base / "keys.json")
        write_config(app)
        keys = {"writer": add_key(app, "writer", "notes:write"), "reader": add_key(app, "reader"),
                "intruder": add_key(app, "intruder")}
        yield start(app, 2), keys
    finally:
        cleanup(app)


def test_no_credential_gets_401_with_a_bearer_challenge_and_a_json_rpc_error(keyed: Any) -> None:
    app, _ = keyed
    status, headers, body = call(app, "tools/list", request_id=5)
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer realm="mcp"')
    assert "resource_metadata" not in headers["www-authenticate"]  # no OAuth in api_keys mode
    assert body["jsonrpc"] == "2.0" and body["error"]["code"] == -32001


def test_unknown_key_gets_401_invalid_token(keyed: Any) -> None:
    app, keys = keyed
    forged = keys["reader"][:-4] + "AAAA"
    status, headers, _ = call(app, "tools/list", headers=bearer(forged))
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    assert call(app, "tools/list", headers={"Authorization": "Basic dXNlcjpwYXNz"})[0] == 401


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["bearer", "api-key-header"])
async def test_a_key_works_in_either_header_form(keyed: Any, form: str) -> None:
    app, keys = keyed
    headers = bearer(keys["reader"]) if form == "bearer" else {"X-API-Key": keys["reader"]}
    async with mcp_client(app.mcp_url, MODERN_VERSION, headers) as (client, _):
        names = {t.name for t in (await client.list_tools()).tools}
    assert "search_notes" in names


@pytest.mark.anyio
@pytest.mark.parametrize("era", ERAS)
async def test_delete_without_the_write_scope_is_refused_naming_the_scope(keyed: Any, era: str) -> None:
    app, keys = keyed
    async with mcp_client(app.mcp_url, era, bearer(keys["writer"])) as (writer, _):
        note = (await writer.call_tool("add_note", {"title": "keep me", "body": "x"})).structured_content
    async with mcp_client(app.mcp_url, era, bearer(keys["reader"])) as (reader, _):
        with pytest.raises(MCPError, match="requires scope 'notes:write'"):
            await reader.call_tool("delete_note", {"id": note["id"]})
        assert not (await reader.call_tool("get_note", {"id": note["id"]})).is_error  # still there
    async with mcp_client(app.mcp_url, era, bearer(keys["writer"])) as (writer, _):
        assert not (await writer.call_tool("delete_note", {"id": note["id"]})).is_error


def test_policy_refusal_is_403_with_the_request_id_and_the_missing_scope(keyed: Any) -> None:
    app, keys = keyed
    status, _, body = call(app, "tools/call", "delete_note", {"arguments": {"id": 1}}, bearer(keys["reader"]), 42)
    assert status == 403
    assert body["id"] == 42 and body["error"]["data"]["required_scope"] == "notes:write"


@pytest.mark.anyio
@pytest.mark.parametrize("era", ERAS)  # legacy answers arrive as SSE, 2026-07-28 answers as JSON
async def test_tools_list_hides_what_the_caller_may_not_call(keyed: Any, era: str) -> None:
    app, keys = keyed
    async with mcp_client(app.mcp_url, era, bearer(keys["reader"])) as (reader, _):
        reader_tools = {t.name for t in (await reader.list_tools()).tools}
    async with mcp_client(app.mcp_url, era, bearer(keys["writer"])) as (writer, _):
        writer_tools = {t.name for t in (await writer.list_tools()).tools}
    assert {"add_note", "delete_note"} <= writer_tools
    assert reader_tools == writer_tools - {"add_note", "delete_note"}


@pytest.mark.anyio
async def test_a_session_is_404_for_another_principal_and_keeps_working_for_its_owner(keyed: Any) -> None:
    app, keys = keyed
    async with mcp_client(app.mcp_url, "legacy", bearer(keys["reader"])) as (owner, wire):
        await owner.list_tools()
        sid = wire.session_id
        assert sid
        body = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/list"}).encode()
        stolen = http("POST", app.mcp_url, body, {**legacy_request_headers(sid), **bearer(keys["intruder"])})
        assert stolen[0] == 404 and json.loads(stolen[2])["error"]["message"] == "Session not found"
        assert http("POST", app.mcp_url, body, legacy_request_headers(sid))[0] == 401  # no credential at all
        assert (await owner.list_tools()).tools  # the owner is unaffected
    hijack = [r for r in audit_records(app) if r.get("violation") == "session_owner"]
    assert hijack and hijack[-1]["principal"] == "intruder" and hijack[-1]["session"] == sid


def test_keys_added_and_revoked_while_running_take_effect_within_seconds(keyed: Any) -> None:
    app, _ = keyed
    key = add_key(app, "temporary")
    wait_until(lambda: call(app, "tools/list", headers=bearer(key))[0] == 200, 10, "new key accepted")
    result = app.command("keys", "revoke", key_id(key))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: call(app, "tools/list", headers=bearer(key))[0] == 401, 10, "revoked key refused")
    listing = app.command("keys", "list").stdout
    assert "writer" in listing and "temporary" not in listing and "mcpk_" not in listing


def test_admin_and_config_need_the_admin_token_in_production_and_never_show_it(keyed: Any) -> None:
    app, _ = keyed
    assert http("GET", app.url + "/config")[0] == 401
    assert http("POST", app.url + "/admin/reload")[0] == 401
    assert http("GET", app.url + "/config", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _, body = http("GET", app.url + "/config", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200 and ADMIN_TOKEN not in body.decode()
    assert json.loads(body)["admin"]["token_file"] == "***"
    assert http("GET", app.url + "/health")[0] == 200  # probes need no token
    logs = "".join(p.read_text(errors="replace") for p in Path(app.settings["log_dir"]).rglob("*") if p.is_file())
    assert ADMIN_TOKEN not in logs


def test_bad_host_is_421_and_bad_origin_is_403(keyed: Any) -> None:
    app, keys = keyed
    status, _, body = call(app, "tools/list", headers={**bearer(keys["reader"]), "Host": "evil.example"})
    assert status == 421 and body["error"]["message"].startswith("Misdirected")
    status, _, body = call(app, "tools/list", headers={**bearer(keys["reader"]), "Origin": "http://evil.example"})
    assert status == 403 and "Origin" in body["error"]["message"]
    assert call(app, "tools/list", headers={**bearer(keys["reader"]), "Origin": "http://agents.example"})[0] == 200


def test_same_origin_requests_pass_and_foreign_origins_stay_refused(keyed: Any) -> None:
    app, keys = keyed
    for host in (f"localhost:{app.port}", f"127.0.0.1:{app.port}"):
        status, _, _ = call(app, "tools/list", headers={**bearer(keys["reader"]), "Host": host, "Origin": f"http://{host}"})
        assert status == 200, host
    for origin in (f"http://localhost:{app.port + 1}", f"https://localhost:{app.port}", "http://evil.example", "null"):
        status, _, body = call(app, "tools/list", headers={**bearer(keys["reader"]), "Host": f"localhost:{app.port}",
                                                           "Origin": origin})
        assert status == 403 and "Origin" in body["error"]["message"], origin


def test_refused_credentials_leave_records_with_the_method_and_name(keyed: Any) -> None:
    app, _ = keyed
    from_body, from_headers = uuid.uuid4().hex, uuid.uuid4().hex
    status, _, body = call(app, "tools/call", "delete_note", {"arguments": {"id": 1}}, {"X-Request-ID": from_body}, 31)
    assert status == 401 and body["id"] == 31  # the answer carries the request's id, now that the body is read
    headers, _ = modern_request("tools/call", "add_note", {})
    status, _, _ = http("POST", app.mcp_url, b"not json", {**headers, "X-Request-ID": from_headers})
    assert status == 401
    by_body = wait_until(lambda: record_for(app, from_body), 5, "audit record of the 401")
    assert (by_body["status"], by_body["method"], by_body["name"], by_body["jsonrpc_id"]) == (401, "tools/call", "delete_note", 31)
    by_headers = wait_until(lambda: record_for(app, from_headers), 5, "audit record of the 401")
    assert (by_headers["status"], by_headers["method"], by_headers["name"]) == (401, "tools/call", "add_note")


def test_a_client_request_id_is_kept_only_in_a_safe_form_by_nginx_and_by_the_worker(keyed: Any) -> None:
    app, keys = keyed
    worker = f"http://127.0.0.1:{app.settings['workers']['base_port']}/mcp"
    for url in (app.mcp_url, worker):  # through nginx, and straight to a worker's loopback port
        marker = uuid.uuid4().hex
        unsafe = f'{marker}","principal":"admin'
        headers, body = modern_request("tools/call", "search_notes", {"name": "search_notes", "arguments": {"query": "x"}})
        status, answer, _ = http("POST", url, body, {**headers, **bearer(keys["reader"]), "X-Request-ID": unsafe})
        assert status == 200 and answer.get("x-request-id") != unsafe
        # The record is written before the answer leaves: it is there, under a fresh id.
        assert not [r for r in audit_records(app) if marker in r["request_id"]], url
    safe = "client-chosen.id:1_" + uuid.uuid4().hex[:8]
    status, headers, _ = call(app, "tools/list", headers={**bearer(keys["reader"]), "X-Request-ID": safe})
    assert status == 200 and headers["x-request-id"] == safe
    assert wait_until(lambda: record_for(app, safe), 5, "audit record")["request_id"] == safe


def strict_json(line: str) -> Any:
    """json.loads that refuses NaN and Infinity, as every other JSON parser does."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in the audit trail")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("body", [b'{"jsonrpc":"2.0","id":NaN,"method":"tools/list"}',
                                  b'{"jsonrpc":"2.0","id":Infinity,"method":"tools/list"}',
                                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add_note",'
                                  b'"arguments":{"title":"t","body":"b","n":-Infinity}}}'])
def test_nan_and_infinity_are_refused_and_the_audit_trail_stays_json(keyed: Any, body: bytes) -> None:
    app, keys = keyed
    rid = uuid.uuid4().hex
    headers, _ = modern_request("tools/list", None, {})
    status, _, raw = http("POST", app.mcp_url, body, {**headers, **bearer(keys["writer"]), "X-Request-ID": rid})
    assert status == 400 and json.loads(raw)["error"]["code"] == -32600
    record = wait_until(lambda: record_for(app, rid), 5, "audit record")
    assert record["status"] == 400
    for path in sorted((Path(app.settings["log_dir"]) / "audit").glob("*.jsonl*")):
        for line in path.read_text().splitlines():
            strict_json(line)


def test_a_body_nested_far_too_deep_gets_400_and_a_record_that_says_so(keyed: Any) -> None:
    app, keys = keyed
    rid = uuid.uuid4().hex
    headers, _ = modern_request("tools/list", None, {})
    status, _, raw = http("POST", app.mcp_url, b"[" * (BODY_LIMIT - 1024), {**headers, **bearer(keys["writer"]), "X-Request-ID": rid})
    assert status == 400 and json.loads(raw)["error"]["code"] == -32700
    assert wait_until(lambda: record_for(app, rid), 5, "audit record")["status"] == 400
    assert call(app, "tools/list", headers=bearer(keys["writer"]))[0] == 200  # the worker is fine


def test_oversize_bodies_get_413_json_from_nginx_and_from_the_worker(keyed: Any) -> None:
    app, keys = keyed
    headers, _ = modern_request("tools/call", "add_note", {})
    big = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + b"x" * (BODY_LIMIT + 10) + b'"}}'
    status, _, body = http("POST", app.mcp_url, big, {**headers, **bearer(keys["writer"])})
    assert status == 413 and json.loads(body)["error"]["code"] == -32600
    worker = f"http://127.0.0.1:{app.settings['workers']['base_port']}{app.settings.get('mcp', {}).get('path', '/mcp')}"
    status, _, body = http("POST", worker, big, {**headers, **bearer(keys["writer"])})
    assert status == 413 and "larger than" in json.loads(body)["error"]["message"]


def test_a_client_cannot_spoof_its_address_without_a_trusted_proxy(keyed: Any) -> None:
    app, keys = keyed
    rid = uuid.uuid4().hex
    status, headers, _ = call(app, "tools/list", headers={**bearer(keys["reader"]), "X-Forwarded-For": "203.0.113.9",
                                                         "X-Real-IP": "203.0.113.9", "X-Request-ID": rid})
    assert status == 200 and headers["x-request-id"] == rid
    record = wait_until(lambda: record_for(app, rid), 5, "audit record")
    assert record["client"] == "127.0.0.1" and record["principal"] == "reader"


# --- JWT ----------------------------------------------------------------------------------

JWT_SECRET = "jwt-test-secret-" + "k" * 32
ISSUER = "https://idp.test.example"


def token(sub: str = "agent-j", scope: str = "notes:write", exp_in: int = 300) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iss": ISSUER, "aud": "mcp-tests", "exp": now + exp_in, "iat": now, "scope": scope},
                      JWT_SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def jwt_appliance() -> Iterator[Appliance]:
    app = new_appliance(1)
    try:
        secret = app.base / "jwt.secret"
        secret.write_text(JWT_SECRET)
        secret.chmod(0o644)
        app.settings["auth"] = {"mode": "jwt", "jwt_key_file": str(secret), "jwt_issuer": ISSUER,
                                "jwt_audience": "mcp-tests"}
        yield start(app, 1)
    finally:
        cleanup(app)


def test_jwt_401_points_to_the_protected_resource_metadata(jwt_appliance: Appliance) -> None:
    status, headers, _ = call(jwt_appliance, "tools/list")
    assert status == 401
    challenge = headers["www-authenticate"]
    url = challenge.split('resource_metadata="')[1].split('"')[0]
    assert url == f"{jwt_appliance.url}/.well-known/oauth-protected-resource/mcp"
    status, _, body = http("GET", url)
    doc = json.loads(body)
    assert status == 200 and doc["resource"] == jwt_appliance.mcp_url and doc["authorization_servers"] == [ISSUER]


@pytest.mark.anyio
async def test_a_valid_jwt_is_served_and_an_expired_one_refused(jwt_appliance: Appliance) -> None:
    async with mcp_client(jwt_appliance.mcp_url, "legacy", bearer(token())) as (client, _):
        assert not (await client.call_tool("list_notes", {})).is_error
    status, headers, _ = call(jwt_appliance, "tools/list", headers=bearer(token(exp_in=-600)))
    assert status == 401 and "expired" in headers["www-authenticate"]
    status, _, body = call(jwt_appliance, "tools/call", "delete_note", {"arguments": {"id": 1}},
                           bearer(token(scope="notes:read")))
    assert status == 403 and body["error"]["data"]["required_scope"] == "notes:write"


# --- the edge: TLS, trusted proxy, rate limit ---------------------------------------------

CLIENT_BEHIND_PROXY = "198.51.100.7"


@pytest.fixture(scope="module")
def edge() -> Iterator[tuple[Appliance, Path]]:
    app = new_appliance(1)
    try:
        cert, key = make_certificate(app.base)
        tls_port = free_port_block(1)
        app.settings["tls"] = {"enabled": True, "port": tls_port, "cert_file": str(cert), "key_file": str(key),
                               "redirect_http": True, "hsts": True}
        app.settings["http"]["trusted_proxies"] = ["127.0.0.1/32"]
        # Loopback stays exempt; a client behind the (loopback) proxy is limited to 1 request/s
        # (auth.mode "none": the workers' share is per client address).
        app.settings["limits"] = {"rate": 1, "burst": 2, "retry_after": 3}
        yield start(app, 1), cert
    finally:
        cleanup(app)


def tls_url(app: Appliance, path: str = "/mcp") -> str:
    return f"https://localhost:{app.settings['tls']['port']}{path}"


def test_tls_negotiates_http2_with_modern_protocols_only(edge: Any) -> None:
    app, cert = edge
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", app.settings["tls"]["port"])) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(cert))
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", app.settings["tls"]["port"])) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.anyio
@pytest.mark.parametrize("era", ERAS)
async def test_mcp_client_works_over_https(edge: Any, era: str) -> None:
    app, cert = edge
    async with tls_client(cert) as http_client:
        async with Client(streamable_http_client(tls_url(app), http_client=http_client), mode=era) as client:
            assert (await client.list_tools()).tools
        response = await http_client.get(tls_url(app, "/health"))
    assert response.headers["strict-transport-security"].startswith("max-age=")


def test_plain_http_redirects_to_https_except_health(edge: Any) -> None:
    app, _ = edge
    status, headers, _ = http("POST", app.mcp_url, b"{}", {"Content-Type": "application/json"})
    assert status == 308 and headers["location"] == f"https://127.0.0.1:{app.settings['tls']['port']}/mcp"
    assert http("GET", app.url + "/health")[0] == 200


def tls_post(app: Appliance, cert: Path, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One 2026-07-28 tools/list over HTTPS (HTTP/1.1), with extra headers."""
    base, body = modern_request("tools/list", None, {})
    request = urllib.request.Request(tls_url(app), data=body, method="POST", headers={**base, **headers})
    context = ssl.create_default_context(cafile=str(cert))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def test_trusted_proxy_names_the_real_client_in_the_audit_record(edge: Any) -> None:
    app, cert = edge
    rid = uuid.uuid4().hex
    # The rightmost address a trusted proxy did not add is the client; earlier ones may be forged.
    status, _, _ = tls_post(app, cert, {"X-Forwarded-For": f"192.0.2.1, {CLIENT_BEHIND_PROXY}", "X-Request-ID": rid})
    assert status == 200
    assert wait_until(lambda: record_for(app, rid), 5, "audit record")["client"] == CLIENT_BEHIND_PROXY


def test_rate_limit_answers_429_with_retry_after_and_is_counted(edge: Any) -> None:
    app, cert = edge
    answers = [tls_post(app, cert, {"X-Forwarded-For": "203.0.113.50"}) for _ in range(8)]
    statuses = [a[0] for a in answers]
    # burst 2 at 1 request/s: most of 8 quick requests are refused, none fails otherwise.
    assert 200 in statuses and statuses.count(429) >= 4 and set(statuses) <= {200, 429}, statuses
    _, headers, body = next(a for a in answers if a[0] == 429)
    assert headers["retry-after"] == "3"
    assert json.loads(body)["error"]["message"].startswith("Too many requests")

    def counted() -> float:
        with urllib.request.urlopen(tls_url(app, "/metrics"), context=ssl.create_default_context(cafile=str(cert)),
                                    timeout=10) as response:
            text = response.read().decode()
        line = next(l for l in text.splitlines() if l.startswith('mcp_appliance_rate_limited_total{limit="client"}'))
        return float(line.split()[-1])

    wait_until(lambda: counted() >= statuses.count(429), 10, "429s counted in /metrics")


def test_the_host_itself_is_exempt_from_rate_limits(edge: Any) -> None:
    app, cert = edge
    assert [tls_post(app, cert, {})[0] for _ in range(6)] == [200] * 6
