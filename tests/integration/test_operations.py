"""Live operations under constant load: rolling reload, scale, drained worker restart, reload rules.

One appliance serves the whole module; every test first sets the worker count it needs
(with `scale`, itself under test here). Loads are bounded in time; the only pass/fail
figures are counts of failed requests, never timings.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from mcp.shared.exceptions import MCPError

from appliance.health import worker_process_name
from tests.harness import Appliance, cleanup, http, new_appliance, to_toml, wait_until
from tests.integration.clients import mcp_client, sessions_on_two_workers
from tests.integration.load import LegacyLoad, ModernLoad, first_error

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    app = new_appliance(2, max_workers=6)  # the tests scale to 4
    try:
        app.start().wait_healthy(timeout=60, workers=2)
        yield app
    finally:
        cleanup(app)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def admin_token(appliance: Appliance) -> str:
    return (appliance.run_dir / "admin.token").read_text().strip()


def admin_post(appliance: Appliance, path: str, body: Any = None, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST to the admin API through nginx, with the admin token unless another is given."""
    headers = {"Authorization": f"Bearer {admin_token(appliance) if token is None else token}",
               "Content-Type": "application/json"}
    status, _, raw = http("POST", appliance.url + path, body if body is not None else {}, headers, timeout=300)
    return status, json.loads(raw)


def worker_pids(appliance: Appliance) -> dict[str, int]:
    return {p.name: p.pid for p in appliance.supervisor.processes() if p.name.startswith("worker-")}


def nginx_worker_pids(appliance: Appliance) -> set[int]:
    """nginx's worker processes: they change on every nginx reload (HUP)."""
    master = {p.name: p for p in appliance.supervisor.processes()}["nginx"].pid
    return {child.pid for child in psutil.Process(master).children()}


@contextlib.contextmanager
def config_restored(appliance: Appliance) -> Iterator[str]:
    """The block may rewrite appliance.toml (its original text is yielded); the original comes back after it."""
    original = appliance.config_path.read_text()
    try:
        yield original
    finally:
        appliance.config_path.write_text(original)


def with_setting(appliance: Appliance, section: str, **values: Any) -> str:
    """appliance.toml with `values` changed in `section`."""
    return to_toml({**appliance.settings, section: {**appliance.settings[section], **values}})


