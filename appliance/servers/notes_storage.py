"""Where the notes live: one interface, two implementations, so the tools stay one code path.

`SqliteNotes` (the default, one host): ``notes.db`` under ``$MCP_APPLIANCE_DATA_DIR``, a
WAL-mode SQLite file shared by every worker, an FTS5 index kept in sync by triggers.
`PostgresNotes` (several hosts): a shared PostgreSQL database named by the URL in the file
``$MCP_APPLIANCE_NOTES_DATABASE_URL_FILE`` (setting notes.database_url_file), a tsvector
column with a GIN index for search; the schema is created at the first use, idempotently.
While PostgreSQL cannot be reached a call fails with "database unavailable" and the next
call reconnects, so service resumes by itself.

A write the storage refuses (a full or read-only disk, an I/O error; an unreachable
PostgreSQL) is answered with a tool error that says so, counted
(mcp_appliance_storage_errors_total{reason}) and reported as the worker's condition "storage"
(the worker's probe, then /health: degraded) until a call succeeds again; SQLite reads keep
working.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from appliance.conditions import PROCESS_CONDITIONS, Conditions
from appliance.metrics import storage_errors

logger = logging.getLogger("appliance.servers.notes")
T = TypeVar("T")

DATA_DIR_ENV = "MCP_APPLIANCE_DATA_DIR"
DEFAULT_DATA_DIR = Path("/var/lib/mcp-appliance")
DB_FILENAME = "notes.db"

MAX_TITLE = 200
MAX_BODY = 100_000
MAX_TAGS = 20
MAX_TAG_LEN = 64
MAX_SUMMARIZE = 500


class NoteError(ToolError, ValueError):
    """Bad input or unknown note.

    A ToolError because the SDK replaces the text of any other exception with a generic
    "Error executing tool <name>"; the ValueError base keeps `except ValueError` working.
    """


class Note(BaseModel):
    id: int
    title: str
    body: str
    tags: list[str]
    created_at: str = Field(description="ISO-8601 UTC timestamp")


class NoteSummary(BaseModel):
    id: int
    title: str
    tags: list[str]
    created_at: str


class SearchHit(BaseModel):
    id: int
    title: str
    snippet: str = Field(description="Matching excerpt; matched terms are wrapped in **")
    score: float = Field(description="bm25 relevance, higher is better")



_SCHEMA = (
    # AUTOINCREMENT so a deleted note's id (and its notes:// URI) is never reused.
    """CREATE TABLE IF NOT EXISTS notes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL)""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS notes_fts USING fts5(
        title, body, tags, content='notes', content_rowid='id',
        tokenize='unicode61 remove_diacritics 2')""",
    """CREATE TRIGGER IF NOT EXISTS notes_ai AFTER INSERT ON notes BEGIN
        INSERT INTO notes_fts(rowid, title, body, tags) VALUES (new.id, new.title, new.body, new.tags);
    END""",
    """CREATE TRIGGER IF NOT EXISTS notes_ad AFTER DELETE ON notes BEGIN
        INSERT INTO notes_fts(notes_fts, rowid, title, body, tags)
        VALUES ('delete', old.id, old.title, old.body, old.tags);
    END""",
    """CREATE TRIGGER IF NOT EXISTS notes_au AFTER UPDATE ON notes BEGIN
        INSERT INTO notes_fts(notes_fts, rowid, title, body, tags)
        VALUES ('delete', old.id, old.title, old.body, old.tags);
        INSERT INTO notes_fts(rowid, title, body, tags) VALUES (new.id, new.title, new.body, new.tags);
    END""",
)
_WORD = re.compile(r"[^\W_]")
# Column weights for bm25(): title, body, tags.
_RANK = "bm25(notes_fts, 10.0, 1.0, 5.0)"


def default_db_path() -> Path:
    """``$MCP_APPLIANCE_DATA_DIR/notes.db``, read at call time."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR) / DB_FILENAME


