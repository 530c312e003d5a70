"""A throw-away Debian 12 host with systemd as PID 1, booted by systemd-nspawn, for deploy tests.

The rootfs is debootstrapped once and cached outside the clone (rebuilt when missing or
when the recipe below changes); every test boots a fresh copy of it. The guest shares
the host's network namespace, so it reaches the package registries like the host does
and its listeners are on the host's loopback. We reach it with `nsenter -t <init> -a`.

Run `python -m tests.deploy.guest` to build the cache ahead of time.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CACHE_DIR = Path(os.environ.get("MCP_APPLIANCE_ROOTFS_CACHE", "/var/cache/mcp-appliance-test"))
#: What a freshly installed small Debian server has, plus what the test needs to reach it:
#: python3 (+ python3-apt, which the apt module would otherwise install on first use) for
#: Ansible, curl for the health check from inside. No dbus, as on a minimal server (and
#: dbus-daemon never reports ready inside nspawn on this kernel).
PACKAGES = ("systemd", "systemd-sysv", "python3", "python3-apt", "ca-certificates", "curl", "iproute2")
SOURCES = f"""\
deb {MIRROR} {SUITE} main
deb {MIRROR} {SUITE}-updates main
deb http://deb.debian.org/debian-security {SUITE}-security main
"""
#: Units with nothing to do in a throw-away container (logind needs dbus; apt timers would
#: race the playbook for the dpkg lock).
MASKED_UNITS = ("systemd-logind.service", "apt-daily.timer", "apt-daily-upgrade.timer")
#: The environment of a fresh root login on the guest: commands an operator types run with
#: this, not with the test's own environment (CI, tool venvs, the host's PIP_* settings).
LOGIN_ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "LANG": "C.UTF-8",
             "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
#: pip settings of the host that name things only the host has (a local wheel directory).
HOST_ONLY_PIP_SETTINGS = frozenset({"find-links", "config-file"})
#: Bump when the build steps change in a way PACKAGES/SOURCES do not show.
RECIPE_VERSION = "2"


def recipe_id() -> str:
    """Short hash naming the cached rootfs, so a changed recipe gets a new cache."""
    text = "\n".join([SUITE, MIRROR, SOURCES, RECIPE_VERSION, *PACKAGES, *MASKED_UNITS])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cached_rootfs_path() -> Path:
    return CACHE_DIR / f"rootfs-{SUITE}-{recipe_id()}"


def ensure_rootfs() -> Path:
    """The cached rootfs, built now if missing (a few minutes, once)."""
    target = cached_rootfs_path()
    if (target / ".complete").exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    _prune_cache(keep=target)
    work = Path(tempfile.mkdtemp(prefix=f"{target.name}.building-", dir=CACHE_DIR))
    try:
        _build(work)
        (work / ".complete").write_text(recipe_id() + "\n")
        # Built aside and renamed, so `target` is complete whenever it exists; a concurrent
        # run that finished first wins and this build is dropped.
        if not target.exists():
            work.rename(target)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return target


def _prune_cache(keep: Path) -> None:
    """Drop rootfs caches of older recipes and builds interrupted over an hour ago."""
    for path in CACHE_DIR.glob(f"rootfs-{SUITE}-*"):
        building = ".building-" in path.name
        if path != keep and (not building or time.time() - path.stat().st_mtime > 3600):
            shutil.rmtree(path, ignore_errors=True)


def _build(root: Path) -> None:
    root.chmod(0o755)  # it becomes the guest's "/" (mkdtemp made it 0700)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
        check=True, stdout=subprocess.DEVNULL,
    )
    (root / "etc/apt/sources.list").write_text(SOURCES)
    (root / "etc/hostname").write_text("mcp-guest\n")
    # The registries are reached through a TLS-intercepting proxy whose CA the host trusts:
    # the guest must trust it too (apt over https, pip inside the appliance's venv).
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir():
        shutil.copytree(local_cas, root / "usr/local/share/ca-certificates", dirs_exist_ok=True)
    subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL)
    host_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    guest_bundle = root / "etc/ssl/certs/ca-certificates.crt"
    if host_bundle.exists() and host_bundle.read_bytes() not in guest_bundle.read_bytes():
        # Certificates the host trusts some other way than /usr/local/share/ca-certificates.
        with guest_bundle.open("ab") as out:
            out.write(host_bundle.read_bytes())
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # An empty machine-id makes systemd generate a fresh one on each boot of a copy.
    (root / "etc/machine-id").write_text("")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


def _cgroup_hierarchies() -> list[Path]:
    """Our own cgroup in each hierarchy nspawn uses (the unified tree and name=systemd)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point, rest = fields[4], fields[fields.index("-") + 1:]
        fstype, options = rest[0], rest[2].split(",")
        if fstype == "cgroup2" and "" in own:
            found.append(Path(point + own[""]))
        elif fstype == "cgroup" and "name=systemd" in options and "name=systemd" in own:
            found.append(Path(point + own["name=systemd"]))
    return found


