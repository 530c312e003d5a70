"""A throw-away PostgreSQL cluster (Debian's postgresql 15) on a unix socket only, for tests and bench/."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Cluster:
    """One running cluster: its directory (also the socket directory) and a URL file the appliance reads."""

    base: Path

    @property
    def url(self) -> str:
        # Trust auth on the socket: no password to keep; the file is still the secret's home.
        return f"postgresql:///postgres?host={self.base}&user=postgres"

    @property
    def url_file(self) -> Path:
        return self.base / "database-url"

    def _pg_ctl(self, *args: str) -> None:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.base / "data"), *args)

    def start(self) -> None:
        self._pg_ctl("-o", f"-k {self.base} -c listen_addresses=", "-l", str(self.base / "log"), "-w", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")


def as_postgres(*command: str) -> None:
    """Run `command` as the postgres user (PostgreSQL refuses to run as root)."""
    subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A fresh cluster, started for the block, stopped and removed after it whatever happens."""
    base = Path(tempfile.mkdtemp(prefix="mcp-appliance-pg-", dir="/tmp"))
    pg = Cluster(base)
    try:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        base.chmod(0o777)  # the appliance's service user reaches the socket in it
        as_postgres(str(PG_BIN / "initdb"), "-D", str(base / "data"), "-A", "trust", "-U", "postgres")
        pg.start()
        pg.url_file.write_text(pg.url + "\n")
        pg.url_file.chmod(0o644)  # in a test: readable by the service user (in production: 0640, its group)
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)