def fts_query(text: str) -> str:
    """Turn free text into a safe FTS5 query: each word a quoted term, OR-ed, ``word*`` kept as prefix."""
    terms = []
    for raw in text.split():
        if not _WORD.search(raw):
            continue
        star = "*" if raw.endswith("*") else ""
        terms.append('"' + raw.rstrip("*").replace('"', '""') + '"' + star)
    return " OR ".join(terms)


def _clean(title: str, body: str, tags: list[str]) -> tuple[str, str, list[str]]:
    title = title.strip()
    if not 1 <= len(title) <= MAX_TITLE:
        raise NoteError(f"title must be 1..{MAX_TITLE} characters (got {len(title)})")
    if len(body) > MAX_BODY:
        raise NoteError(f"body must be at most {MAX_BODY} characters (got {len(body)})")
    if len(tags) > MAX_TAGS:
        raise NoteError(f"at most {MAX_TAGS} tags allowed (got {len(tags)})")
    clean: list[str] = []
    for tag in tags:
        tag = tag.strip().lower()
        if not 1 <= len(tag) <= MAX_TAG_LEN:
            raise NoteError(f"each tag must be 1..{MAX_TAG_LEN} characters (got {tag!r})")
        if tag not in clean:
            clean.append(tag)
    return title, body, clean


def _note(row: sqlite3.Row) -> Note:
    return Note(id=row["id"], title=row["title"], body=row["body"], tags=json.loads(row["tags"]),
                created_at=row["created_at"])



@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: a deferred read->write upgrade can fail with
    # SQLITE_BUSY without consulting busy_timeout when another process writes first.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # SQLite rolls back by itself after some errors (a full disk at COMMIT): then there is nothing to undo.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


#: SQLite's primary result codes that mean the storage refused a write -> (label, what the caller reads).
STORAGE_FAILURES = {
    sqlite3.SQLITE_FULL: ("full", "storage full"),
    sqlite3.SQLITE_READONLY: ("read_only", "storage read-only"),
    sqlite3.SQLITE_IOERR: ("io_error", "storage I/O error"),
    sqlite3.SQLITE_CANTOPEN: ("cannot_open", "storage cannot be opened"),
}
#: The reason label of a PostgreSQL that cannot be reached.
DATABASE_UNAVAILABLE = "database_unavailable"


