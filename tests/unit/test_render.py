"""Rendering: the generated nginx.conf and supervisord.conf are valid for the real tools and complete."""

from __future__ import annotations

import configparser
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from supervisor.options import ClientOptions, ServerOptions

from appliance.config import McpSettings, NodeSettings, Settings, WorkersSettings
from appliance.gate.sessions import owner_prefix
from appliance.lifetime import STOP_MARGIN, supervisord_pidfile
from appliance.pool import session_socket
from appliance.render import RenderContext, cli_command, render_all, write_files
from appliance.supervisor import worker_program

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
COMMAND = cli_command("/opt/mcp-appliance/bin/python", Path("/etc/mcp-appliance/appliance.toml"))


def settings_for(tmp_path: Path, workers: int = 3, **changes: object) -> Settings:
    return dataclasses.replace(
        Settings(),
        run_dir=tmp_path / "run", log_dir=tmp_path / "log", data_dir=tmp_path / "data",
        workers=WorkersSettings(count=workers, base_port=9100),
        source=str(tmp_path / "appliance.toml"),
        **changes,  # type: ignore[arg-type]
    )


def render(tmp_path: Path, settings: Settings, as_root: bool = False) -> dict[str, str]:
    files = render_all(settings, RenderContext(command=COMMAND, nginx=NGINX, as_root=as_root))
    (settings.run_dir / "nginx").mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    write_files(files, settings.run_dir)
    return files


def server_options(conf: Path) -> ServerOptions:
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return options


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
@pytest.mark.parametrize("workers", [1, 3])
def test_rendered_nginx_conf_passes_nginx_t(tmp_path: Path, workers: int) -> None:
    settings = settings_for(tmp_path, workers)
    render(tmp_path, settings)
    result = subprocess.run(
        [NGINX, "-t", "-c", str(settings.run_dir / "nginx.conf"), "-p", f"{settings.run_dir}/nginx/", "-e", "stderr"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_supervisord_conf_parses_with_supervisors_own_options(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 3)
    render(tmp_path, settings)
    options = server_options(settings.run_dir / "supervisord.conf")
    groups = {g.name: g for g in options.process_group_configs}
    assert set(groups) == {worker_program(k) for k in range(3)} | {"admin", "nginx", "events"}
    for k in range(3):
        (worker,) = groups[worker_program(k)].process_configs
        assert worker.command == f"{COMMAND} worker --index {k}"
        assert worker.autorestart and worker.directory == str(settings.run_dir)
    nginx = groups["nginx"].process_configs[0]
    assert f"{NGINX} -c {settings.run_dir}/nginx.conf" in nginx.command  # maybe behind a wrapper
    assert groups["events"].process_configs[0].command == f"{COMMAND} events"
    assert options.nodaemon is True
    assert options.server_configs[0]["file"] == str(settings.run_dir / "supervisor.sock")


@pytest.mark.parametrize("workers", [1, 4])
def test_supervisord_conf_runs_one_worker_program_per_worker(tmp_path: Path, workers: int) -> None:
    """N workers, each its own program (a live scale adds or removes one without touching the others)."""
    files = render(tmp_path, settings_for(tmp_path, workers))
    parser = configparser.RawConfigParser()
    parser.read_string(files["supervisord.conf"])
    programs = sorted(s for s in parser.sections() if s.startswith(f"program:{worker_program(0)[:-2]}"))
    assert programs == [f"program:{worker_program(k)}" for k in range(workers)]
    assert [parser.get(p, "command").rsplit(" ", 1)[1] for p in programs] == [str(k) for k in range(workers)]
    assert parser.get("eventlistener:events", "events") == "PROCESS_STATE,SUPERVISOR_STATE_CHANGE_STOPPING"
    assert "daemon off;" in files["nginx.conf"]


def test_workers_get_the_data_dir_in_their_environment(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2)
    render(tmp_path, settings)
    groups = {g.name: g for g in server_options(settings.run_dir / "supervisord.conf").process_group_configs}
    environment = groups[worker_program(0)].process_configs[0].environment
    assert environment["MCP_APPLIANCE_DATA_DIR"] == str(settings.data_dir)


def test_every_program_gets_a_home_and_package_caches_under_the_data_dir(tmp_path: Path) -> None:
    """npx and uvx as the service user write only under data_dir, whatever HOME supervisord had."""
    settings = settings_for(tmp_path, 2)
    render(tmp_path, settings)
    groups = {g.name: g for g in server_options(settings.run_dir / "supervisord.conf").process_group_configs}
    for program in (worker_program(0), worker_program(1), "admin", "events"):
        environment = groups[program].process_configs[0].environment
        assert environment["HOME"] == str(settings.data_dir)
        for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME",
                     "npm_config_cache", "UV_CACHE_DIR", "UV_TOOL_DIR", "UV_PYTHON_INSTALL_DIR"):
            assert Path(environment[name]).is_relative_to(settings.data_dir), (name, environment[name])
        assert environment["NODE_EXTRA_CA_CERTS"] == "/etc/ssl/certs/ca-certificates.crt"
        assert environment["UV_NATIVE_TLS"] == "true"


def test_workers_find_the_venvs_uvx_first_then_the_path_supervisord_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path, 1)
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    files = render_all(settings, RenderContext(command=COMMAND, nginx=NGINX, bin_dir="/opt/mcp-appliance/bin"))
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    write_files(files, settings.run_dir)
    groups = {g.name: g for g in server_options(settings.run_dir / "supervisord.conf").process_group_configs}
    environment = groups[worker_program(0)].process_configs[0].environment
    assert environment["PATH"] == "/opt/mcp-appliance/bin:/usr/local/bin:/usr/bin:/bin"


