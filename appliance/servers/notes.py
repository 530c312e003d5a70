"""Notes: the appliance's built-in default hosted MCP server, a notes knowledge base for agents.

Hosted-app contract: the data directory is ``$MCP_APPLIANCE_DATA_DIR`` (read on first use,
default ``/var/lib/mcp-appliance``); notes live in ``notes.db`` there, a WAL-mode SQLite file
shared by every worker process, with an FTS5 index kept in sync by triggers.

A write the disk refuses (full, read-only, I/O error) is answered with a tool error that
says so, counted (mcp_appliance_storage_errors_total{reason}) and reported as the worker's
condition "storage" (the worker's probe, then /health: degraded) until a write succeeds
again; reads keep working.
"""

import json
import os
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypedDict

import anyio.to_thread
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve, Sample
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp_types import CreateMessageResult, SamplingMessage, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from appliance.conditions import PROCESS_CONDITIONS, Conditions
from appliance.metrics import storage_errors

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


class TagCount(BaseModel):
    tag: str
    count: int


class NotesSummary(BaseModel):
    query: str
    matched: int
    truncated: bool = Field(description=f"True if more than {MAX_SUMMARIZE} notes matched")
    total_words: int
    top_tags: list[TagCount]
    note_ids: list[int]


class Deleted(TypedDict):
    deleted: int


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


def _markdown(note: Note) -> str:
    tags = ", ".join(note.tags) or "none"
    return f"# {note.title}\n\n{note.body}\n\n---\nid: {note.id} · tags: {tags} · created: {note.created_at}\n"


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