class GuestCgroup:
    """A cgroup of our own for one nspawn: with --keep-unit and no systemd on the host,
    nspawn creates its `payload`/`supervisor` cgroups inside the cgroup it runs in, so
    without this two guests would share them, and they would stay behind."""

    def __init__(self) -> None:
        name = f"mcp-appliance-test-{os.getpid()}-{time.monotonic_ns()}"
        self.paths = [base / name for base in _cgroup_hierarchies()]

    def create(self) -> None:
        for path in self.paths:
            path.mkdir()

    def enter(self) -> None:
        """Move the calling process in (used as preexec_fn, between fork and exec)."""
        for path in self.paths:
            (path / "cgroup.procs").write_text("0")

    def remove(self) -> None:
        """rmdir the whole tree, deepest first; a cgroup with processes left stays (and says so)."""
        for top in self.paths:
            if not top.exists():
                continue
            dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
            for path in dirs:
                try:
                    path.rmdir()
                except OSError as exc:
                    print(f"guest cleanup: cannot remove cgroup {path}: {exc}")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


class Guest:
    """A booted copy of the cached rootfs. Use `booted_guest()`; it always cleans up."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.cgroup = GuestCgroup()
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def boot(self, timeout: float = 60) -> None:
        """Start systemd-nspawn -b and wait until systemd inside reports the system up."""
        self.cgroup.create()
        with self.log.open("wb") as out:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--console=read-only",
                 "--machine=mcp-guest", "-D", str(self.root), "-b"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=self.cgroup.enter,
            )
        deadline = time.monotonic() + timeout
        while not self.init_pid:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.nspawn.returncode}: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("no systemd process appeared under systemd-nspawn")
            self.init_pid = self._find_init()
            time.sleep(0.05)
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=max(1, deadline - time.monotonic()))
            status = state.stdout.strip()
            if status in {"running", "degraded"}:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest systemd did not come up: {status!r}")
            time.sleep(0.2)  # "starting" answers come before --wait can attach; poll again

    def _find_init(self) -> int:
        assert self.nspawn is not None
        # nspawn forks a helper which forks the container's PID 1; find a `systemd` below it.
        todo = [self.nspawn.pid]
        while todo:
            pid = todo.pop()
            for child in _children(pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return child
                todo.append(child)
        return 0

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the guest (all its namespaces) and capture its output."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-a", "--", *cmd],
            capture_output=True, text=True, timeout=timeout, input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"in guest: {' '.join(cmd)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def shell(self, script: str, cwd: str = "/root", env: dict[str, str] | None = None,
              check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `script` with bash as root, in `cwd`, with a fresh login's environment (plus `env`)."""
        variables = [f"{k}={v}" for k, v in {**LOGIN_ENV, **(env or {})}.items()]
        return self.run("env", "-i", "-C", cwd, *variables, "bash", "-c", script, check=check, timeout=timeout)

    def use_host_pip_config(self) -> None:
        """Give the guest the host's pip settings (/etc/pip.conf and PIP_* variables) as its own
        /etc/pip.conf, so pip in the guest reaches the package index the way the host does (the
        TLS proxy's CA bundle): an operator's machine would have its own. Settings naming what
        only the host has (find-links, a path or file: URL missing in the guest) are left out."""
        config = configparser.ConfigParser(interpolation=None)
        config.read("/etc/pip.conf")
        if not config.has_section("global"):
            config.add_section("global")
        for name, value in os.environ.items():
            if name.startswith("PIP_"):
                config.set("global", name[4:].lower().replace("_", "-"), value)
        for section in config.sections():
            for key, value in list(config.items(section, raw=True)):
                if key in HOST_ONLY_PIP_SETTINGS or not self._exists_in_guest(value):
                    config.remove_option(section, key)
        text = io.StringIO()
        config.write(text)
        (self.root / "etc/pip.conf").write_text(text.getvalue())

    def _exists_in_guest(self, value: str) -> bool:
        """False for a value that names a local file (a path or file: URL) the guest lacks."""
        for word in value.split():
            path = word.removeprefix("file://")
            if path.startswith("/") and not (self.root / path.lstrip("/")).exists():
                return False
        return True

    def shutdown(self, timeout: float = 60) -> None:
        """Power off through systemd; kill by PID only if it does not stop in time."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        if self.init_pid:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=20)
        try:
            self.nspawn.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Killing the container's init kills its whole PID namespace; then nspawn exits.
            if self.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            try:
                self.nspawn.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=15)


def _unmount_below(path: Path) -> None:
    """Lazily unmount anything still mounted at or below `path` in our mount namespace."""
    prefix = str(path.resolve())
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


@contextlib.contextmanager
def booted_guest(workdir: Path) -> Iterator[Guest]:
    """Copy the cached rootfs into `workdir`, boot it, yield it; always power off and remove it."""
    source = ensure_rootfs()
    root = workdir / "rootfs"
    guest = Guest(root, workdir / "nspawn.log")
    try:
        subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(root)], check=True)
        (root / ".complete").unlink(missing_ok=True)
        guest.boot()
        yield guest
    finally:
        try:
            guest.shutdown()
        finally:
            _unmount_below(root)
            guest.cgroup.remove()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    print(ensure_rootfs())
