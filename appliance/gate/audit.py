"""The audit trail: one JSON line per MCP request and per admin action, nothing lost.

Every process writes its own file (<log_dir>/audit/worker-00.jsonl, admin.jsonl, …),
so lines never interleave. A record is one `write()` on an O_APPEND descriptor made
before the answer leaves the process: once a client has its answer, the record is in
the kernel, and a crash (even kill -9) of the process cannot lose it. fsync policy
decides when it also survives a crash of the machine. The writer rotates its own file
(rename, then open a new one), so rotation never drops or splits a line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.config import AuditSettings, Settings
from appliance.gate.exchange import Exchange

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


class AuditWriter:
    """Appends records to one file this process alone writes."""

    def __init__(self, path: Path, settings: AuditSettings) -> None:
        self.path = path
        self.fsync = settings.fsync
        self.interval = settings.fsync_interval
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.errors = 0
        self.dirty = False
        self._syncing = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self.fd).st_size

    def write(self, record: dict[str, Any]) -> None:
        """Append one record now (before the answer it describes is sent)."""
        data = (_line(record) + "\n").encode()
        try:
            if self.size + len(data) > self.max_bytes and self.size > 0:
                self._rotate()
            view = memoryview(data)
            while view:  # a regular file takes it in one write; loop for the exotic case
                view = view[os.write(self.fd, view):]
            self.size += len(data)
        except OSError as exc:
            self.errors += 1
            logger.error("audit record not written to %s: %s", self.path, exc, extra={"audit_record": record})
            return
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
        os.fdatasync(self.fd)
        os.close(self.fd)
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def close(self) -> None:
        os.fdatasync(self.fd)
        os.close(self.fd)


class AuditRecorder:
    """Turns a finished request's Exchange into its audit line."""

    def __init__(self, writer: AuditWriter, worker: int, raw_arguments: bool) -> None:
        self.writer = writer
        self.worker = worker
        self.raw_arguments = raw_arguments

    def __call__(self, ex: Exchange, duration: float) -> None:
        rpc = ex.rpc
        record: dict[str, Any] = {
            "time": _now(),
            "type": "mcp",
            "request_id": ex.request_id,
            "worker": self.worker,
            "principal": ex.principal.name if ex.principal else None,
            "client": ex.client,
            "session": ex.session,
            "protocol_version": ex.protocol_version,
            "http_method": ex.http_method,
            "method": rpc.method if rpc else None,
            "jsonrpc_id": rpc.id if rpc else None,
            "name": rpc.name if rpc else None,
            "outcome": ex.outcome,
            "status": ex.status,
            "duration_ms": round(duration * 1000, 3),
        }
        if rpc is not None and rpc.batch:
            record["batch"] = [{"method": c.method, "name": c.name, "jsonrpc_id": c.id} for c in rpc.batch]
        if rpc is not None and rpc.kind is not None:
            record["kind"] = rpc.kind
        if rpc is not None and rpc.has_arguments:
            try:
                record["arguments_sha256"] = arguments_digest(rpc.arguments)
            except ValueError:  # NaN or the like: not canonical JSON
                record["arguments_sha256"] = None
            if self.raw_arguments:
                record["arguments"] = rpc.arguments
        if ex.denied:
            record["reason"] = ex.denied
        if ex.violation:
            record["violation"] = ex.violation
        self.writer.write(record)


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
            self._writer = AuditWriter(audit_dir(self.settings.log_dir) / "admin.jsonl", self.settings.audit)
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