def storage_failure(exc: sqlite3.Error) -> tuple[str, str] | None:
    """(label, words) when `exc` means the disk refused a write, else None (a bug, a lock timeout …)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return STORAGE_FAILURES.get(code & 0xFF) if isinstance(code, int) else None


#: How long opening the database retries a lock that SQLite reports without waiting, in seconds.
BUSY_RETRY_SECONDS = 5.0


def _retry_busy(step: Callable[[], T], deadline: float = BUSY_RETRY_SECONDS) -> T:
    """`step()`, retried with a short backoff while SQLite answers SQLITE_BUSY, up to `deadline` seconds."""
    end = time.monotonic() + deadline
    pause = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if not isinstance(code, int) or code & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() + pause > end:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class SqliteNotes:
    """The embedded default for one host: one lazily opened SQLite connection per process, serialized by a lock."""

    def __init__(self, db_path_resolver: Callable[[], Path], conditions: Conditions = PROCESS_CONDITIONS) -> None:
        self._resolve = db_path_resolver
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._conditions = conditions
        self._errors = storage_errors()
        for label, _ in STORAGE_FAILURES.values():
            self._errors.labels(label)  # exported at 0: a series that appears at 1 hides the first failure

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; a write the storage refuses becomes a tool error that says so, counted."""
        try:
            with self._db() as db, _write(db):
                yield db
        except sqlite3.Error as exc:
            failure = storage_failure(exc)
            if failure is None:
                raise
            label, words = failure
            self._errors.labels(label).inc()
            path = self._resolve()
            self._conditions.set("storage", f"notes database {path} cannot be written: {words} ({exc}); "
                                 "reads still work")
            raise NoteError(f"{words}: the note was not saved, the notes database cannot be written ({exc}); "
                            "reading notes still works") from None
        self._conditions.clear("storage")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # A connection inherited across fork() must not be used (or closed) by the child.
            if self._conn is None or self._pid != os.getpid():
                self._conn, self._pid = self._open(), os.getpid()
            yield self._conn

    def _open(self) -> sqlite3.Connection:
        path = self._resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=5000")
            # Switching a new file to WAL needs a lock that SQLite does not wait for (the busy
            # handler is not consulted): when two workers open a new database at once, one gets
            # "database is locked" at once. Measured: 16 of 450 racing first opens failed.
            _retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            with _write(conn):  # serializes schema creation when several workers start at once
                for statement in _SCHEMA:
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def add(self, title: str, body: str, tags: list[str]) -> Note:
        title, body, tags = _clean(title, body, tags)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        with self._writing() as db:
            cur = db.execute("INSERT INTO notes (title, body, tags, created_at) VALUES (?, ?, ?, ?)",
                             (title, body, json.dumps(tags), created))
        return Note(id=cur.lastrowid or 0, title=title, body=body, tags=tags, created_at=created)

    def get(self, note_id: int) -> Note | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM notes WHERE id = ?", (note_id,)).fetchone()
        return _note(row) if row else None

    def delete(self, note_id: int) -> bool:
        with self._writing() as db:
            return db.execute("DELETE FROM notes WHERE id = ?", (note_id,)).rowcount > 0

    def search(self, query: str, limit: int) -> list[SearchHit]:
        match = fts_query(query)
        if not match:
            return []
        with self._db() as db:
            rows = db.execute(
                f"SELECT n.id, n.title, snippet(notes_fts, -1, '**', '**', '…', 16) AS snip, {_RANK} AS rank"
                " FROM notes_fts JOIN notes n ON n.id = notes_fts.rowid"
                " WHERE notes_fts MATCH ? ORDER BY rank LIMIT ?", (match, limit)).fetchall()
        return [SearchHit(id=r["id"], title=r["title"], snippet=r["snip"], score=-r["rank"])
                for r in rows]

    def summaries(self, tag: str | None, limit: int, offset: int) -> list[NoteSummary]:
        where, args = "", []
        if tag is not None:
            where, args = "WHERE EXISTS (SELECT 1 FROM json_each(notes.tags) WHERE value = ?)", [tag.strip().lower()]
        with self._db() as db:
            rows = db.execute(f"SELECT id, title, tags, created_at FROM notes {where}"
                              " ORDER BY id DESC LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [NoteSummary(id=r["id"], title=r["title"], tags=json.loads(r["tags"]), created_at=r["created_at"])
                for r in rows]

    def matching(self, query: str, cap: int) -> list[Note]:
        """Notes matching ``query`` (best first), or all notes (newest first) for an empty query; at most cap+1."""
        with self._db() as db:
            if not query.strip():
                rows = db.execute("SELECT * FROM notes ORDER BY id DESC LIMIT ?", (cap + 1,)).fetchall()
            elif match := fts_query(query):
                rows = db.execute(f"SELECT n.* FROM notes_fts JOIN notes n ON n.id = notes_fts.rowid"
                                  f" WHERE notes_fts MATCH ? ORDER BY {_RANK} LIMIT ?", (match, cap + 1)).fetchall()
            else:
                rows = []
        return [_note(r) for r in rows]


class NotesStorage(Protocol):
    """What the notes tools need from a store."""

    def add(self, title: str, body: str, tags: list[str]) -> Note: ...

    def get(self, note_id: int) -> Note | None: ...

    def delete(self, note_id: int) -> bool: ...

    def search(self, query: str, limit: int) -> list[SearchHit]: ...

    def summaries(self, tag: str | None, limit: int, offset: int) -> list[NoteSummary]: ...

    def matching(self, query: str, cap: int) -> list[Note]:
        """Notes matching ``query`` (best first), or all notes (newest first) for an empty query; at most cap+1."""
        ...


