"""The `mcp-appliance` command: thin argument parsing over the modules that do the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from appliance import __version__
from appliance.config import ConfigError, Settings, config_path, load_settings


def _fail(message: str, code: int = 2) -> int:
    print(f"mcp-appliance: error: {message}", file=sys.stderr)
    return code


def _render_context(settings: Settings, path: Path, nginx: str) -> object:
    from appliance.render import RenderContext, cli_command

    return RenderContext(command=cli_command(sys.executable, path), nginx=nginx, as_root=os.geteuid() == 0)


def cmd_check(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Validate the config and import the hosted app."""
    from appliance.worker import HostedAppError, import_target

    try:
        import_target(settings.mcp.app)
    except HostedAppError as exc:
        return _fail(str(exc))
    print(f"ok: {settings.source}: {settings.workers.count} workers serving {settings.mcp.app} on port {settings.http.port}")
    return 0


def cmd_render(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Write the generated files to a directory for inspection."""
    from appliance.preflight import find_nginx
    from appliance.render import render_all, write_files

    try:
        nginx = find_nginx()
    except ConfigError:
        nginx = "/usr/sbin/nginx"  # rendering for another machine is fine without nginx here
    files = render_all(settings, _render_context(settings, path, nginx))  # type: ignore[arg-type]
    for written in write_files(files, Path(args.out)):
        print(written)
    return 0


def cmd_run(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Render, check everything that can fail, then become supervisord."""
    from appliance import preflight
    from appliance.render import render_all, write_files
    from appliance.worker import HostedAppError, import_target

    as_root = os.geteuid() == 0
    try:
        import_target(settings.mcp.app)
        nginx = preflight.find_nginx()
        supervisord = preflight.find_supervisord()
        preflight.check_ports_free(settings)
        preflight.prepare_dirs(settings, as_root)
    except (ConfigError, HostedAppError) as exc:
        return _fail(str(exc))
    files = render_all(settings, _render_context(settings, path, nginx))  # type: ignore[arg-type]
    write_files(files, settings.run_dir)
    conf = str(settings.run_dir / "supervisord.conf")
    sys.stdout.flush()
    os.execv(supervisord, [supervisord, "--nodaemon", "-c", conf])
    return 0  # not reached


def cmd_status(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """A table of every program plus the aggregated health."""
    import psutil

    from appliance.supervisor import SupervisorClient, SupervisorUnavailable, socket_path

    try:
        processes = SupervisorClient(socket_path(settings.run_dir)).processes()
    except SupervisorUnavailable as exc:
        return _fail(f"{exc} (is the appliance running? start it with `mcp-appliance run`)", 3)
    print(f"{'PROGRAM':<18} {'STATE':<10} {'PID':>7} {'UPTIME':>10} {'RSS MiB':>8}")
    for p in processes:
        rss = ""
        if p.pid:
            try:
                rss = f"{psutil.Process(p.pid).memory_info().rss / 2**20:.1f}"
            except psutil.Error:
                rss = "?"
        uptime = time.strftime("%H:%M:%S", time.gmtime(p.uptime)) if p.uptime else "-"
        if p.uptime >= 86400:
            uptime = f"{int(p.uptime // 86400)}d {uptime}"
        print(f"{p.name:<18} {p.state:<10} {p.pid or '-':>7} {uptime:>10} {rss:>8}")
    url = f"http://{settings.admin.host}:{settings.admin.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            doc = json.load(response)
    except urllib.error.HTTPError as exc:
        doc = json.load(exc)
    except OSError as exc:
        print(f"\nhealth: unavailable ({exc})")
        return 1
    workers = doc["workers"]
    print(f"\nhealth: {doc['status']} — {workers['serving']}/{workers['configured']} workers serving, "
          f"{doc['service']} {doc['version']} ({doc['environment']})")
    return 0 if doc["status"] == "ok" else 1


def cmd_worker(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Internal: one MCP worker (started by supervisord)."""
    from appliance.logs import configure_logging
    from appliance.worker import run_worker

    if not 0 <= args.index < settings.workers.count:
        return _fail(f"--index {args.index}: workers.count is {settings.workers.count}")
    configure_logging(settings, f"worker-{args.index:02d}", args.index)
    run_worker(settings, args.index)
    return 0


def cmd_admin(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Internal: the admin app (started by supervisord)."""
    from appliance.admin import run_admin
    from appliance.logs import configure_logging

    configure_logging(settings, "admin")
    run_admin(settings)
    return 0


def cmd_events(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Internal: supervisord event listener."""
    from appliance.events import listen

    listen(settings.service_name)
    return 0


COMMANDS = {
    "run": (cmd_run, "render the config and run supervisord in the foreground (what systemd, Docker and Kubernetes call)"),
    "check": (cmd_check, "validate the config and import the hosted app; exit 0 when all is well"),
    "render": (cmd_render, "write the generated supervisord.conf, nginx.conf and supervisorctl.conf to a directory"),
    "status": (cmd_status, "show every program's state, pid, uptime, RSS and the aggregated health"),
    "worker": (cmd_worker, argparse.SUPPRESS),
    "admin": (cmd_admin, argparse.SUPPRESS),
    "events": (cmd_events, argparse.SUPPRESS),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; --config goes before the subcommand."""
    parser = argparse.ArgumentParser(prog="mcp-appliance", description="A production home for MCP servers.")
    parser.add_argument("--version", action="version", version=f"mcp-appliance {__version__}")
    parser.add_argument("--config", "-c", help="appliance.toml (default: $MCP_APPLIANCE_CONFIG or /etc/mcp-appliance/appliance.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text) if help_text != argparse.SUPPRESS else sub.add_parser(name)
        if name == "render":
            p.add_argument("--out", default="rendered", help="directory to write into (default: ./rendered)")
        if name == "worker":
            p.add_argument("--index", type=int, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    path = config_path(args.config, os.environ)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        return _fail(f"config: {exc}")
    handler, _ = COMMANDS[args.command]
    return handler(settings, path, args)
