"""Request-state keys: the ring file, which hosted apps get the shared ring, what `check` warns about, rotation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mcp.server.mcpserver import MCPServer
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity

from appliance.config import ConfigError, Settings, StateSettings
from appliance.state import sealing
from appliance.state.checks import state_warnings
from appliance.state.keys import Ring, ensure_ring, parse_ring, read_ring
from appliance.state.rotation import rotate

SECRET = "a" * 64


def settings_in(tmp_path: Path, workers: int = 2, **state: object) -> Settings:
    return dataclasses.replace(Settings(), data_dir=tmp_path, state=StateSettings(**state),
                               workers=dataclasses.replace(Settings().workers, count=workers))


def boundary(server: MCPServer) -> RequestStateBoundary:
    return next(m for m in server.middleware if isinstance(m, RequestStateBoundary))


def test_first_start_generates_a_ring_readable_by_owner_and_group_only(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    ring = ensure_ring(settings, as_root=False)
    path = tmp_path / "request-state.keys"
    assert path.stat().st_mode & 0o777 == 0o640
    assert len(ring.secrets) == 1 and len(ring.secrets[0]) == 64
    assert ensure_ring(settings, as_root=False) == ring  # generated once, not at every start


def test_a_world_readable_ring_is_refused_naming_the_key(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    ensure_ring(settings, as_root=False)
    (tmp_path / "request-state.keys").chmod(0o644)
    with pytest.raises(ConfigError, match="'state.keys_file'.*readable by every user"):
        read_ring(settings)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "short\n", f"{SECRET}\n{SECRET}\n"])
def test_a_malformed_ring_is_refused_without_quoting_it(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_ring(text, "'state.keys_file'")
    assert "state.keys_file" in str(caught.value) and SECRET not in str(caught.value)


def test_a_hosted_server_with_the_sdks_per_process_default_gets_the_shared_ring() -> None:
    sealing.track_per_process_policies()
    server = MCPServer("default-app")
    assert sealing.seals_per_process(server)
    assert sealing.share_ring(server, [SECRET.encode()], 60.0)
    assert not sealing.seals_per_process(server)
    policy = boundary(server)._security
    other = RequestStateSecurity(keys=[SECRET])
    assert other.codec.unseal(policy.codec.seal(b"x")) == b"x"  # sealed under the shared key
    assert policy.ttl == 60.0


def test_an_app_that_brings_its_own_request_state_security_keeps_it() -> None:
    sealing.track_per_process_policies()
    own = RequestStateSecurity(keys=["b" * 64])
    server = MCPServer("own-app", request_state_security=own)
    assert not sealing.seals_per_process(server)
    assert not sealing.share_ring(server, [SECRET.encode()], 60.0)
    assert boundary(server)._security is own


def test_check_warns_naming_an_asgi_app_it_cannot_give_the_ring_to(tmp_path: Path) -> None:
    async def app(scope: object, receive: object, send: object) -> None: ...

    settings = dataclasses.replace(settings_in(tmp_path, workers=3),
                                   mcp=dataclasses.replace(Settings().mcp, app="mine:app"))
    [warning] = state_warnings(settings, app)
    assert "mcp.app = 'mine:app'" in warning and "per-process key" in warning
    assert state_warnings(settings_in(tmp_path, workers=1), app) == []
    assert state_warnings(settings, MCPServer("hosted")) == []


def test_rotation_goes_through_the_three_phases_each_rolled_out_before_the_next(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, request_ttl=30)
    old = ensure_ring(settings, as_root=False).secrets[0]
    seen: list[Ring] = []
    slept: list[float] = []
    clock = [1000.0]

    def reload() -> None:
        seen.append(read_ring(settings))
        clock[0] += 5

    final = rotate(settings, reload, lambda m: None, as_root=False, sleep=slept.append, clock=lambda: clock[0])
    new = final.secrets[0]
    assert new != old
    assert [r.secrets for r in seen] == [(old, new), (new, old), (new,)]
    assert slept == [30.0]  # one ttl after phase 2 was everywhere


def test_an_interrupted_rotation_resumes_with_the_phase_it_recorded(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, request_ttl=30)
    old = ensure_ring(settings, as_root=False).secrets[0]
    new = "c" * 64
    (tmp_path / "request-state.keys").write_text(Ring((old, new), "verify").text())
    seen: list[tuple[str, ...]] = []
    rotate(settings, lambda: seen.append(read_ring(settings).secrets), lambda m: None, as_root=False,
           sleep=lambda s: None)
    assert seen == [(old, new), (new, old), (new,)]
