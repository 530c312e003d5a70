"""Checks that `run` makes before anything starts, so a mistake fails fast and clearly."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import socket
import sys
from pathlib import Path

from appliance.config import ConfigError, Settings


def listen_claims(settings: Settings) -> list[tuple[str, str, int]]:
    """(key, host, port) of every listener the appliance opens."""
    claims = [("http.port", settings.http.host, settings.http.port), ("admin.port", settings.admin.host, settings.admin.port)]
    claims += [
        (f"workers.base_port (worker {k})", settings.workers.host, settings.worker_port(k))
        for k in range(settings.workers.count)
    ]
    if settings.tls.enabled:
        claims.append(("tls.port", settings.http.host, settings.tls.port))
    return claims


def check_ports_free(settings: Settings) -> None:
    """Every port the appliance will bind is free now."""
    for key, host, port in listen_claims(settings):
        check_port_free(key, host, port)


def check_port_free(key: str, host: str, port: int) -> None:
    """`host:port` can be bound now; a ConfigError naming `key` when not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port clash: '{key}' = {port} is already in use on {host}") from None
            if exc.errno == errno.EACCES:
                raise ConfigError(
                    f"'{key}' = {port}: permission denied binding {host}:{port} "
                    "(ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                ) from None
            raise ConfigError(f"'{key}' = {port}: cannot bind {host}:{port}: {exc.strerror}") from None


def find_nginx() -> str:
    """The nginx binary, or a ConfigError that says how to get one."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if not found:
        raise ConfigError("nginx not found on PATH or at /usr/sbin/nginx (Debian: apt-get install nginx-light)")
    return found


def find_supervisord() -> str:
    """supervisord from this package's environment."""
    beside = Path(sys.executable).parent / "supervisord"
    found = str(beside) if beside.exists() else shutil.which("supervisord")
    if not found:
        raise ConfigError("supervisord not found beside this Python or on PATH (pip install supervisor)")
    return found


def prepare_dirs(settings: Settings, as_root: bool) -> None:
    """Create the run, log and data directories; hand them to the service user when root."""
    owner = None
    if as_root:
        try:
            owner = pwd.getpwnam(settings.user)
        except KeyError:
            raise ConfigError(
                f"'user' = {settings.user!r}: no such system user (create it, e.g. "
                f"useradd --system {settings.user}, or set user in appliance.toml)"
            ) from None
    for key, path in (("run_dir", settings.run_dir), ("log_dir", settings.log_dir), ("data_dir", settings.data_dir)):
        try:
            path.mkdir(parents=True, exist_ok=True)
            if owner:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        except OSError as exc:
            raise ConfigError(f"'{key}' = '{path}': cannot create or own it: {exc.strerror}") from None
        if not os.access(path, os.W_OK):
            raise ConfigError(f"'{key}' = '{path}': not writable by this user")
    nginx_dir = settings.run_dir / "nginx"
    nginx_dir.mkdir(exist_ok=True)
    if owner:
        os.chown(nginx_dir, owner.pw_uid, owner.pw_gid)


NOTES_DATABASE_KEY = "notes.database_url_file"


def check_notes_database(settings: Settings) -> None:
    """The notes' PostgreSQL (when configured) answers now; a ConfigError naming the key when not.

    The message says what failed, never the URL: it holds the database password.
    """
    path = settings.notes.database_url_file
    if not path:
        return
    import psycopg

    from appliance.servers.notes_storage import CONNECT_TIMEOUT, read_database_url

    try:
        url = read_database_url(Path(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'{NOTES_DATABASE_KEY}' = '{path}': cannot read the database URL from it: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"'{NOTES_DATABASE_KEY}' = '{path}': cannot connect to the PostgreSQL database it "
                          f"names (within {CONNECT_TIMEOUT} s): {first}") from None


def notes_warnings(settings: Settings) -> list[str]:
    """A warning when several nodes (peers, pods) would each keep their own SQLite notes."""
    several = bool(settings.node.peers) or bool(settings.node.peer_address)
    if settings.notes.database_url_file or not several or settings.mcp.app != "appliance.servers.notes:server":
        return []
    return [f"the notes server keeps its notes in SQLite under data_dir on each node: with several nodes "
            f"(node.peers / node.peer_address) every node or pod has its own notes; set "
            f"{NOTES_DATABASE_KEY} to share one PostgreSQL database"]
