"""Notes: the appliance's built-in default hosted MCP server, a notes knowledge base for agents.

Hosted-app contract: the notes live in SQLite under ``$MCP_APPLIANCE_DATA_DIR`` (one host),
or in the PostgreSQL database whose URL is in the file ``$MCP_APPLIANCE_NOTES_DATABASE_URL_FILE``
(several hosts); see appliance/servers/notes_storage.py.
"""

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

import anyio.to_thread
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve, Sample
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp_types import CreateMessageResult, SamplingMessage, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from appliance.servers.notes_storage import (
    MAX_SUMMARIZE,
    Note,
    NoteError,
    NotesStorage,
    NoteSummary,
    SearchHit,
    open_storage,
)

__all__ = ["Note", "NoteError", "NoteSummary", "SearchHit", "create_server", "server"]


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



def _markdown(note: Note) -> str:
    tags = ", ".join(note.tags) or "none"
    return f"# {note.title}\n\n{note.body}\n\n---\nid: {note.id} · tags: {tags} · created: {note.created_at}\n"



def create_server(db_path_resolver: Callable[[], Path] | None = None) -> MCPServer:
    """Build the notes server; the database is opened on first use, not here."""
    store = open_storage(db_path_resolver)
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


def _add_asking_tools(server: MCPServer, store: NotesStorage) -> None:
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