def set_workers(appliance: Appliance, count: int) -> None:
    result = appliance.command("scale", str(count), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    appliance.wait_healthy(timeout=60, workers=count)


async def run_cli(appliance: Appliance, *args: str) -> str:
    result = await anyio.to_thread.run_sync(lambda: appliance.command(*args, timeout=300))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.anyio
async def test_rolling_reload_under_load_fails_no_modern_call_and_ends_only_restarted_sessions(
    appliance: Appliance,
) -> None:
    await anyio.to_thread.run_sync(set_workers, appliance, 2)
    before, nginx_before = worker_pids(appliance), nginx_worker_pids(appliance)
    modern = ModernLoad(appliance.mcp_url, loops=4)
    legacy = LegacyLoad(appliance.mcp_url, sessions=4, pause=0.05)
    async with modern.running(), legacy.running():
        await modern.wait_for_calls(100)
        await legacy.wait_for_calls(20)
        live_at_start = [record.session_ids[-1] for record in legacy.records]
        await run_cli(appliance, "reload")
        await modern.wait_for_calls(100)
        await legacy.wait_for_calls(20)

    assert modern.outcomes.failed == 0, str(modern.outcomes)
    assert legacy.outcomes.failed == 0, str(legacy.outcomes)
    # Every worker restarted, so every session open when the reload began ended with 404,
    # and its client re-initialized and went on with a new session.
    for record, session in zip(legacy.records, live_at_start, strict=True):
        assert session in record.ended, (session, record)
        assert record.session_ids[-1] != session, record
    after = worker_pids(appliance)
    assert after.keys() == before.keys() and not set(after.values()) & set(before.values()), (before, after)
    assert nginx_worker_pids(appliance) == nginx_before, "a rolling reload must not reload nginx"


@pytest.mark.anyio
async def test_scale_2_to_4_to_1_under_load_fails_no_modern_call_and_keeps_surviving_sessions(
    appliance: Appliance,
) -> None:
    await anyio.to_thread.run_sync(set_workers, appliance, 2)
    before = worker_pids(appliance)
    modern = ModernLoad(appliance.mcp_url, loops=4)
    with first_error():
        # Right after a restart nginx's pooled connections still favour the older worker for a
        # second or two (pool.UPSTREAM_IDLE_TIMEOUT): allow enough tries to find both.
        async with sessions_on_two_workers(appliance.mcp_url, tries=40) as (kept, removed), modern.running():
            await scale_2_4_1(appliance, modern, kept, removed, before)
    assert modern.outcomes.failed == 0, str(modern.outcomes)
    assert (removed.wire.session_id, 404) in [e[1:] for e in removed.wire.exchanges], removed.wire.exchanges
    assert worker_pids(appliance) == {worker_process_name(0): before[worker_process_name(0)]}
    _, health = await anyio.to_thread.run_sync(appliance.health)
    assert health["workers"]["configured"] == 1 and health["status"] == "ok", health


async def scale_2_4_1(appliance: Appliance, modern: ModernLoad, kept: Any, removed: Any, before: dict[str, int]) -> None:
    """The scale test's steps, while the load runs and a session lives on each of workers 0 and 1."""
    await modern.wait_for_calls(100)

    status, doc = await anyio.to_thread.run_sync(admin_post, appliance, "/admin/scale", {"workers": 4})
    assert status == 200 and doc["workers"] == 4, doc
    health = await anyio.to_thread.run_sync(lambda: appliance.wait_healthy(timeout=60, workers=4))
    assert health["workers"]["configured"] == 4
    grown = worker_pids(appliance)
    assert {k: grown[k] for k in before} == before, "scaling up must not restart running workers"
    await modern.wait_for_calls(100)
    assert not (await kept.client.call_tool("list_notes", {})).is_error

    await run_cli(appliance, "scale", "1")
    await modern.wait_for_calls(100)
    assert not (await kept.client.call_tool("list_notes", {})).is_error  # same session, worker 0
    with pytest.raises(MCPError):  # worker 1 is gone, and its session with it (404)
        await removed.client.call_tool("list_notes", {})


@pytest.mark.anyio
async def test_reload_of_a_single_worker_borrows_a_temporary_one_and_fails_nothing(appliance: Appliance) -> None:
    await anyio.to_thread.run_sync(set_workers, appliance, 1)
    before = worker_pids(appliance)
    modern = ModernLoad(appliance.mcp_url, loops=4)
    async with modern.running():
        await modern.wait_for_calls(100)
        out = await run_cli(appliance, "reload")
        await modern.wait_for_calls(100)
    assert "temporary second worker" in out, out
    assert modern.outcomes.failed == 0, str(modern.outcomes)
    after = worker_pids(appliance)
    assert after.keys() == before.keys() and after != before, (before, after)


@pytest.mark.anyio
async def test_worker_restart_through_admin_api_is_drained_and_spares_other_sessions(appliance: Appliance) -> None:
    await anyio.to_thread.run_sync(set_workers, appliance, 2)
    before = worker_pids(appliance)
    modern = ModernLoad(appliance.mcp_url, loops=4)
    async with sessions_on_two_workers(appliance.mcp_url, tries=40) as (kept, restarted), modern.running():
        await modern.wait_for_calls(100)
        status, doc = await anyio.to_thread.run_sync(admin_post, appliance, "/admin/workers/1/restart")
        assert status == 200, doc
        await modern.wait_for_calls(100)
        assert not (await kept.client.call_tool("list_notes", {})).is_error
        with pytest.raises(MCPError):  # its worker restarted: the session is gone (404)
            await restarted.client.call_tool("list_notes", {})
        async with mcp_client(appliance.mcp_url) as (again, _):  # and the client starts a new one
            assert not (await again.call_tool("list_notes", {})).is_error

    assert modern.outcomes.failed == 0, str(modern.outcomes)
    assert (restarted.wire.session_id, 404) in [e[1:] for e in restarted.wire.exchanges]
    after = worker_pids(appliance)
    assert after[worker_process_name(0)] == before[worker_process_name(0)]
    assert after[worker_process_name(1)] != before[worker_process_name(1)]


def test_a_live_scale_survives_reload_until_the_config_count_changes(appliance: Appliance) -> None:
    set_workers(appliance, 2)
    set_workers(appliance, 3)
    result = appliance.command("reload", timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(worker_pids(appliance)) == 3  # appliance.toml still says 2, but it did not change

    with config_restored(appliance):
        appliance.config_path.write_text(with_setting(appliance, "workers", count=1))
        result = appliance.command("reload", timeout=300)
        assert result.returncode == 0, result.stderr
        assert "scaling 3 -> 1" in result.stdout, result.stdout
        assert list(worker_pids(appliance)) == [worker_process_name(0)]
    result = appliance.command("reload", timeout=300)  # back to appliance.toml's 2
    assert result.returncode == 0, result.stderr
    assert len(appliance.wait_healthy(timeout=60, workers=2)["probes"]) == 2


def test_reload_applies_nginx_settings_with_a_graceful_nginx_reload(appliance: Appliance) -> None:
    set_workers(appliance, 2)
    master = {p.name: p for p in appliance.supervisor.processes()}["nginx"].pid
    nginx_before = nginx_worker_pids(appliance)
    with config_restored(appliance):
        appliance.config_path.write_text(with_setting(appliance, "http", read_timeout=1234))
        result = appliance.command("reload", timeout=300)
        assert result.returncode == 0, result.stderr
        assert "nginx reloaded" in result.stdout, result.stdout
        assert "proxy_read_timeout 1234s;" in (appliance.run_dir / "nginx.conf").read_text()
        # The same master re-read its configuration (HUP) and started new worker processes.
        assert {p.name: p for p in appliance.supervisor.processes()}["nginx"].pid == master
        wait_until(lambda: nginx_worker_pids(appliance).isdisjoint(nginx_before), 30, "new nginx workers")
    assert appliance.command("reload", timeout=300).returncode == 0
    assert appliance.wait_healthy(timeout=30, workers=2)["status"] == "ok"


def test_reload_refuses_bad_or_restart_only_config_and_changes_nothing(appliance: Appliance) -> None:
    set_workers(appliance, 2)
    before = worker_pids(appliance)
    with config_restored(appliance) as original:
        appliance.config_path.write_text(original + "\n[workers\n")
        result = appliance.command("reload")
        assert result.returncode != 0 and "not valid TOML" in result.stderr, result.stderr

        base_port = appliance.settings["workers"]["base_port"] + 100
        appliance.config_path.write_text(with_setting(appliance, "workers", base_port=base_port))
        result = appliance.command("reload")
        assert result.returncode != 0, result.stdout
        assert "workers.base_port" in result.stderr and "restart" in result.stderr, result.stderr
    assert worker_pids(appliance) == before
    assert appliance.wait_healthy(timeout=10, workers=2)["status"] == "ok"


def test_admin_operations_need_the_token_and_valid_input(appliance: Appliance) -> None:
    set_workers(appliance, 2)
    status, _ = admin_post(appliance, "/admin/scale", {"workers": 3}, token="wrong")
    assert status == 401
    for body in ({}, {"workers": "3"}, {"workers": 0}, {"workers": 65}, {"workers": True}):
        status, doc = admin_post(appliance, "/admin/scale", body)
        assert status == 400 and doc["detail"], (body, doc)
    status, doc = admin_post(appliance, "/admin/workers/7/restart")
    assert status == 400 and "no worker 7" in doc["detail"], doc

    # One operation at a time: while another holds the lock, the next is refused (409).
    lock = os.open(Path(appliance.run_dir) / "operations.lock", os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status, doc = admin_post(appliance, "/admin/reload")
        assert status == 409 and "another operation" in doc["detail"], doc
        result = appliance.command("scale", "3")
        assert result.returncode != 0 and "another operation" in result.stderr
    finally:
        os.close(lock)
    assert wait_until(lambda: len(worker_pids(appliance)) == 2, 5, "nothing changed")
