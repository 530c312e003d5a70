"""Every generated file, rendered from the templates in conf/ by one pure function."""

from __future__ import annotations

import ipaddress
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

from appliance import peers, pool, toolchain
from appliance.lifetime import supervisord_pidfile
from appliance.config import Settings
from appliance.metrics import edge_socket, multiproc_dir
from appliance.gate.sessions import owner_prefix
from appliance.scrape import cpu_limit
from appliance.supervisor import socket_path, worker_program

TEMPLATES = {
    "supervisord.conf": "supervisord.conf.j2",
    "nginx.conf": "nginx.conf.j2",
    "supervisorctl.conf": "supervisorctl.conf.j2",
}


#: What nginx answers for a session it cannot reach: the spec's "re-initialize" signal.
SESSION_GONE_BODY = '{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'


@dataclass(frozen=True)
class RenderContext:
    """What rendering needs beyond the settings: facts about this machine and process."""

    #: Command line that runs this package's CLI, e.g. "/opt/mcp-appliance/bin/mcp-appliance --config …".
    command: str
    #: The nginx binary.
    nginx: str = "/usr/sbin/nginx"
    #: Whether supervisord starts as root (then children drop to settings.user).
    as_root: bool = False
    #: This machine's DNS servers (from /etc/resolv.conf), for looking up peer nodes by name.
    nameservers: tuple[str, ...] = ()
    #: The appliance venv's bin directory (uvx, beside this Python), put first on the programs' PATH.
    bin_dir: str = ""


def _environment() -> jinja2.Environment:
    conf_dir = Path(__file__).resolve().parent.parent / "conf"
    loader: jinja2.BaseLoader
    if (conf_dir / "nginx.conf.j2").exists():  # a source checkout or editable install
        loader = jinja2.FileSystemLoader(str(conf_dir))
    else:  # a wheel: conf/ is installed as the package appliance.conf
        loader = jinja2.PackageLoader("appliance", "conf")
    return jinja2.Environment(
        loader=loader, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=False,
    )


def _listen(host: str, port: int) -> str:
    if ipaddress.ip_address(host).version == 6:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def nginx_processes(cpus: float) -> int:
    """nginx's default worker processes for `cpus` CPUs: one per 4, at least one (http.nginx_workers = 0)."""
    return max(1, math.ceil(cpus / 4))


def nginx_workers(settings: Settings) -> int:
    """How many worker processes nginx runs (http.nginx_workers; 0: nginx_processes of the CPUs it may use)."""
    return settings.http.nginx_workers or nginx_processes(cpu_limit())


def pool_upstream(server: str = "") -> str:
    """nginx's upstream for the shared pool, or for the pool of `server` (one with a worker count)."""
    return f"mcp_pool_{server}" if server else "mcp_pool"