def test_supervisorctl_conf_points_at_the_appliance_socket(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2)
    render(tmp_path, settings)
    options = ClientOptions()
    options.realize(args=["-c", str(settings.run_dir / "supervisorctl.conf")])
    assert options.serverurl == f"unix://{settings.run_dir / 'supervisor.sock'}"


def pcre_to_python(pattern: str) -> str:
    """nginx map regex (PCRE named groups) as a Python regex."""
    return pattern.replace("(?<", "(?P<")


@pytest.mark.parametrize("node", [0, 7])
def test_every_worker_has_a_session_map_entry_and_an_upstream(tmp_path: Path, node: int) -> None:
    settings = settings_for(tmp_path, 3, node=NodeSettings(ordinal=node))
    nginx = render(tmp_path, settings)["nginx.conf"]
    session_map = re.search(r"map \$http_mcp_session_id \$mcp_upstream \{(.*?)\}", nginx, re.S)
    # Everything else: the pool of the server whose location the request is in (set there).
    assert session_map is not None and "default $mcp_server_pool;" in session_map[1]
    entries = re.findall(r'^\s*"(~[^"]+)" (\S+);', session_map[1], re.M)
    pool = re.search(r"upstream mcp_pool \{(.*?)\}", nginx, re.S)
    assert pool is not None and "least_conn;" in pool[1]
    for k in range(3):
        session_id = owner_prefix(node, k) + "0123456789abcdef"
        routed = [(pattern, target) for pattern, target in entries if re.match(pcre_to_python(pattern[1:]), session_id)]
        assert len(routed) == 1, (session_id, entries)
        pattern, target = routed[0]
        group = re.match(pcre_to_python(pattern[1:]), session_id).groupdict()  # type: ignore[union-attr]
        upstream_name = target.replace("$mcp_worker", group.get("mcp_worker", ""))
        assert upstream_name == f"mcp_w{k}"
        upstream = re.search(rf"upstream {upstream_name} \{{(.*?)\}}", nginx, re.S)
        assert upstream is not None and f"server unix:{session_socket(settings.run_dir, k)};" in upstream[1]
    # Another node's sessions are not routed to this node's workers.
    other = owner_prefix(node + 1, 0) + "0123456789abcdef"
    assert not any(re.match(pcre_to_python(p[1:]), other) and t.startswith("mcp_w") for p, t in entries)


def test_mcp_location_streams_and_turns_a_dead_owner_into_404(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2, mcp=McpSettings(path="/agents/mcp"))
    nginx = render(tmp_path, settings)["nginx.conf"]
    location = re.search(r"location = /agents/mcp \{(.*?)\}", nginx, re.S)
    assert location is not None
    assert "proxy_buffering off;" in location[1]
    assert f"proxy_read_timeout {settings.http.read_timeout}s;" in location[1]
    assert "error_page 502 504 = $mcp_unavailable;" in location[1]
    assert re.search(r"location @mcp_session_gone \{\s*default_type application/json;\s*return 404", nginx)


