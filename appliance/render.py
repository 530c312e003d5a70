"""Every generated file, rendered from the templates in conf/ by one pure function."""

from __future__ import annotations

import ipaddress
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

from appliance.config import Settings
from appliance.gate.sessions import owner_prefix
from appliance.supervisor import socket_path

TEMPLATES = {
    "supervisord.conf": "supervisord.conf.j2",
    "nginx.conf": "nginx.conf.j2",
    "supervisorctl.conf": "supervisorctl.conf.j2",
}


@dataclass(frozen=True)
class RenderContext:
    """What rendering needs beyond the settings: facts about this machine and process."""

    #: Command line that runs this package's CLI, e.g. "/opt/mcp-appliance/bin/mcp-appliance --config …".
    command: str
    #: The nginx binary.
    nginx: str = "/usr/sbin/nginx"
    #: Whether supervisord starts as root (then children drop to settings.user).
    as_root: bool = False


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


def template_values(settings: Settings, ctx: RenderContext) -> dict[str, object]:
    """The data the templates use, prepared here so the templates stay plain."""
    count = settings.workers.count
    workers = [
        {
            "index": k,
            "address": f"{settings.workers.host}:{settings.worker_port(k)}",
            "upstream": f"mcp_w{k}",
            "prefix": owner_prefix(settings.node.ordinal, k),
            # Sessions of one worker share a few idle connections; the pool holds the rest.
            "keepalive": max(4, settings.http.upstream_keepalive // count),
        }
        for k in range(count)
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
        "http": settings.http,
        "listen": _listen(settings.http.host, settings.http.port),
        "worker_upstreams": workers,
        "worker_count": count,
        "retry_tries": max(2, count),
        "admin_address": f"{settings.admin.host}:{settings.admin.port}",
        "mcp_path": settings.mcp.path,
        "command": ctx.command,
        "nginx": ctx.nginx,
        "graceful_timeout": settings.workers.graceful_timeout,
        "environment": f'MCP_APPLIANCE_DATA_DIR="{settings.data_dir}"',
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
