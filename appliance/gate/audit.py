"""The audit trail: one JSON line per MCP request and per admin action, nothing lost.

Every process writes its own file (<log_dir>/audit/worker-00.jsonl, admin.jsonl, …),
so lines never interleave. A record is one `write()` on an O_APPEND descriptor made
before the answer leaves the process: once a client has its answer, the record is in
the kernel, and a crash (even kill -9) of the process cannot lose it. fsync policy
decides when it also survives a crash of the machine. The writer rotates its own file
(rename, then open a new one), so rotation never drops or splits a line.

A full or read-only disk must not let a call run unaudited (audit.on_error = "refuse"),
yet the record is written only once the call is answered. So the writer keeps space
allocated ahead of its file's end (fallocate with KEEP_SIZE: one syscall per RESERVE/2
bytes written, none per record) and fails as soon as it cannot renew that space, while
the calls already running still have room for their records. A failed writer refuses new
calls (AuditGuard) and retries on each one (reopen, renew the space), so it recovers by
itself once the disk has room again. Every failure is counted and named in /health.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.conditions import Conditions
from appliance.config import DEFAULT_SERVER, AuditSettings, Settings
from appliance.gate.exchange import Exchange
from appliance.gate.responses import INTERNAL_ERROR, send_jsonrpc_error
from appliance.metrics import audit_write_errors

logger = logging.getLogger("appliance.audit")


def audit_dir(log_dir: Path) -> Path:
    """Where every process keeps its audit file."""
    return log_dir / "audit"


# One encoder each, made once: json.dumps with options builds a new encoder per call.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_line = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def arguments_digest(arguments: Any) -> str:
    """sha256 of the canonical JSON of a call's arguments (sorted keys, no spaces, UTF-8)."""
    return "sha256:" + hashlib.sha256(_canonical(arguments).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Clock:
    """_now() for records written many times a second: the date and time to the second is made once a second.

    Same text as _now() (milliseconds truncated, UTC, "Z"); in a worker under load _now() is
    one of the largest parts of a record's cost.
    """

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((now - second) * 1000):03d}Z"


#: A JSON string (non-ASCII kept, as _line writes it); json's own C function.
_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _text(value: str | None) -> str:
    """A string or null, as JSON."""
    return "null" if value is None else _string(value)


