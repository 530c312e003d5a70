"""audit.on_error: "auto" refuses in production only; a failed writer's guard answers 503 and never runs the call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, load_settings
from appliance.config import audit_refuses as refuses
from appliance.gate.audit import AuditGuard, AuditWriter
from tests.harness import to_toml
from tests.tmpfs import remount, tmpfs

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(tmp_path: Path, **values: Any) -> Any:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(values))
    return load_settings(path, environ={})


@pytest.mark.parametrize(("environment", "on_error", "refused"), [
    ("production", "auto", True), ("staging", "auto", False), ("development", "auto", False),
    ("production", "continue", False), ("development", "refuse", True),
])
def test_auto_refuses_only_in_production(tmp_path: Path, environment: str, on_error: str, refused: bool) -> None:
    s = settings(tmp_path, environment=environment, auth={"allow_none_in_production": True},
                 audit={"on_error": on_error})
    assert refuses(s) is refused


def test_a_bad_on_error_names_the_key_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'audit.on_error' = 'ignore' is invalid: expected one of 'auto', 'refuse'"):
        settings(tmp_path, audit={"on_error": "ignore"})


async def test_the_guard_answers_503_without_running_the_call_while_the_trail_is_read_only(tmp_path: Path) -> None:
    ran: list[str] = []

    async def hosted(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    with tmpfs(tmp_path / "audit", "256k") as audit:
        remount(audit, "ro")
        writer = AuditWriter(audit / "worker-00.jsonl", settings(tmp_path).audit, refuse=True)
        guard = AuditGuard(hosted, writer)
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/mcp", "method": "POST", "headers": []}
        await guard(scope, None, send)
        assert ran == [] and sent[0]["status"] == 503
        assert "audit trail cannot be written" in json.loads(sent[1]["body"])["error"]["message"]
        remount(audit, "rw")
        sent.clear()
        await guard(scope, None, send)
        assert ran == ["/mcp"] and sent[0]["status"] == 200
