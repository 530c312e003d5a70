"""The gate works for any hosted ASGI app: sessions route to their owner, Host and Origin are checked."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.gate.sessions import owner_prefix
from tests.harness import Appliance, cleanup, http, new_appliance
from tests.integration.clients import modern_request, sessions_on_two_workers

pytestmark = pytest.mark.integration

FIXTURE_APP = Path(__file__).with_name("asgi_app.py")
ALLOWED_ORIGIN = "https://agents.example.com"


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    app = new_appliance(
        2,
        mcp={"app": "asgi_app:app", "allowed_hosts": ["127.0.0.1:*", "mcp.example.com"],
             "allowed_origins": [ALLOWED_ORIGIN]},
    )
    try:
        # The operator's own module on the workers' import path (they run with cwd=run_dir
        # as the service user; supervisord passes the environment on to them).
        shutil.copy(FIXTURE_APP, app.base / "asgi_app.py")
        app.env["PYTHONPATH"] = str(app.base)
        app.start()
        app.wait_healthy(timeout=60, workers=2)
        yield app
    finally:
        cleanup(app)


def call(appliance: Appliance, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    base, body = modern_request("tools/list", None, {})
    status, _, raw = http("POST", appliance.mcp_url, body, {**base, **headers})
    return status, json.loads(raw)


@pytest.mark.anyio
async def test_sessions_of_a_plain_asgi_app_route_to_their_owner(appliance: Appliance) -> None:
    async with sessions_on_two_workers(appliance.mcp_url) as sessions:
        for session in sessions:
            for _ in range(3):
                result = await session.client.call_tool("whoami", {})
                assert not result.is_error, result
                served = result.structured_content
                # Served by the owner's process, and the app saw its own untagged id.
                assert served["pid"] == appliance.worker_pid(session.owner)
                assert session.wire.session_id == owner_prefix(0, session.owner) + served["session_header"]


@pytest.mark.parametrize("host", ["evil.example", "mcp.example.com:8443", "localhost"])
def test_host_not_allowed_gets_421(appliance: Appliance, host: str) -> None:
    status, doc = call(appliance, {"Host": host})
    assert status == 421, doc
    assert doc["error"]["message"].startswith("Misdirected request")  # type: ignore[index]


@pytest.mark.parametrize("host", ["mcp.example.com", "127.0.0.1:{port}"])
def test_allowed_public_host_passes(appliance: Appliance, host: str) -> None:
    status, doc = call(appliance, {"Host": host.format(port=appliance.port)})
    assert status == 200, doc
    assert "whoami" in {t["name"] for t in doc["result"]["tools"]}  # type: ignore[index]


def test_origin_not_allowed_gets_403(appliance: Appliance) -> None:
    status, doc = call(appliance, {"Origin": "https://evil.example"})
    assert status == 403, doc
    assert doc["error"]["message"].startswith("Forbidden")  # type: ignore[index]


def test_allowed_origin_passes(appliance: Appliance) -> None:
    status, doc = call(appliance, {"Origin": ALLOWED_ORIGIN})
    assert status == 200, doc
