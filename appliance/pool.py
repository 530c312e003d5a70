"""nginx's worker pool, changed without reloading nginx: slots that are symlinks to worker sockets.

Every worker also listens on a unix socket `<run_dir>/workers/worker-KK.sock`. nginx's
`mcp_pool` upstream lists a fixed set of SLOTS unix sockets `<run_dir>/pool/slot-JJ.sock`,
each a symlink to the socket of a serving worker. nginx resolves the path at every new
upstream connection, so re-pointing a slot (an atomic rename) moves new connections to
another worker at once: scaling, draining and restarting a worker never reload nginx.

Why not reload nginx: a graceful reload closes every idle client keep-alive connection,
and a request that a client sends on such a connection at that instant is reset. For a
POST nobody can tell whether it ran (nginx/nginx#437). Re-pointing a symlink has no such
window.

Two parties decide who serves, and this module is the one place that combines them:
operations (scale, restart, reload: appliance/operations.py) say which workers SHOULD
serve (`assign`); the watchdog (appliance/watchdog.py) says which of them do not answer
(`set_unresponsive`). The slots point at the first minus the second, or at the first alone
when none of them answers (an empty pool helps nobody). Both sides write under one lock
file and keep their halves in `<run_dir>/pool/state.json`, so neither undoes the other.

A server hosted by some workers only ([servers.<name>] workers = K) has a pool of its own,
`<run_dir>/pool/<name>/slot-JJ.sock`: the same choice, among workers 0 to K-1.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Servers in nginx's pool. More slots than workers spread the load evenly over any worker
#: count up to 64 (the most `workers.count` allows): worker shares differ by at most one slot.
SLOTS = 64
#: Session routing entries nginx knows: every worker index `workers.count` may reach.
MAX_WORKERS = 64
#: Seconds nginx keeps an idle connection to a worker. A draining worker never closes an idle
#: connection itself (nginx could be sending a request on it that instant); it waits this
#: long for nginx to close them.
UPSTREAM_IDLE_TIMEOUT = 2
#: Requests nginx sends over one pooled connection before it opens a new one. A connection
#: stays with the worker it was opened to, even after its slot was re-pointed: renewing them
#: lets a worker that joined (scale, restart) take its share within seconds under load (idle
#: ones go after UPSTREAM_IDLE_TIMEOUT anyway), for one new connection per 100 requests.
POOL_CONNECTION_REQUESTS = 100


def workers_dir(run_dir: Path) -> Path:
    """Where the workers' unix sockets live."""
    return run_dir / "workers"


def pool_dir(run_dir: Path) -> Path:
    """Where the slot symlinks live."""
    return run_dir / "pool"


def worker_socket(run_dir: Path, index: int) -> Path:
    """The unix socket worker `index` listens on (besides its loopback TCP port)."""
    return workers_dir(run_dir) / f"worker-{index:02d}.sock"


def session_socket(run_dir: Path, index: int) -> Path:
    """The unix socket nginx sends worker `index`'s legacy sessions to.

    A socket of their own, apart from the pool's: the watchdog ends what a hung worker holds
    on its pool socket at once (appliance/sockets.py), but a session's requests must wait for
    their owner (it may answer again) until it is declared gone (restarted): then 404.
    """
    return workers_dir(run_dir) / f"session-{index:02d}.sock"


def slot_path(run_dir: Path, slot: int, server: str = "") -> Path:
    """The path nginx connects to for pool slot `slot` (of the pool of `server`, one with a worker count)."""
    return (pool_dir(run_dir) / server if server else pool_dir(run_dir)) / f"slot-{slot:02d}.sock"


def spread(workers: Sequence[int]) -> list[int]:
    """Which worker each slot points to: round-robin over `workers` (sorted)."""
    if not workers:
        raise ValueError("a pool needs at least one worker")
    ordered = sorted(set(workers))
    return [ordered[j % len(ordered)] for j in range(SLOTS)]