def test_every_rendered_file_says_it_is_generated(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2)
    for name, text in render(tmp_path, settings).items():
        first = text.splitlines()[0]
        assert "Generated by mcp-appliance" in first and "do not edit" in first, name
        assert settings.source in first, name


def test_listeners_are_loopback_except_nginx(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2)
    nginx = render(tmp_path, settings)["nginx.conf"]
    assert re.findall(r"^\s*listen (\S+)", nginx, re.M) == ["0.0.0.0:80"]
    assert "server 127.0.0.1:9000;" in nginx  # the admin app


def test_ipv6_public_listener_is_bracketed(tmp_path: Path) -> None:
    settings = dataclasses.replace(settings_for(tmp_path, 1), http=dataclasses.replace(Settings().http, host="::"))
    assert "listen [::]:80 default_server;" in render(tmp_path, settings)["nginx.conf"]


def test_non_root_render_has_no_user_switch(tmp_path: Path) -> None:
    files = render(tmp_path, settings_for(tmp_path, 2))
    assert not re.search(r"^user ", files["nginx.conf"], re.M)
    assert "user=" not in files["supervisord.conf"]


def test_root_render_drops_children_to_the_service_user(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2)
    files = render(tmp_path, settings, as_root=True)
    assert re.search(rf"^user {settings.user};", files["nginx.conf"], re.M)
    groups = {g.name: g for g in server_options(settings.run_dir / "supervisord.conf").process_group_configs}
    for name in (worker_program(0), worker_program(1), "admin", "events"):
        assert all(p.uid is not None for p in groups[name].process_configs), name
    # The nginx master starts as root to bind low ports; its workers drop via `user`.
    assert groups["nginx"].process_configs[0].uid is None


def test_by_default_every_mcp_request_counts_against_its_client_address(tmp_path: Path) -> None:
    nginx = render(tmp_path, settings_for(tmp_path, 2))["nginx.conf"]
    location = re.search(r"location = /mcp \{(.*?)\n        \}", nginx, re.S)
    assert location is not None
    limits = re.findall(r"limit_req zone=(\S+)", location[1])
    assert limits == ["appliance_address"], limits
    zone = re.search(r"limit_req_zone (\S+) zone=appliance_address:", nginx)
    assert zone is not None and zone[1] == "$appliance_address_key"
    # The key is the address or nothing (exempt): no header a client sends can change it.
    key_map = re.search(r"map \$appliance_limit_exempt \$appliance_address_key \{(.*?)\}", nginx, re.S)
    assert key_map is not None and "$http_" not in key_map[1] and "$binary_remote_addr" in key_map[1]


def test_exemptions_and_the_status_page_look_at_the_connecting_address(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2)
    settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http, trusted_proxies=("10.0.0.0/8",)))
    nginx = render(tmp_path, settings)["nginx.conf"]
    assert "geo $realip_remote_addr $appliance_peer_exempt" in nginx
    status = re.search(r"location = /_appliance/nginx_status \{(.*?)\n        \}", nginx, re.S)
    assert status is not None and "$appliance_from_host" in status[1] and "allow " not in status[1]


def test_every_program_ends_by_itself_before_supervisord_would_kill_it(tmp_path: Path) -> None:
    """Workers exit at their own bound (graceful_timeout + STOP_MARGIN) before stopwaitsecs; nginx goes as a group."""
    settings = settings_for(tmp_path, 2)
    files = render(tmp_path, settings)
    options = server_options(settings.run_dir / "supervisord.conf")
    groups = {g.name: g.process_configs[0] for g in options.process_group_configs}
    for k in range(2):
        worker = groups[worker_program(k)]
        assert worker.stopwaitsecs > settings.workers.graceful_timeout + STOP_MARGIN
        assert worker.stopasgroup and worker.killasgroup
    # A master killed at the bound takes its worker processes (its process group) along.
    assert groups["nginx"].killasgroup
    assert f"worker_shutdown_timeout {settings.workers.graceful_timeout}s;" in files["nginx.conf"]
    # Each program checks its parent against the pid supervisord writes here (appliance/lifetime.py).
    assert options.pidfile == str(supervisord_pidfile(settings.run_dir))