def template_values(settings: Settings, ctx: RenderContext) -> dict[str, object]:
    """The data the templates use, prepared here so the templates stay plain."""
    count = settings.workers.count
    workers = [
        {
            "index": k,
            "program": worker_program(k),
            "address": f"{settings.workers.host}:{settings.worker_port(k)}",
            "upstream": f"mcp_w{k}",
            "prefix": owner_prefix(settings.node.ordinal, k),
        }
        for k in range(count)
    ]
    # nginx knows every worker index a `scale` may reach, so scaling never reloads it
    # (see appliance/pool.py); a session of a worker that does not exist gets 404.
    session_upstreams = [
        {
            "upstream": f"mcp_w{k}",
            "socket": pool.session_socket(settings.run_dir, k),
            # Sessions of one worker share a few idle connections; the pool holds the rest.
            # Not derived from the worker count: a live scale must not change nginx.conf.
            "keepalive": max(4, settings.http.upstream_keepalive // 4),
        }
        for k in range(pool.MAX_WORKERS)
    ]
    user = settings.user if ctx.as_root else ""
    return {
        "version": settings.version,
        "source": settings.source,
        "service_name": settings.service_name,
        "user": user,
        "as_root": ctx.as_root,
        "run_dir": settings.run_dir,
        "log_dir": settings.log_dir,
        "log_to_stdout": settings.log_target == "stdout",
        "log_max_bytes": settings.log_max_bytes,
        "log_backups": settings.log_backups,
        "socket": socket_path(settings.run_dir),
        "pidfile": supervisord_pidfile(settings.run_dir),
        "http": settings.http,
        "nginx_workers": nginx_workers(settings),
        "listen": _listen(settings.http.host, settings.http.port),
        "worker_upstreams": workers,
        "worker_count": count,
        "session_upstreams": session_upstreams,
        # Tags as in appliance.gate.sessions.owner_prefix; indices 0-63 (pool.MAX_WORKERS).
        "session_pattern": rf"~^n{settings.node.ordinal}w(?<mcp_worker>[0-9]|[1-5][0-9]|6[0-3])-",
        # The shared pool first, then the pool of each server with a worker count (appliance/pool.py).
        "pools": [{"upstream": pool_upstream(name), "slots": [pool.slot_path(settings.run_dir, j, name)
                                                             for j in range(pool.SLOTS)]}
                  for name in ("", *settings.own_pools)],
        "upstream_idle_timeout": pool.UPSTREAM_IDLE_TIMEOUT,
        "pool_connection_requests": pool.POOL_CONNECTION_REQUESTS,
        # A refused slot is retried on the next one; every slot may be tried once.
        "retry_tries": pool.SLOTS,
        "admin_address": f"{settings.admin.host}:{settings.admin.port}",
        "mcp_path": settings.mcp.path,
        # One exact location per hosted server, the [mcp] one first, each with its pool.
        "servers": [{"name": server.name, "path": server.path,
                     "pool": pool_upstream(server.name if server.workers is not None else "")}
                    for server in settings.hosted_servers],
        "command": ctx.command,
        "nginx": ctx.nginx,
        "graceful_timeout": settings.workers.graceful_timeout,
        "read_timeout": settings.workers.read_timeout,
        "environment": _program_environment(settings, ctx),
        "session_gone_body": SESSION_GONE_BODY,
        "node_tag": f"n{settings.node.ordinal}",
        "peer_routes": peers.peer_routes(settings),
        "resolver": peers.nginx_resolver(settings, ctx.nameservers),
        "forwarded_header": peers.FORWARDED_HEADER,
        "forwarded_variable": "$http_" + peers.FORWARDED_HEADER.lower().replace("-", "_"),
        **_gate_values(settings),
    }


def _program_environment(settings: Settings, ctx: RenderContext) -> str:
    """supervisord's `environment` value for the workers, the admin app and the event listener."""
    values = {
        "MCP_APPLIANCE_DATA_DIR": str(settings.data_dir),
        # Workers, the admin app and the event listener write metrics files there (appliance/metrics.py).
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir(settings.run_dir)),
        # npx and uvx for stdio servers: home, caches and CA bundle (appliance/toolchain.py).
        **toolchain.runner_environment(settings.data_dir),
        "PATH": toolchain.runner_path(ctx.bin_dir),
    }
    if settings.notes.database_url_file:
        # The hosted-app contract for the notes' database (the path, never the URL).
        values["MCP_APPLIANCE_NOTES_DATABASE_URL_FILE"] = settings.notes.database_url_file
    return ",".join(f'{name}="{value}"' for name, value in values.items())


def _gate_values(settings: Settings) -> dict[str, object]:
    """Edge limits, TLS, trusted proxies and metrics access for nginx.conf."""
    tls = settings.tls
    return {
        "limits": settings.limits,
        "edge_socket": edge_socket(settings.run_dir),
        "trusted_proxies": settings.http.trusted_proxies,
        "metrics_allow": settings.metrics.allow_from,
        "tls": tls,
        "tls_listen": _listen(settings.http.host, tls.port),
        "tls_port_suffix": "" if tls.port == 443 else f":{tls.port}",
    }


def render_all(settings: Settings, ctx: RenderContext) -> dict[str, str]:
    """File name -> text of every generated file."""
    env = _environment()
    values = template_values(settings, ctx)
    return {name: env.get_template(template).render(**values) for name, template in TEMPLATES.items()}


def write_files(files: dict[str, str], directory: Path) -> list[Path]:
    """Write rendered files atomically (a reader never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        target = directory / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        written.append(target)
    return written


def cli_command(executable: str, config: Path) -> str:
    """The command line supervisord uses to start this package's subcommands."""
    return f"{shlex.quote(executable)} -m appliance --config {shlex.quote(str(config))}"
