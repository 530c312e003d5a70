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
from appliance.config import DEFAULT_SERVER, ConfigError, Settings, config_path, load_settings


def _fail(message: str, code: int = 2) -> int:
    print(f"mcp-appliance: error: {message}", file=sys.stderr)
    return code


def _render_context(settings: Settings, path: Path, nginx: str) -> object:
    from appliance.peers import read_nameservers
    from appliance.render import RenderContext, cli_command

    return RenderContext(command=cli_command(sys.executable, path), nginx=nginx, as_root=os.geteuid() == 0,
                         nameservers=read_nameservers(), bin_dir=str(Path(sys.executable).parent))


def cmd_check(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Validate the config and import the hosted app."""
    from appliance.gate.services import check_gate
    from appliance.preflight import check_notes_database, notes_warnings
    from appliance.worker import HostedAppError, import_servers

    from appliance.state.checks import state_warnings

    try:
        targets = import_servers(settings)
        check_gate(settings)
        check_notes_database(settings)
    except (HostedAppError, ConfigError) as exc:
        return _fail(str(exc))
    for warning in state_warnings(settings, targets[DEFAULT_SERVER]) + notes_warnings(settings):
        print(f"mcp-appliance: warning: {warning}", file=sys.stderr)
    extra = "".join(f", {server.name} at {server.path}" for server in settings.servers)
    print(f"ok: {settings.source}: {settings.workers.count} workers serving {settings.mcp.app}{extra} "
          f"on port {settings.http.port}")
    return 0


def cmd_render(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Write the generated files to a directory for inspection."""
    from appliance.preflight import find_nginx
    from appliance.render import render_all, write_files

    try:
        nginx = find_nginx()
    except ConfigError:
        nginx = "/usr/sbin/nginx"  # rendering for another machine is fine without nginx here
    try:
        files = render_all(settings, _render_context(settings, path, nginx))  # type: ignore[arg-type]
    except ConfigError as exc:
        return _fail(str(exc))
    for written in write_files(files, Path(args.out)):
        print(written)
    return 0


def cmd_run(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Render, check everything that can fail, then become supervisord."""
    from appliance import preflight
    from appliance.gate.services import preflight_gate
    from appliance.operations import prepare_run
    from appliance.render import render_all, write_files
    from appliance.state.keys import ensure_ring
    from appliance.supervisor import nudge_when_up, socket_path
    from appliance.worker import HostedAppError, import_servers

    as_root = os.geteuid() == 0
    try:
        import_servers(settings)
        nginx = preflight.find_nginx()
        supervisord = preflight.find_supervisord()
        preflight.check_ports_free(settings)
        preflight.check_notes_database(settings)
        preflight.prepare_dirs(settings, as_root)
        preflight_gate(settings, as_root)
        ensure_ring(settings, as_root)
        ctx = _render_context(settings, path, nginx)
        files = render_all(settings, ctx)  # type: ignore[arg-type]
    except (ConfigError, HostedAppError) as exc:
        return _fail(str(exc))
    write_files(files, settings.run_dir)
    prepare_run(settings, ctx, path, as_root)  # type: ignore[arg-type]
    conf = str(settings.run_dir / "supervisord.conf")
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:  # the child wakes supervisord's first loop: programs start 1 s sooner
        nudge_when_up(socket_path(settings.run_dir))
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
    servers = doc.get("servers", [])
    if servers:
        print(f"\n{'SERVER':<18} {'KIND':<8} {'STATUS':<10} PATH")
        for server in servers:
            print(f"{server['name']:<18} {server['kind']:<8} {server['status']:<10} {server['path']}")
    workers = doc["workers"]
    print(f"\nhealth: {doc['status']} — {workers['serving']}/{workers['configured']} workers serving, "
          f"{doc['service']} {doc['version']} ({doc['environment']})")
    return 0 if doc["status"] == "ok" else 1


def cmd_worker(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Internal: one MCP worker (started by supervisord)."""
    from appliance.logs import configure_logging
    from appliance.worker import run_worker

    from appliance.runtime import live_worker_count

    count = live_worker_count(settings)  # `scale` may have changed it since `run`
    if not 0 <= args.index < count:
        return _fail(f"--index {args.index}: the appliance runs {count} workers")
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
    from appliance.events import run_events

    run_events(settings)
    return 0


def cmd_keys(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Manage the API keys in auth.keys_file (the key itself is shown once, at `add`)."""
    from appliance import keys

    if args.keys_command == "rotate-state":
        return _rotate_state(settings)
    file = settings.auth.keys_file
    user = settings.user if os.geteuid() == 0 else None
    try:
        if args.keys_command == "add":
            entry, key = keys.add_key(file, args.principal, args.scope or [], user)
            print(f"added key {entry.id} for {entry.principal} (scopes: {' '.join(entry.scopes) or '-'}) to {file}")
            print("the key (shown only now; store it safely):", file=sys.stderr)
            print(key)
        elif args.keys_command == "list":
            entries = keys.read_keys(file) if file.exists() else {}
            print(f"{'ID':<14} {'PRINCIPAL':<24} {'CREATED':<21} SCOPES")
            for e in entries.values():
                print(f"{e.id:<14} {e.principal:<24} {e.created:<21} {' '.join(e.scopes) or '-'}")
        else:
            entry = keys.revoke_key(file, args.id, user)
            print(f"revoked key {entry.id} of {entry.principal}; workers refuse it within a second")
    except ConfigError as exc:
        return _fail(str(exc))
    if settings.auth.mode != "api_keys":
        print(f"note: auth.mode is {settings.auth.mode!r}; keys are used only with auth.mode = \"api_keys\"",
              file=sys.stderr)
    return 0


def _rotate_state(settings: Settings) -> int:
    """`keys rotate-state`: the request-state ring's three phases, each by a rolling reload."""
    from appliance.operations import OperationError
    from appliance.state.rotation import rotate

    def reload() -> None:
        if _operate(settings, "reload") != 0:
            raise OperationError("the rolling reload failed; run `mcp-appliance keys rotate-state` again to resume")

    def note(message: str) -> None:
        print(f"mcp-appliance: {message}", flush=True)

    started = time.monotonic()
    try:
        ring = rotate(settings, reload, note, as_root=os.geteuid() == 0)
    except (ConfigError, OperationError) as exc:
        return _fail(str(exc), 1)
    print(f"mcp-appliance: request-state keys rotated in {time.monotonic() - started:.1f}s; "
          f"key {ring.fingerprints()[0]} seals")
    return 0


def cmd_nginx(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Internal: nginx's master (started by supervisord), after a dead master's leftovers are gone."""
    from appliance.nginx_master import exec_nginx

    exec_nginx(args.argv, settings.run_dir)
    return 0  # not reached


def _operate(settings: Settings, action: str, *args: int) -> int:
    """Run an operation in this process, printing its progress; exit 0 when it succeeded."""
    import logging

    from appliance.operations import OperationError, Operator

    progress = logging.getLogger("appliance.operations")
    if not progress.handlers:  # `keys rotate-state` operates three times in one process
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("mcp-appliance: %(message)s"))
        progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    operator = Operator(settings)
    try:
        result = getattr(operator, action)(*args)
        if result.restart_admin:
            operator.restart_admin()
            print("mcp-appliance: admin app restarted with the new settings")
    except OperationError as exc:
        return _fail(str(exc), 1)
    return 0


def _traced_operation(settings: Settings, action: str, *args: int) -> int:
    """`_operate`, its span sent like the admin app's when tracing is on (the CLI is a process of its own)."""
    if not settings.tracing.enabled:
        return _operate(settings, action, *args)
    from appliance.tracing import setup_tracing

    tracing = setup_tracing(settings, "cli")
    try:
        return _operate(settings, action, *args)
    finally:
        if tracing is not None:
            tracing.shutdown()


def cmd_scale(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Change the number of workers of the running appliance."""
    return _traced_operation(settings, "scale", args.workers)


def cmd_reload(settings: Settings, path: Path, args: argparse.Namespace) -> int:
    """Re-read appliance.toml and restart every worker, one at a time, drained."""
    return _traced_operation(settings, "reload")


COMMANDS = {
    "run": (cmd_run, "render the config and run supervisord in the foreground (what systemd, Docker and Kubernetes call)"),
    "check": (cmd_check, "validate the config and import the hosted app; exit 0 when all is well"),
    "render": (cmd_render, "write the generated supervisord.conf, nginx.conf and supervisorctl.conf to a directory"),
    "status": (cmd_status, "show every program's state, pid, uptime, RSS and the aggregated health"),
    "scale": (cmd_scale, "run N workers now: new ones join when ready, removed ones drain first (lasts until restart)"),
    "reload": (cmd_reload, "apply appliance.toml and restart the workers one at a time without failing a request"),
    "worker": (cmd_worker, argparse.SUPPRESS),
    "admin": (cmd_admin, argparse.SUPPRESS),
    "events": (cmd_events, argparse.SUPPRESS),
    "nginx": (cmd_nginx, argparse.SUPPRESS),
    "keys": (cmd_keys, "manage API keys: keys add --principal NAME [--scope S ...] | keys list | keys revoke ID; "
                          "keys rotate-state"),
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
        if name == "keys":
            ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
            add = ksub.add_parser("add", help="create a key and print it (once)")
            add.add_argument("--principal", "-p", required=True, help="who the key belongs to (an agent or a team)")
            add.add_argument("--scope", "-s", action="append", help="a scope the key grants; repeat for more")
            ksub.add_parser("list", help="list keys (ids, principals, scopes; never the keys)")
            revoke = ksub.add_parser("revoke", help="remove a key by id")
            revoke.add_argument("id")
            ksub.add_parser("rotate-state", help="rotate the request-state key ring (three rolling reloads and "
                            "one state.request_ttl; run it again to resume)")
        if name == "nginx":
            p.add_argument("argv", nargs=argparse.REMAINDER, help="the nginx command line")
        if name == "scale":
            p.add_argument("workers", type=int, metavar="N", help="the number of workers to run")
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