#: The hosted-app contract for the database (the env form of setting notes.database_url_file).
DATABASE_URL_FILE_ENV = "MCP_APPLIANCE_NOTES_DATABASE_URL_FILE"
#: Seconds to wait for PostgreSQL to accept a connection before a call (or `check`) gives up.
CONNECT_TIMEOUT = 3
UNAVAILABLE = "database unavailable"

# Run at each connect, in one transaction: idempotent, and serialized across workers and hosts.
_PG_SCHEMA = (
    # Several workers on several hosts start at once: one creates, the others wait.
    "SELECT pg_advisory_xact_lock(7386193)",
    # An identity column never reuses a deleted note's id (and its notes:// URI).
    """CREATE TABLE IF NOT EXISTS notes (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        -- 'simple': no stemming, as SQLite's unicode61 tokenizer; weights as the bm25 weights there.
        search tsvector GENERATED ALWAYS AS (
            setweight(to_tsvector('simple'::regconfig, title), 'A') ||
            setweight(to_tsvector('simple'::regconfig, tags), 'B') ||
            setweight(to_tsvector('simple'::regconfig, body), 'D')) STORED)""",
    "CREATE INDEX IF NOT EXISTS notes_search ON notes USING GIN (search)",
)
_PG_WEIGHTS = "'{0.1, 0.2, 0.5, 1.0}'"  # D, C, B, A: title 10×, tags 5× the body, as in SQLite
_HEADLINE = "'StartSel=**, StopSel=**, MaxWords=16, MinWords=6, MaxFragments=1, FragmentDelimiter=…'"


def ts_query(text: str) -> str:
    """Free text as a safe tsquery: each word a quoted lexeme, OR-ed, ``word*`` kept as a prefix."""
    terms = []
    for raw in text.split():
        if not _WORD.search(raw):
            continue
        prefix = ":*" if raw.endswith("*") else ""
        word = raw.rstrip("*").replace("\\", "\\\\").replace("'", "''")
        terms.append(f"'{word}'{prefix}")
    return " | ".join(terms)


def read_database_url(path: Path) -> str:
    """The URL in the secret file `path` (first non-empty line); OSError/ValueError when unreadable or empty."""
    for line in path.read_text().splitlines():
        if line.strip():
            return line.strip()
    raise ValueError("the file is empty")


def _pg_note(row: dict[str, Any]) -> Note:
    return Note(id=row["id"], title=row["title"], body=row["body"], tags=json.loads(row["tags"]),
                created_at=row["created_at"])