def test_only_sessionless_reads_go_where_nginx_may_send_them_twice(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2)
    settings = dataclasses.replace(settings, workers=dataclasses.replace(settings.workers, read_timeout=7))
    nginx = render(tmp_path, settings)["nginx.conf"]
    block = re.search(r'map "\$http_mcp_session_id\|\$http_mcp_method" \$mcp_read \{(.*?)\}', nginx, re.S)
    assert block is not None
    pattern = re.search(r'"~(.*?)" 1;', block[1])
    assert pattern is not None
    reads = ["tools/list", "resources/list", "resources/read", "resources/templates/list", "prompts/list",
             "prompts/get", "completion/complete", "ping", "server/discover"]
    for method in reads:
        assert re.match(pattern[1], f"|{method}"), method
    for key in ("|tools/call", "|initialize", "|", "n0w1-abc|tools/list", "|tools/listx", "|resources/subscribe"):
        assert not re.match(pattern[1], key), key
    location = re.search(r"location @mcp_read \{(.*?)\n        \}", nginx, re.S)
    assert location is not None
    assert "proxy_next_upstream error timeout non_idempotent;" in location[1]
    assert "proxy_read_timeout 7s;" in location[1]
    # Everything else never goes twice to a worker once it was sent.
    mcp = re.search(r"location = /mcp \{(.*?)\n        \}", nginx, re.S)
    assert mcp is not None and "non_idempotent" not in mcp[1] and "return 418;" in mcp[1]


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
def test_every_server_path_gets_the_mcp_location_and_nginx_accepts_it(tmp_path: Path) -> None:
    from appliance.config import ServerSettings

    servers = (ServerSettings(name="calc", path="/servers/calc/mcp", app="mypkg.calc:server"),
               ServerSettings(name="files", path="/files/mcp", command=("npx", "server-filesystem"), workers=1))
    settings = settings_for(tmp_path, 2, servers=servers)
    nginx = render(tmp_path, settings)["nginx.conf"]
    for path, upstream in (("/mcp", "mcp_pool"), ("/servers/calc/mcp", "mcp_pool"), ("/files/mcp", "mcp_pool_files")):
        location = re.search(rf"location = {re.escape(path)} \{{(.*?)\n        \}}", nginx, re.S)
        assert location is not None, path
        # Its pool: every worker's, or (a worker count) its own, whose slots are its own.
        assert f"set $mcp_server_pool {upstream};" in location[1]
        # The same treatment as /mcp: owner routing, a dead owner's 404, reads sent to @mcp_read, limits.
        assert f"proxy_pass http://$mcp_upstream{path}$is_args$args;" in location[1]
        assert "error_page 502 504 = $mcp_unavailable;" in location[1]
        assert "return 418;" in location[1] and "error_page 429 = @appliance_rate_limited;" in location[1]
    own = re.search(r"upstream mcp_pool_files \{(.*?)\n    \}", nginx, re.S)
    assert own is not None and f"server unix:{settings.run_dir}/pool/files/slot-00.sock" in own[1]
    result = subprocess.run(
        [NGINX, "-t", "-c", str(settings.run_dir / "nginx.conf"), "-p", f"{settings.run_dir}/nginx/", "-e", "stderr"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("cpus", "setting", "processes"), [(1, 0, 1), (2, 0, 1), (4, 0, 1), (4.5, 0, 2), (16, 0, 4),
                                                             (2, 3, 3)])
def test_nginx_runs_one_worker_process_per_four_cpus_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  cpus: float, setting: int, processes: int) -> None:
    monkeypatch.setattr("appliance.render.cpu_limit", lambda: cpus)
    settings = settings_for(tmp_path, http=dataclasses.replace(Settings().http, nginx_workers=setting))
    conf = render(tmp_path, settings)["nginx.conf"]
    assert re.findall(r"^worker_processes (\S+);$", conf, re.MULTILINE) == [str(processes)]
