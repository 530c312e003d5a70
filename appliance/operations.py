"""Live operations on a running appliance: scale, rolling reload, drained restart of a worker.

`mcp-appliance scale|reload` and the admin app's /admin/* routes both call an `Operator`;
a lock file in run_dir lets one operation run at a time. nginx's worker pool changes by
re-pointing slot symlinks (appliance/pool.py), never by reloading nginx. supervisord gets a
re-rendered supervisord.conf and adds or removes single worker programs, so the workers
that stay are never restarted by a scale.

Draining a worker, before it stops:
  1. no pool slot points at it any more: no new connection from nginx reaches it;
  2. SIGUSR1 through supervisord (appliance/gate/drain.py): it serves what still arrives on
     nginx's open connections and closes each after the answer; requests of its legacy
     sessions get 404 (re-initialize); its open streams end;
  3. wait until nothing is in flight and nginx holds no connection to it (nginx closes idle
     ones after pool.UPSTREAM_IDLE_TIMEOUT), bounded by workers.graceful_timeout;
  4. stop it: SIGTERM, hypercorn finishes whatever still runs (bounded again).
A worker (re)started by an operation joins the pool once its probe answers from its new pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import pwd
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import psutil
from opentelemetry import trace
from supervisor.xmlrpc import Faults

from appliance import pool
from appliance.config import ConfigError, Settings, load_settings, redacted, validate
from appliance.gate.probe import PROBE_PATH
from appliance.nginx_master import accepting_workers
from appliance.preflight import check_port_free
from appliance.render import RenderContext, render_all, write_files
from appliance.runtime import RuntimeState, read_state, state_path, with_workers, write_state
from appliance.supervisor import (
    ProcessInfo,
    SupervisorClient,
    SupervisorUnavailable,
    socket_path,
    worker_program,
)

logger = logging.getLogger("appliance.operations")

LOCK_FILE = "operations.lock"
#: Seconds a (re)started worker may take until its probe answers.
READY_TIMEOUT = 60.0
#: Seconds a reload waits, after nginx's HUP, for its old worker processes to stop accepting.
NGINX_SWITCH_WAIT = 10.0
#: Settings a reload cannot apply to a running appliance; they need a restart.
RESTART_ONLY = (
    "run_dir", "log_dir", "data_dir", "user", "log_target", "http.host", "http.port", "admin.host",
    "admin.port", "workers.host", "workers.base_port", "node.ordinal", "tls.enabled", "tls.port",
)
_POLL = 0.05


class OperationError(Exception):
    """An operation failed; the message says why and in what state it left the appliance."""

    status = 500


class BadRequest(OperationError):
    """The operation cannot be done as asked (bad count, bad config); nothing was changed."""

    status = 400


class Busy(OperationError):
    """Another operation holds the lock."""

    status = 409


@dataclass
class Result:
    """What an operation did."""

    operation: str
    workers: int = 0
    actions: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: The admin app must restart to use changed settings (the caller does it last).
    restart_admin: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for the admin API."""
        return dataclasses.asdict(self)


def prepare_run(settings: Settings, ctx: RenderContext, config_path: Path, as_root: bool) -> None:
    """What `run` sets up besides the rendered files: socket and pool directories, runtime state."""
    owner = None
    if as_root:
        entry = pwd.getpwnam(settings.user)
        owner = (entry.pw_uid, entry.pw_gid)
    pool.prepare(settings.run_dir, range(settings.workers.count), owner, settings.own_pools)
    count = settings.workers.count
    write_state(settings.run_dir, RuntimeState(
        config_path=str(config_path.resolve()), render_context=dataclasses.asdict(ctx),
        config_workers=count, workers=count, applied=redacted(settings),
    ))


def restart_only_changes(applied: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The RESTART_ONLY keys whose value differs between two `config.redacted` documents."""

    def get(doc: Mapping[str, Any], key: str) -> Any:
        for part in key.split("."):
            doc = doc.get(part, {}) if isinstance(doc, Mapping) else {}
        return doc

    return [key for key in RESTART_ONLY if get(applied, key) != get(new, key)]


def open_connections(pid: int, sock: Path) -> int | None:
    """Connections accepted on unix socket `sock` by process `pid` (None when it cannot be seen)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="unix")
    except psutil.Error:
        return None
    # The listening socket carries the path too.
    return max(0, sum(1 for c in conns if c.laddr == str(sock)) - 1)