class PostgresNotes:
    """A shared PostgreSQL database: one connection per process, serialized by a lock, reopened when lost."""

    def __init__(self, url_file: Path, conditions: Conditions = PROCESS_CONDITIONS) -> None:
        self._url_file = url_file
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        self._conditions = conditions
        self._errors = storage_errors()
        self._errors.labels(DATABASE_UNAVAILABLE)  # exported at 0

    def _open(self) -> Any:
        # psycopg is imported where used: a SQLite-only appliance never loads libpq.
        import psycopg
        from psycopg.rows import dict_row

        conn = psycopg.connect(read_database_url(self._url_file), autocommit=True, row_factory=dict_row,
                               connect_timeout=CONNECT_TIMEOUT, application_name="mcp-appliance notes")
        try:
            with conn.transaction():
                for statement in _PG_SCHEMA:
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, op: Callable[[Any], T], write: bool = False) -> T:
        """`op(connection)`; a database that cannot be reached becomes the tool error "database unavailable".

        A connection the server dropped since its last use (a PostgreSQL restart) is found out
        only by using it: then the call is tried once more on a new one, a read always, a write
        only when its transaction had not begun, so a note is never saved twice.
        """
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                fresh = False
                began: list[bool] = []
                try:
                    # A connection inherited across fork() must not be used by the child.
                    if self._conn is None or self._conn.closed or self._pid != os.getpid():
                        fresh = True
                        try:
                            self._conn, self._pid = self._open(), os.getpid()
                        except (psycopg.Error, ValueError) as exc:  # also a URL file gone bad since `check`
                            raise psycopg.OperationalError(str(exc)) from exc
                    if not write:
                        result = op(self._conn)
                    else:
                        with self._conn.transaction():
                            began.append(True)
                            result = op(self._conn)
                    self._conditions.clear("storage")
                    return result
                except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                    self._drop()
                    if attempt == 1 and not fresh and not began:
                        continue
                    # Only what psycopg says failed: the URL (and its password) is never in a message.
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    logger.warning("notes database unavailable: %s", first)
                    self._errors.labels(DATABASE_UNAVAILABLE).inc()
                    self._conditions.set("storage", f"notes database (PostgreSQL) cannot be reached: {first}")
                    raise NoteError(f"{UNAVAILABLE}: the notes database cannot be reached; try again shortly") from None
        raise AssertionError("not reached")

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
        self._conn = None

    def add(self, title: str, body: str, tags: list[str]) -> Note:
        title, body, tags = _clean(title, body, tags)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        row = self._run(lambda db: db.execute(
            "INSERT INTO notes (title, body, tags, created_at) VALUES (%s, %s, %s, %s) RETURNING id",
            (title, body, json.dumps(tags), created)).fetchone(), write=True)
        return Note(id=row["id"], title=title, body=body, tags=tags, created_at=created)

    def get(self, note_id: int) -> Note | None:
        row = self._run(lambda db: db.execute(
            "SELECT id, title, body, tags, created_at FROM notes WHERE id = %s", (note_id,)).fetchone())
        return _pg_note(row) if row else None

    def delete(self, note_id: int) -> bool:
        return self._run(lambda db: bool(db.execute("DELETE FROM notes WHERE id = %s", (note_id,)).rowcount),
                         write=True)

    def search(self, query: str, limit: int) -> list[SearchHit]:
        match = ts_query(query)
        if not match:
            return []
        rows = self._run(lambda db: db.execute(
            f"SELECT id, title, ts_headline('simple', title || ' ' || body, q, {_HEADLINE}) AS snip,"
            f" ts_rank({_PG_WEIGHTS}, search, q) AS score"
            " FROM notes, to_tsquery('simple', %s) AS q WHERE search @@ q"
            " ORDER BY score DESC, id DESC LIMIT %s", (match, limit)).fetchall())
        return [SearchHit(id=r["id"], title=r["title"], snippet=r["snip"], score=float(r["score"])) for r in rows]

    def summaries(self, tag: str | None, limit: int, offset: int) -> list[NoteSummary]:
        where, args = "", []
        if tag is not None:
            where, args = "WHERE tags::jsonb ? %s", [tag.strip().lower()]
        rows = self._run(lambda db: db.execute(f"SELECT id, title, tags, created_at FROM notes {where}"
                                               " ORDER BY id DESC LIMIT %s OFFSET %s", (*args, limit, offset)).fetchall())
        return [NoteSummary(id=r["id"], title=r["title"], tags=json.loads(r["tags"]), created_at=r["created_at"])
                for r in rows]

    def matching(self, query: str, cap: int) -> list[Note]:
        columns = "id, title, body, tags, created_at"
        if not query.strip():
            rows = self._run(lambda db: db.execute(
                f"SELECT {columns} FROM notes ORDER BY id DESC LIMIT %s", (cap + 1,)).fetchall())
        elif match := ts_query(query):
            rows = self._run(lambda db: db.execute(
                f"SELECT {columns} FROM notes, to_tsquery('simple', %s) AS q WHERE search @@ q"
                f" ORDER BY ts_rank({_PG_WEIGHTS}, search, q) DESC, id DESC LIMIT %s", (match, cap + 1)).fetchall())
        else:
            rows = []
        return [_pg_note(r) for r in rows]


def open_storage(db_path_resolver: Callable[[], Path] | None = None) -> NotesStorage:
    """PostgreSQL when the hosted-app contract names a URL file, else SQLite under the data directory."""
    url_file = os.environ.get(DATABASE_URL_FILE_ENV, "")
    if url_file and db_path_resolver is None:
        return PostgresNotes(Path(url_file))
    return SqliteNotes(db_path_resolver or default_db_path)