#: Bytes the writer keeps allocated beyond its file's end; renewed when less than half is left,
#: so the calls running when the disk fills have at least RESERVE/2 bytes for their records.
RESERVE = 64 * 1024
_FALLOC_FL_KEEP_SIZE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def reserve_space(fd: int, offset: int, length: int) -> None:
    """Allocate `length` bytes from `offset` without changing the file's size (OSError when the disk cannot)."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class AuditWriter:
    """Appends records to one file this process alone writes."""

    def __init__(self, path: Path, settings: AuditSettings, *, on_failure: Callable[[], None] | None = None,
                 conditions: Conditions | None = None, refuse: bool = False) -> None:
        self.path = path
        self.fsync = settings.fsync
        self.interval = settings.fsync_interval
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.on_failure = on_failure
        self.conditions = conditions
        self.refuse = refuse
        self.errors = 0
        #: Why records cannot be written (None: they can); set by a failed write or space renewal.
        self.failure: str | None = None
        self.dirty = False
        self._syncing = False
        #: False on a filesystem without fallocate: a failed write is then the first sign.
        self._reserving = True
        self.fd: int | None = None
        self.size = self.reserved_to = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
            self._reserve()
        except OSError as exc:  # a read-only or full disk at start: the worker serves (or refuses) anyway
            self._failed(exc)

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.size = self.reserved_to = os.fstat(self.fd).st_size

    def _reserve(self) -> None:
        """Renew the space ahead of the file's end; OSError when the disk has none."""
        if not self._reserving or self.fd is None:
            return
        try:
            reserve_space(self.fd, self.size, RESERVE)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._reserving = False
            logger.warning("audit trail %s: the filesystem cannot reserve space (%s); with a full disk, a call may "
                           "run whose record then fails", self.path, exc.strerror)
            return
        self.reserved_to = self.size + RESERVE

    def _failed(self, exc: OSError) -> None:
        """Count the failure; the first one of a run puts the writer (and /health) in the failed state."""
        self.errors += 1
        if self.on_failure is not None:
            self.on_failure()
        consequence = "calls are refused (503)" if self.refuse else "calls are served unaudited"
        if self.failure is None:
            logger.error("audit trail %s cannot be written: %s; %s until it can (audit.on_error)", self.path,
                         exc.strerror or exc, consequence)
        self.failure = exc.strerror or str(exc)
        if self.conditions is not None:
            self.conditions.set("audit", f"audit trail {self.path} cannot be written ({self.failure}): "
                                f"{consequence} until records can be written again; "
                                "free space or fix permissions under <log_dir>/audit/")

    def _recovered(self) -> None:
        logger.warning("audit trail %s can be written again", self.path)
        self.failure = None
        if self.conditions is not None:
            self.conditions.clear("audit")

    def ready(self) -> bool:
        """Whether the next call's record has room; once failed, each call retries (reopen, renew the space).

        The healthy path reads one attribute: no syscall per call.
        """
        if self.failure is None:
            return True
        try:
            if self.fd is None:
                self._open()
            elif not self._reserving:
                return False  # no reservation here: the next write that succeeds recovers
            self._reserve()
        except OSError as exc:
            self._failed(exc)
            return False
        self._recovered()
        return True

    def write(self, record: dict[str, Any]) -> None:
        """Append one record now (before the answer it describes is sent)."""
        self.append(_line(record), record)

    def append(self, line: str, record: Any = None) -> None:
        """Append one record already made JSON (one line, no newline); `record` goes with an error's log."""
        # A lone surrogate (JSON allows "\ud800" in a tool name) is written as that same escape: the
        # line stays valid JSON with the same value, and the record is never lost to an encoding error.
        data = (line + "\n").encode("utf-8", "backslashreplace")
        try:
            if self.fd is None:
                self._open()
            assert self.fd is not None
            if self.size + len(data) > self.max_bytes and self.size > 0:
                self._rotate()
            view = memoryview(data)
            while view:  # a regular file takes it in one write; loop for the exotic case
                view = view[os.write(self.fd, view):]
            self.size += len(data)
        except OSError as exc:
            self._failed(exc)
            logger.error("audit record not written to %s: %s", self.path, exc, extra={"audit_record": record or line})
            return
        try:
            if self.size > self.reserved_to - RESERVE // 2:
                self._reserve()  # written, but the next calls would have no room: refuse them
        except OSError as exc:
            self._failed(exc)
        else:
            if self.failure is not None and (not self._reserving or self.size <= self.reserved_to - RESERVE // 2):
                self._recovered()
        if self.fsync == "every":
            os.fdatasync(self.fd)
        elif self.fsync == "interval":
            self.dirty = True
            self._schedule_sync()

    def _schedule_sync(self) -> None:
        if self._syncing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            os.fdatasync(self.fd)  # no event loop (a CLI): sync now
            self.dirty = False
            return
        self._syncing = True
        loop.call_later(self.interval, lambda: loop.create_task(self._sync()))

    async def _sync(self) -> None:
        """fdatasync in a thread, so the event loop never waits for the disk."""
        try:
            self.dirty = False
            if self.fd is None:  # closed, or never opened: nothing to sync
                return
            fd = os.dup(self.fd)  # survives a rotation that closes self.fd meanwhile
            try:
                await asyncio.to_thread(os.fdatasync, fd)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.error("audit fsync of %s failed: %s", self.path, exc)
        finally:
            self._syncing = False
            if self.dirty:
                self._schedule_sync()

    def _rotate(self) -> None:
        assert self.fd is not None
        os.fdatasync(self.fd)
        os.ftruncate(self.fd, self.size)  # give back the space reserved beyond the end
        os.close(self.fd)
        self.fd = None
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def close(self) -> None:
        if self.fd is None:
            return
        os.fdatasync(self.fd)
        os.ftruncate(self.fd, self.size)
        os.close(self.fd)
        self.fd = None


class AuditRecorder:
    """Turns a finished request's Exchange into its audit line."""

    def __init__(self, writer: AuditWriter, worker: int, raw_arguments: bool, server: str = DEFAULT_SERVER) -> None:
        self.writer = writer
        self.worker = worker
        self.raw_arguments = raw_arguments
        #: The hosted server the requests went to (its [servers.<name>] name; "default" for [mcp]).
        self.server = server
        self._clock = _Clock()
        # What every line of this worker and server has in the same place.
        self._fixed = f',"worker":{worker},"server":{_string(server)},'

    def __call__(self, ex: Exchange, duration: float) -> None:
        # One f-string, not a dict through json's encoder: this runs before every answer leaves, and
        # in a worker under load the dict-and-encode version cost several times its timeit figure.
        # The members are those the dict had (tests/unit/test_audit_writer.py compares the two).
        rpc = ex.rpc
        principal = ex.principal.name if ex.principal else None
        if rpc is None:
            method = name = "null"
            rpc_id = "null"
        else:
            method, name = _text(rpc.method), _text(rpc.name)
            rpc_id = str(rpc.id) if type(rpc.id) is int else _line(rpc.id)
        line = (f'{{"time":"{self._clock()}","type":"mcp","request_id":{_string(ex.request_id)}{self._fixed}'
                f'"principal":{_text(principal)},"client":{_text(ex.client)},"session":{_text(ex.session)},'
                f'"protocol_version":{_text(ex.protocol_version)},"http_method":{_string(ex.http_method)},'
                f'"method":{method},"jsonrpc_id":{rpc_id},"name":{name},"outcome":"{ex.outcome}",'
                f'"status":{ex.status},"duration_ms":{round(duration * 1000, 3)!r}')
        extra: dict[str, Any] = {}
        if rpc is not None:
            if rpc.batch:
                extra["batch"] = [{"method": c.method, "name": c.name, "jsonrpc_id": c.id} for c in rpc.batch]
            if rpc.kind is not None:
                line += f',"kind":{_string(rpc.kind)}'
            if rpc.has_arguments:
                try:
                    line += f',"arguments_sha256":"{arguments_digest(rpc.arguments)}"'
                except ValueError:  # NaN or the like: not canonical JSON
                    line += ',"arguments_sha256":null'
                if self.raw_arguments:
                    extra["arguments"] = rpc.arguments
        if ex.denied:
            extra["reason"] = ex.denied
        if ex.violation:
            extra["violation"] = ex.violation
        if ex.trace_id is not None:
            extra["trace_id"] = ex.trace_id
        if extra:
            line += "," + _line(extra)[1:]
        else:
            line += "}"
        self.writer.append(line)


class AuditGuard:
    """audit.on_error = "refuse": a call whose audit record has no room is answered 503 and never run."""

    def __init__(self, app: ASGIApp, writer: AuditWriter) -> None:
        self.app = app
        self.writer = writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.writer.ready():
            await send_jsonrpc_error(
                send, 503, f"The audit trail cannot be written ({self.writer.failure}): the call was refused and "
                "not run (audit.on_error = refuse); retry later", code=INTERNAL_ERROR, headers=[(b"retry-after", b"1")])
            return
        await self.app(scope, receive, send)


class AdminAudit:
    """One audit line per admin action (/admin/*), written before the answer goes out."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._writer: AuditWriter | None = None

    @property
    def writer(self) -> AuditWriter:
        """Opened on the first admin action (building the app opens no file)."""
        if self._writer is None:
            self._writer = AuditWriter(audit_dir(self.settings.log_dir) / "admin.jsonl", self.settings.audit,
                                       on_failure=audit_write_errors().inc)
        return self._writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or not self.settings.audit.enabled
                or not (path.startswith("/admin/") or path == "/admin")):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        headers = dict(scope["headers"])
        written = False
        status = 0

        def record() -> None:
            nonlocal written
            written = True
            principal = state.get("admin_principal")
            self.writer.write({
                "time": _now(),
                "type": "admin",
                "request_id": headers.get(b"x-request-id", b"-").decode("latin-1")[:128],
                "principal": principal,
                "client": headers.get(b"x-real-ip", b"").decode("latin-1") or (scope.get("client") or ("",))[0],
                "action": f"{scope['method']} {path}",
                "query": scope.get("query_string", b"").decode("latin-1")[:512] or None,
                "outcome": "denied" if principal is None else "ok" if 200 <= status < 400 else "error",
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            })

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") and not written:
                record()
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            if not written:
                status = status or 500
                record()