def storage_failure(exc: sqlite3.Error) -> tuple[str, str] | None:
    """(label, words) when `exc` means the disk refused a write, else None (a bug, a lock timeout …)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return STORAGE_FAILURES.get(code & 0xFF) if isinstance(code, int) else None


class NoteStore:
    """One lazily opened SQLite connection per process, serialized by a lock."""

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
            conn.execute("PRAGMA journal_mode=WAL")
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


def create_server(db_path_resolver: Callable[[], Path] | None = None) -> MCPServer:
    """Build the notes server; the database is opened on first use, not here."""
    store = NoteStore(db_path_resolver or default_db_path)
    server = MCPServer(
        "notes",
        title="Notes",
        description="A notes knowledge base for agents.",
        instructions="Store findings with add_note, find them with search_notes, read one with get_note "
        "or the notes://{id} resource. Cite notes by id.",
    )
    read_only = ToolAnnotations(read_only_hint=True)

    # Sync tools on purpose: MCPServer runs sync tool functions via anyio.to_thread.run_sync,
    # so SQLite calls never block the event loop. summarize_notes is async (it awaits ctx)
    # and offloads its query explicitly.
    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
    def add_note(title: str, body: str, tags: list[str] = []) -> Note:  # noqa: B006 - pydantic copies defaults
        """Add a note (title 1-200 chars, body up to 100000 chars, up to 20 tags); returns it with its id."""
        return store.add(title, body, tags)

    @server.tool(annotations=read_only)
    def search_notes(query: str, limit: Annotated[int, Field(ge=1, le=100)] = 10) -> list[SearchHit]:
        """Full-text search over titles, bodies and tags, best match first. Plain words; `word*` for prefixes."""
        return store.search(query, limit)

    @server.tool(annotations=read_only)
    def get_note(id: int) -> Note:
        """Get one note by id."""
        note = store.get(id)
        if note is None:
            raise NoteError(f"note {id} not found")
        return note

    @server.tool(annotations=read_only)
    def list_notes(
        tag: str | None = None,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
        offset: Annotated[int, Field(ge=0)] = 0,
    ) -> list[NoteSummary]:
        """List notes newest first, optionally only those carrying `tag`."""
        return store.summaries(tag, limit, offset)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True))
    def delete_note(id: int) -> Deleted:
        """Delete a note by id."""
        if not store.delete(id):
            raise NoteError(f"note {id} not found")
        return {"deleted": id}

    @server.tool(annotations=read_only)
    async def summarize_notes(query: str = "", *, ctx: Context) -> NotesSummary:
        """Summarize the notes matching `query` (all notes if empty): counts, words and top tags."""
        notes = await anyio.to_thread.run_sync(store.matching, query, MAX_SUMMARIZE)
        truncated = len(notes) > MAX_SUMMARIZE
        notes = notes[:MAX_SUMMARIZE]
        # ctx.info() emits MCPDeprecationWarning: logging is deprecated as of protocol 2026-07-28
        # (SEP-2577), but clients that opt in with a log level still receive these messages.
        await ctx.info(f"summarizing {len(notes)} note(s)" + (f" matching {query!r}" if query.strip() else ""))
        tags: Counter[str] = Counter()
        words = 0
        for i, note in enumerate(notes, start=1):
            tags.update(note.tags)
            words += len(note.body.split())
            await ctx.report_progress(i, len(notes), f"note {note.id}: {note.title[:80]}")
        await ctx.info(f"done: {words} words, {len(tags)} distinct tags")
        return NotesSummary(
            query=query,
            matched=len(notes),
            truncated=truncated,
            total_words=words,
            top_tags=[TagCount(tag=t, count=c) for t, c in tags.most_common(10)],
            note_ids=[n.id for n in notes],
        )

    @server.resource("notes://{id}", name="note", title="Note", description="A note as Markdown.",
                     mime_type="text/markdown")
    def note_resource(id: int) -> str:
        """One note rendered as Markdown."""
        note = store.get(id)
        if note is None:
            raise ResourceNotFoundError(f"note {id} not found")
        return _markdown(note)

    @server.prompt(title="Research a topic in the notes")
    def research_prompt(topic: str) -> str:
        """Ask the model to research `topic` in the notes and write a cited summary."""
        return (
            f"Research the topic {topic!r} using the notes knowledge base.\n"
            "1. Call search_notes with a few different keyword queries for the topic.\n"
            "2. Read the most relevant hits with get_note (or the notes://{id} resource).\n"
            "3. Write a concise summary of what the notes say, citing every claim with its note id, "
            "like [note 12].\n"
            "If the notes say nothing about the topic, say so plainly instead of guessing."
        )

    _add_asking_tools(server, store)
    _publish_changes(server)
    return server


# -- Change events (2026-07-28 subscriptions/listen) --------------------------------------------
# After a tool changed the notes: resources/updated for notes://{id} when a note is deleted
# (readers of it refetch and find it gone), and resources/list_changed when the set of notes
# changes (an add or a delete). Published on the server's bus, which the appliance fans out
# to every worker; a middleware so the tools themselves stay plain storage calls.
_CHANGES = {"add_note", "delete_note"}


def _call_succeeded(result: object) -> dict[str, object] | None:
    """The structured content of a successful tools/call result, else None."""
    doc = result.model_dump(by_alias=True) if isinstance(result, BaseModel) else result
    if not isinstance(doc, dict) or doc.get("isError"):
        return None
    content = doc.get("structuredContent")
    return content if isinstance(content, dict) else {}


def _publish_changes(server: MCPServer) -> None:
    async def publish_changes(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        params = ctx.params or {}
        if ctx.method != "tools/call" or params.get("name") not in _CHANGES:
            return result
        content = _call_succeeded(result)
        if content is None:
            return result
        # The SDK has no public accessor for the bus its Context publishes on.
        bus = server._subscriptions  # noqa: SLF001
        if params["name"] == "delete_note" and isinstance(content.get("deleted"), int):
            await bus.publish(ResourceUpdated(uri=f"notes://{content['deleted']}"))
        await bus.publish(ResourcesListChanged())
        return result

    server.middleware.append(publish_changes)


# -- Tools that ask the client (2026-07-28 multi-round-trip calls) ------------------------------
# A resolver returns Elicit(...) or Sample(...): the first call answers with an
# InputRequiredResult whose requestState the appliance's shared ring seals, and the client's
# retry (which any worker, on any node, may receive) carries the answer.


class SearchQuestion(BaseModel):
    query: str = Field(description="Words to search the notes for")


class Abstract(BaseModel):
    id: int
    abstract: str = Field(description="The client's model's one-paragraph abstract of the note")
    model: str


def _add_asking_tools(server: MCPServer, store: NoteStore) -> None:
    read_only = ToolAnnotations(read_only_hint=True)

    def ask_query(topic: str = "") -> Elicit[SearchQuestion]:
        return Elicit(f"What should I search the notes for{' about ' + repr(topic) if topic else ''}?", SearchQuestion)

    @server.tool(annotations=read_only)
    def search_notes_asking(
        question: Annotated[SearchQuestion, Resolve(ask_query)], topic: str = "",
        limit: Annotated[int, Field(ge=1, le=100)] = 10,
    ) -> list[SearchHit]:
        """Ask the user what to search for (elicitation), then search the notes for it."""
        return store.search(question.query, limit)

    def ask_model(id: int) -> Sample:
        note = store.get(id)
        if note is None:
            raise NoteError(f"note {id} not found")
        # Only what the note says: the question must render the same on every round and node.
        text = f"Write a one-paragraph abstract of this note.\n\n# {note.title}\n\n{note.body}"
        return Sample([SamplingMessage(role="user", content=TextContent(type="text", text=text))], max_tokens=300)

    @server.tool(annotations=read_only)
    def abstract_note(id: int, answer: Annotated[CreateMessageResult, Resolve(ask_model)]) -> Abstract:
        """Ask the client's model (sampling) for a one-paragraph abstract of note `id`."""
        content = answer.content
        text = content.text if isinstance(content, TextContent) else ""
        return Abstract(id=id, abstract=text, model=answer.model)


server: MCPServer = create_server()