STATE_FILE = "state.json"
LOCK_FILE = "pool.lock"


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The pool's state under its lock; what the block leaves in it is written back and applied."""
    directory = pool_dir(run_dir)
    fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        state = read_state(run_dir)
        yield state
        tmp = directory / f".{STATE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state, sort_keys=True) + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, directory / STATE_FILE)
        serving, unresponsive = state["serving"], set(state["unresponsive"])
        answering = [k for k in serving if k not in unresponsive]
        _point(run_dir, answering or serving)
        for server, count in state["servers"].items():
            # Its own workers that serve and answer; else those that serve; else all of its own (each
            # restarting: nginx's tries fail, and the client gets 503, safe to retry).
            _point(run_dir, [k for k in answering if k < count] or [k for k in serving if k < count]
                   or range(count), server)
    finally:
        os.close(fd)


def read_state(run_dir: Path) -> dict[str, Any]:
    """{"serving": what operations want in the pool, "unresponsive": what the watchdog took out,
    "servers": {name: worker count} of the servers with pools of their own}."""
    try:
        data = json.loads((pool_dir(run_dir) / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        data = {}
    return {"serving": sorted(data.get("serving", [])), "unresponsive": sorted(data.get("unresponsive", [])),
            "servers": dict(data.get("servers", {}))}


def assign(run_dir: Path, workers: Iterable[int]) -> None:
    """The workers that should serve (operations): the slots point at those that also answer."""
    chosen = sorted(set(workers))
    spread(chosen)  # refuse an empty pool before anything changes
    with _locked(run_dir) as state:
        state["serving"] = chosen


def limit_servers(run_dir: Path, counts: Mapping[str, int], owner: tuple[int, int] | None = None) -> None:
    """The servers hosted by their first `count` workers only ({name: count}): each gets its pool's slots."""
    for server in counts:
        directory = pool_dir(run_dir) / server
        directory.mkdir(exist_ok=True)
        if owner:
            os.chown(directory, *owner)
    with _locked(run_dir) as state:
        state["servers"] = dict(sorted(counts.items()))


def set_unresponsive(run_dir: Path, workers: Iterable[int]) -> None:
    """The workers that do not answer their probe (the watchdog): out of the slots until they do."""
    with _locked(run_dir) as state:
        state["unresponsive"] = sorted(set(workers))


def _point(run_dir: Path, workers: Iterable[int], server: str = "") -> None:
    """Point the slots (of `server`'s pool) at `workers`; each slot changes atomically (new connections only)."""
    directory = slot_path(run_dir, 0, server).parent
    for slot, worker in enumerate(spread(list(workers))):
        target = os.path.relpath(worker_socket(run_dir, worker), directory)
        link = slot_path(run_dir, slot, server)
        try:
            if os.readlink(link) == target:
                continue
        except OSError:
            pass  # missing (first start) or not a link: replace it
        tmp = directory / f".slot-{slot:02d}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)


def members(run_dir: Path) -> set[int]:
    """The workers that slots point to now."""
    found = set()
    for slot in range(SLOTS):
        try:
            name = Path(os.readlink(slot_path(run_dir, slot))).name
        except OSError:
            continue
        if name.startswith("worker-") and name.endswith(".sock"):
            found.add(int(name[len("worker-") : -len(".sock")]))
    return found


def prepare(run_dir: Path, workers: Iterable[int], owner: tuple[int, int] | None = None,
            servers: Mapping[str, int] | None = None) -> None:
    """Create the socket and slot directories (owned by `owner` uid/gid) and point the slots
    (`servers`: those with pools of their own, see `limit_servers`)."""
    for directory in (workers_dir(run_dir), pool_dir(run_dir)):
        directory.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(directory, *owner)
    # A new start forgets what the last run's watchdog found (run_dir is normally fresh anyway).
    (pool_dir(run_dir) / STATE_FILE).unlink(missing_ok=True)
    assign(run_dir, workers)
    limit_servers(run_dir, servers or {}, owner)
