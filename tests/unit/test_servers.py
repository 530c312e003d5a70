"""Several servers in one worker: the path router, its lifespan fan-out, secrets from files, the status hook."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from appliance.config import ServerSettings
from appliance.gate.stats import ServerHealth, WorkerStats
from appliance.routing import ServerRouter
from appliance.worker import HostedAppError, read_env_files


def app_named(name: str, events: list[str], fail_startup: bool = False) -> Starlette:
    """A Starlette app that answers its name and notes its lifespan events."""

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        events.append(f"{name} up")
        if fail_startup:
            raise RuntimeError(f"{name} cannot start")
        yield
        events.append(f"{name} down")

    async def hello(_: Any) -> PlainTextResponse:
        return PlainTextResponse(name)

    return Starlette(routes=[Route("/{rest:path}", hello, methods=["GET", "POST"])], lifespan=lifespan)


async def get(app: Any, path: str) -> str:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "headers": [], "root_path": ""}
    await app(scope, receive, send)
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


async def lifespan(app: Any) -> list[str]:
    """Run a full lifespan (startup, then shutdown) through `app`; the messages it sent back."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: list[str] = []
    for message in ("lifespan.startup", "lifespan.shutdown"):
        inbox.put_nowait({"type": message})

    async def send(message: dict[str, Any]) -> None:
        replies.append(message["type"])

    await asyncio.wait_for(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send), 5)
    return replies


def test_requests_go_to_the_server_whose_path_they_are_under() -> None:
    events: list[str] = []
    router = ServerRouter([("/mcp", app_named("notes", events)), ("/servers/calc/mcp", app_named("calc", events))])
    assert asyncio.run(get(router, "/servers/calc/mcp")) == "calc"
    assert asyncio.run(get(router, "/mcp")) == "notes"
    # Not under any server (nor a prefix that only looks alike): the first server, as with one server.
    assert asyncio.run(get(router, "/servers/calc/mcpx")) == "notes"
    assert asyncio.run(get(router, "/elsewhere")) == "notes"


def test_every_hosted_app_starts_and_stops_with_the_worker() -> None:
    events: list[str] = []
    router = ServerRouter([("/mcp", app_named("notes", events)), ("/calc", app_named("calc", events))])
    assert asyncio.run(lifespan(router)) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert sorted(events) == ["calc down", "calc up", "notes down", "notes up"]


def test_one_app_that_cannot_start_fails_the_workers_startup() -> None:
    events: list[str] = []
    router = ServerRouter([("/mcp", app_named("notes", events)), ("/calc", app_named("calc", events, True))])
    replies = asyncio.run(lifespan(router))
    assert replies[0] == "lifespan.startup.failed"


def test_an_app_without_lifespan_support_does_not_block_startup() -> None:
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http", "no lifespan here"

    events: list[str] = []
    router = ServerRouter([("/mcp", app_named("notes", events)), ("/bare", bare)])
    assert asyncio.run(lifespan(router)) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_secret_files_become_environment_values_and_errors_never_show_them(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("ghp_secret\n")
    server = ServerSettings(name="gh", command=("github-mcp",), env_files=(("GITHUB_TOKEN", str(token)),))
    assert read_env_files(server) == (("GITHUB_TOKEN", "ghp_secret"),)
    missing = ServerSettings(name="gh", command=("github-mcp",), env_files=(("GITHUB_TOKEN", str(tmp_path / "nope")),))
    with pytest.raises(HostedAppError, match=r"servers\.gh\.env_files\.GITHUB_TOKEN") as err:
        read_env_files(missing)
    assert "ghp_secret" not in str(err.value)


def test_a_server_reporting_trouble_makes_its_worker_degraded() -> None:
    class Bridge:
        def __init__(self) -> None:
            self.state: dict[str, Any] = {"status": "ok", "children": 1}

        def appliance_status(self) -> dict[str, Any]:
            return self.state

    bridge = Bridge()
    stats = WorkerStats(index=0)
    stats.servers = [ServerHealth("default", "/mcp", "app", object()), ServerHealth("files", "/f", "command", bridge)]
    doc = stats.snapshot()
    assert doc["status"] == "ok" and doc["servers"][1] == {"name": "files", "path": "/f", "kind": "command",
                                                           "status": "ok", "children": 1}
    bridge.state = {"status": "crash_looping", "reason": "its child exited 5 times in 10 s"}
    doc = stats.snapshot()
    assert doc["status"] == "degraded"
    assert "server files: its child exited 5 times in 10 s" in doc["degraded"]


def test_the_bridges_account_of_a_stdio_server_becomes_its_probe_status() -> None:
    from appliance.worker import bridge_health

    up = {"isolation": "shared", "children": 1, "up": True, "restarts": 0, "crash_looping": False, "pids": [7]}
    assert bridge_health(up) == {**up, "status": "ok"}
    assert bridge_health({**up, "children": 0, "up": False})["status"] == "down"
    looping = bridge_health({**up, "up": False, "crash_looping": True})
    assert looping["status"] == "crash_looping" and "no longer restarted" in looping["reason"]
    assert bridge_health(None)["status"] == "unknown"
    stats = WorkerStats(index=0)
    stats.servers = [ServerHealth("files", "/f", "command", None, lambda: looping)]
    assert stats.snapshot()["status"] == "degraded"


def test_a_stdio_child_gets_the_package_runners_home_and_caches_and_its_own_env_wins(tmp_path: Path) -> None:
    from appliance.config import Settings
    from appliance.worker import stdio_spec

    settings = Settings(data_dir=tmp_path)
    server = ServerSettings(name="files", command=("npx", "-y", "pkg"), env=(("npm_config_cache", "/srv/npm"),))
    env = dict(stdio_spec(server, settings).env)
    assert env["HOME"] == str(tmp_path)
    assert env["UV_CACHE_DIR"].startswith(str(tmp_path))
    assert env["npm_config_cache"] == "/srv/npm"