class Operator:
    """Scale, reload and restart workers of the appliance that `settings` describe."""

    def __init__(self, settings: Settings, supervisor: SupervisorClient | None = None) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir
        self.supervisor = supervisor or SupervisorClient(socket_path(settings.run_dir))
        self.result = Result("none")

    # -- the operations ---------------------------------------------------------------

    def scale(self, count: int) -> Result:
        """Run `count` workers: start new ones and add them once ready, or drain and stop the last."""
        with self._span("scale", {"mcp_appliance.workers.requested": count}), self._operation("scale") as state:
            if not isinstance(count, int) or isinstance(count, bool):
                raise BadRequest(f"workers must be an integer, got {count!r}")
            self._require_applied(state)
            state = self._scale(self.settings, state, count)
            self.result.workers = state.workers
        return self.result

    def restart_worker(self, index: int) -> Result:
        """Drain, restart and probe one worker; its legacy sessions end (404, re-initialize)."""
        with self._span("restart", {"mcp_appliance.worker.index": index}), self._operation("restart") as state:
            if not 0 <= index < state.workers:
                raise BadRequest(f"no worker {index}: the appliance runs workers 0 to {state.workers - 1}")
            self._require_applied(state)
            state = self._roll(self.settings, state, [index], changed=())
            self.result.workers = state.workers
        return self.result

    def reload(self) -> Result:
        """Re-read appliance.toml and apply it: scale if workers.count changed, restart every worker
        one at a time (drained), reload nginx only if its configuration changed."""
        with self._span("reload", {}), self._operation("reload") as state:
            try:
                new = load_settings(Path(state.config_path))
            except ConfigError as exc:
                raise BadRequest(f"config: {exc}; nothing was changed") from None
            needs_restart = restart_only_changes(state.applied, redacted(new))
            if needs_restart:
                raise BadRequest(
                    f"{', '.join(needs_restart)} changed in {state.config_path}: that needs a restart "
                    "(systemctl restart mcp-appliance); nothing was changed"
                )
            # A live `scale` survives a reload unless appliance.toml's count itself changed.
            target = new.workers.count if new.workers.count != state.config_workers else state.workers
            live = with_workers(new, target)
            try:
                validate(live)
                files = render_all(live, self._context(state))
            except ConfigError as exc:
                raise BadRequest(f"config: {exc}; nothing was changed") from None
            nginx_conf = self.run_dir / "nginx.conf"
            nginx_changed = files["nginx.conf"] != _read(nginx_conf)
            if nginx_changed:
                self._check_nginx(files["nginx.conf"], state)

            before = state.workers
            if target != before:
                self._note(f"workers.count changed in appliance.toml: scaling {before} -> {target}")
                state = self._scale(new, state, target)
            _, changed, _ = self._sync_supervisord(live, state)
            state = self._roll(new, state, range(min(before, target)), changed)
            if "events" in changed:
                self.supervisor.stop("events")
                self.supervisor.remove_group("events")
                self.supervisor.add_group("events")
                self._note("event listener restarted with its new settings")
            for program in sorted({"nginx", "admin"} & set(changed)):
                self._note(f"warning: {program}'s program settings (e.g. log rotation) changed; "
                           "they apply at the next restart")
            # The pools of servers with a worker count, before nginx may use a new one.
            pool.limit_servers(self.run_dir, live.own_pools)
            if nginx_changed:
                write_files({"nginx.conf": files["nginx.conf"]}, self.run_dir)
                old = accepting_workers(self.run_dir / "nginx.pid")
                self.supervisor.signal("nginx", "HUP")
                self._wait_nginx_switched(old)
            self.result.restart_admin = "admin" in changed or redacted(new) != state.applied
            state = dataclasses.replace(state, config_workers=new.workers.count, applied=redacted(new))
            write_state(self.run_dir, state)
            self.settings = new
            self.result.workers = state.workers
        return self.result

    def _wait_nginx_switched(self, old: set[int]) -> None:
        """After a HUP: return once nginx's new worker processes take every new connection.

        nginx starts new workers with the new configuration and QUITs the old ones, which
        finish what they hold (an SSE stream may take long) but may still accept for a moment
        after the HUP: a client calling right after `reload` returned could meet the old routing.
        """
        deadline = time.monotonic() + NGINX_SWITCH_WAIT
        while time.monotonic() < deadline:
            accepting = accepting_workers(self.run_dir / "nginx.pid")
            if accepting and not accepting & old:
                self._note("nginx.conf changed: nginx reloaded gracefully (HUP); its new workers take every "
                           "new connection")
                return
            time.sleep(_POLL)
        self._note(f"warning: nginx.conf changed and nginx got HUP, but {NGINX_SWITCH_WAIT:g} s later its old "
                   "worker processes still accept connections; see nginx's log")

    def restart_admin(self) -> None:
        """Let supervisord restart the admin app (TERM; autorestart brings it back)."""
        self.supervisor.signal("admin", "TERM")

    @contextlib.contextmanager
    def _span(self, name: str, attributes: dict[str, Any]) -> Iterator[None]:
        """The operation as a span (tracing on; the API's no-op otherwise); a failure is its error status."""
        tracer = trace.get_tracer("mcp-appliance")
        with tracer.start_as_current_span(f"mcp_appliance.{name}", kind=trace.SpanKind.INTERNAL,
                                          attributes={"mcp_appliance.operation": name, **attributes}) as span:
            yield
            span.set_attributes({"mcp_appliance.workers": self.result.workers,
                                 "mcp_appliance.operation.seconds": self.result.seconds})

    # -- building blocks (the lock is held) ------------------------------------------

    @contextlib.contextmanager
    def _operation(self, name: str) -> Iterator[RuntimeState]:
        try:
            lock = os.open(self.run_dir / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OperationError(f"no running appliance in run_dir {self.run_dir}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy("another operation (scale, reload or restart) is running; try again when it is done") from None
            state = read_state(self.run_dir)
            if state is None:
                raise OperationError(f"no running appliance: {state_path(self.run_dir)} is missing "
                                     "(start it with `mcp-appliance run`)")
            self.result = Result(name, workers=state.workers)
            started = time.monotonic()
            try:
                yield state
            except SupervisorUnavailable as exc:
                raise OperationError(f"{exc} (is the appliance running?)") from None
            except xmlrpc.client.Fault as exc:
                raise OperationError(f"supervisord refused: {exc.faultString}") from None
            finally:
                self.result.seconds = round(time.monotonic() - started, 3)
            self._note(f"{name} done in {self.result.seconds:.1f}s: {self.result.workers} workers")
        finally:
            os.close(lock)

    def _require_applied(self, state: RuntimeState) -> None:
        """The settings at hand agree with the running appliance on ports, paths and user."""
        changed = restart_only_changes(state.applied, redacted(self.settings))
        if changed:
            raise BadRequest(f"{', '.join(changed)} in {state.config_path} differ from what the appliance runs with; "
                             "restart it to apply them (or undo the change) before scaling or restarting workers")

    def _note(self, message: str) -> None:
        logger.info(message)
        self.result.actions.append(message)

    def _context(self, state: RuntimeState) -> RenderContext:
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in state.render_context.items()}
        return RenderContext(**values)

    def _sync_supervisord(self, live: Settings, state: RuntimeState) -> tuple[list[str], list[str], list[str]]:
        """Write supervisord.conf for `live` and have supervisord read it (starts or stops nothing)."""
        files = render_all(live, self._context(state))
        write_files({name: files[name] for name in ("supervisord.conf", "supervisorctl.conf")}, self.run_dir)
        return self.supervisor.reload_config()

    def _check_nginx(self, text: str, state: RuntimeState) -> None:
        """Let nginx test a new nginx.conf before it replaces the running one."""
        candidate = self.run_dir / ".nginx.conf.check"
        candidate.write_text(text)
        try:
            test = subprocess.run(
                [self._context(state).nginx, "-t", "-q", "-c", str(candidate), "-p", f"{self.run_dir}/nginx/", "-e", "stderr"],
                capture_output=True, text=True, timeout=30,
            )
        finally:
            candidate.unlink(missing_ok=True)
        if test.returncode != 0:
            raise BadRequest(f"the new nginx.conf does not pass `nginx -t`: {test.stderr.strip()}; nothing was changed")

    def _scale(self, settings: Settings, state: RuntimeState, count: int) -> RuntimeState:
        before = state.workers
        if count == before:
            self._note(f"already {count} workers")
            return state
        live = with_workers(settings, count)
        try:
            validate(live)
        except ConfigError as exc:
            raise BadRequest(f"cannot run {count} workers: {exc}") from None
        if count > before:
            return self._scale_up(live, state, range(before, count))
        return self._scale_down(live, state, range(count, before))

    def _scale_up(self, live: Settings, state: RuntimeState, new: range) -> RuntimeState:
        for k in new:
            try:
                check_port_free(f"workers.base_port (worker {k})", live.workers.host, live.worker_port(k))
            except ConfigError as exc:
                raise BadRequest(f"cannot start worker {k}: {exc}") from None
        # The state first: a worker accepts only an index below the live count.
        grown = dataclasses.replace(state, workers=live.workers.count)
        write_state(self.run_dir, grown)
        added, _, _ = self._sync_supervisord(live, grown)
        for k in new:
            if worker_program(k) in added:
                self.supervisor.add_group(worker_program(k))  # autostart starts it
            else:
                self._start(k, replace_group=False)
        self._note(f"started workers {_names(new)}")
        try:
            self._wait_ready(new)
        except OperationError:
            self._stop(new)
            write_state(self.run_dir, state)
            self._remove_groups(new, self._sync_supervisord(with_workers(live, state.workers), state)[2])
            raise
        pool.assign(self.run_dir, range(live.workers.count))
        self._note(f"workers {_names(new)} ready and in nginx's pool")
        return grown

    def _scale_down(self, live: Settings, state: RuntimeState, gone: range) -> RuntimeState:
        pool.assign(self.run_dir, range(live.workers.count))
        self._note(f"workers {_names(gone)} out of nginx's pool, draining")
        self._drain(gone)
        self._stop(gone)
        shrunk = dataclasses.replace(state, workers=live.workers.count)
        write_state(self.run_dir, shrunk)
        self._remove_groups(gone, self._sync_supervisord(live, shrunk)[2])
        self._note(f"workers {_names(gone)} stopped and removed")
        return shrunk

    def _roll(self, settings: Settings, state: RuntimeState, indices: Iterable[int], changed: Iterable[str]) -> RuntimeState:
        """Restart `indices` one at a time, drained; `changed` groups get their new program settings."""
        indices, changed = list(indices), set(changed)
        if not indices:
            return state
        surge = state.workers == 1
        if surge:
            # Never leave the pool empty: a temporary second worker serves meanwhile.
            self._note("one worker: starting a temporary second worker while it restarts")
            state = self._scale(settings, state, 2)
        for k in indices:
            others = [j for j in range(state.workers) if j != k]
            pool.assign(self.run_dir, others)
            self._note(f"worker {k} out of nginx's pool, draining")
            self._drain([k])
            self._stop([k])
            self._start(k, replace_group=worker_program(k) in changed)
            try:
                self._wait_ready([k])
            except OperationError as exc:
                raise OperationError(f"{exc}; worker {k} stays out of nginx's pool, the others keep serving") from None
            pool.assign(self.run_dir, range(state.workers))
            self._note(f"worker {k} restarted and back in nginx's pool")
        if surge:
            state = self._scale(settings, state, 1)
        return state

    def _drain(self, indices: Iterable[int]) -> None:
        """Signal the workers to drain and wait until they hold no work (see the module docstring)."""
        pids: dict[int, int] = {}
        for k in indices:
            info = self._info(k)
            doc = self._probe(k)
            # Serving (its probe answers from that pid), even if still within startsecs: only
            # then is the SIGUSR1 handler installed (before that the signal would kill it).
            if info is not None and info.state in {"STARTING", "RUNNING"} and doc and doc.get("pid") == info.pid:
                with _unless(Faults.NOT_RUNNING):
                    self.supervisor.signal(worker_program(k), "USR1")
                    pids[k] = info.pid
        grace = pool.UPSTREAM_IDLE_TIMEOUT + 0.5
        deadline = time.monotonic() + self.settings.workers.graceful_timeout + grace
        quiet_since: dict[int, float] = {}
        pending = set(pids)
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            for k in sorted(pending):
                doc = self._probe(k)
                in_flight = int(doc.get("in_flight", 0)) if doc else 0
                counts = [open_connections(pids[k], sock) for sock in
                          (pool.worker_socket(self.run_dir, k), pool.session_socket(self.run_dir, k))]
                connections = None if None in counts else sum(c for c in counts if c is not None)
                if in_flight:
                    quiet_since.pop(k, None)
                elif connections == 0 or now - quiet_since.setdefault(k, now) >= grace:
                    pending.discard(k)
            time.sleep(_POLL)
        for k in sorted(pending):
            self._note(f"warning: worker {k} still busy after the drain timeout; stopping it anyway")

    def _stop(self, indices: Iterable[int]) -> None:
        for k in indices:
            with _unless(Faults.NOT_RUNNING, Faults.BAD_NAME):
                self.supervisor.stop(worker_program(k), wait=True)

    def _start(self, index: int, replace_group: bool) -> None:
        name = worker_program(index)
        if replace_group:  # its program settings changed: supervisord re-creates the group
            self.supervisor.remove_group(name)
            self.supervisor.add_group(name)
            return
        with _unless(Faults.ALREADY_STARTED):
            self.supervisor.start(name, wait=False)

    def _remove_groups(self, indices: Iterable[int], removed: list[str]) -> None:
        for k in indices:
            if worker_program(k) in removed:
                self.supervisor.remove_group(worker_program(k))

    def _info(self, index: int) -> ProcessInfo | None:
        try:
            return self.supervisor.process(worker_program(index))
        except xmlrpc.client.Fault as exc:
            if exc.faultCode == Faults.BAD_NAME:
                return None
            raise

    def _probe(self, index: int) -> dict[str, Any] | None:
        """The worker's probe document (also when it answers 503 draining), or None."""
        url = f"http://{self.settings.workers.host}:{self.settings.worker_port(index)}{PROBE_PATH}"
        try:
            response = httpx2.get(url, timeout=self.settings.health.probe_timeout, trust_env=False)
            doc = response.json()
        except (httpx2.HTTPError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _wait_ready(self, indices: Iterable[int], timeout: float = READY_TIMEOUT) -> None:
        """Until each worker's probe answers ok from the pid supervisord started."""
        pending = set(indices)
        deadline = time.monotonic() + timeout
        while pending:
            for k in sorted(pending):
                info = self._info(k)
                if info is not None and info.state == "FATAL":
                    raise OperationError(f"worker {k} does not start (supervisord: FATAL, {info.description}); "
                                         f"see {self.settings.log_dir}/{worker_program(k)}.log")
                doc = self._probe(k)
                if doc and doc.get("status") == "ok" and info is not None and doc.get("pid") == info.pid:
                    pending.discard(k)
            if pending and time.monotonic() > deadline:
                raise OperationError(f"workers {_names(pending)} did not answer their probe within {timeout:.0f}s; "
                                     f"see {self.settings.log_dir}/worker-NN.log")
            if pending:
                time.sleep(_POLL * 2)


@contextlib.contextmanager
def _unless(*codes: int) -> Iterator[None]:
    """Ignore supervisord faults with these codes (e.g. stopping what is not running)."""
    try:
        yield
    except xmlrpc.client.Fault as exc:
        if exc.faultCode not in codes:
            raise


def _names(indices: Iterable[int]) -> str:
    return ", ".join(str(k) for k in sorted(indices))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
