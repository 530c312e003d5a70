"""JSON-RPC on the wire: the request body parsed once per request, responses read as they stream.

The body is read once, parsed once (policy, audit and metrics all use the result) and
replayed to the hosted app as a single message. Responses may be plain JSON or an SSE
stream; `MessageScanner` finds the JSON-RPC messages in either, and `BodyRewriter`
changes them on the way out (used to filter list results).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gate.exchange import exchange, flag
from appliance.gate.responses import INVALID_REQUEST, header, send_rpc_error

PARSE_ERROR = -32700
INVALID_PARAMS = -32602
#: Responses larger than this are passed through without being read (outcome by status only).
SCAN_LIMIT = 8 * 1024 * 1024
#: Deepest nesting of arrays and objects a body may have (the SDK's own JSON parser stops at 200).
MAX_DEPTH = 128

#: Methods whose params name a tool, prompt or resource: method -> (kind, params key).
NAMED_METHODS: dict[str, tuple[str, str]] = {
    "tools/call": ("tool", "name"),
    "prompts/get": ("prompt", "name"),
    "resources/read": ("resource", "uri"),
    "resources/subscribe": ("resource", "uri"),
    "resources/unsubscribe": ("resource", "uri"),
}
#: Every method of the MCP vocabulary (mcp_types, 2024-11-05 to 2026-07-28) that names nothing
#: policy rules cover (those are NAMED_METHODS, completion/complete and subscriptions/listen).
UNNAMED_METHODS = frozenset({
    "initialize", "ping", "tools/list", "prompts/list", "resources/list", "resources/templates/list",
    "logging/setLevel", "server/discover", "tasks/get", "tasks/list", "tasks/result", "tasks/cancel",
    "roots/list", "sampling/createMessage", "elicitation/create",
    "notifications/initialized", "notifications/cancelled", "notifications/progress", "notifications/message",
    "notifications/roots/list_changed", "notifications/tasks/status", "notifications/elicitation/complete",
    "notifications/tools/list_changed", "notifications/prompts/list_changed", "notifications/resources/list_changed",
    "notifications/resources/updated", "notifications/subscriptions/acknowledged",
})
#: Keys in the params of an unknown method that suggest it names a tool, prompt or resource.
_NAMING_KEY = re.compile(r"(?i)(name|names|uri|uris|ref|refs|subscriptions)$")
_REF_KINDS = {"ref/prompt": ("prompt", "name"), "ref/resource": ("resource", "uri")}

_MISSING: Any = object()
#: The _meta key by which a 2026-07-28 request asks for log messages on its answer.
LOG_LEVEL_META = "io.modelcontextprotocol/logLevel"


@dataclass(slots=True)
class RpcCall:
    """The parts of a JSON-RPC message the gate acts on."""

    method: str | None
    id: Any = None
    #: "tool", "prompt" or "resource" for methods that name one.
    kind: str | None = None
    #: The one tool, prompt or resource URI named (None when none, or several: see subjects).
    name: str | None = None
    arguments: Any = _MISSING
    #: protocolVersion of an initialize request.
    protocol_version: str | None = None
    #: The members of a batch (then method is "batch").
    batch: tuple[RpcCall, ...] = ()
    #: Every name or URI of `kind` the call uses (a subscriptions/listen may name many).
    subjects: tuple[str, ...] = ()
    #: Why the gate cannot tell what this call uses (policy refuses it while rules apply).
    unclassified: str | None = None
    #: Whether the client asked for notifications on the answer: a progressToken or a log level in
    #: params._meta, or a subscriptions/listen (see appliance/answers.py).
    notified: bool = False

    @property
    def is_request(self) -> bool:
        """A request expects a response with its id (notifications and responses do not)."""
        return self.method is not None and self.id is not None and not self.batch

    @property
    def has_arguments(self) -> bool:
        return self.arguments is not _MISSING


class RpcError(Exception):
    """A body that is not JSON-RPC: the code and message for the error answer."""

    def __init__(self, code: int, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class _NotJson(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, but they are not JSON (RFC 8259)."""


def _no_constants(name: str) -> Any:
    raise _NotJson(name)


def _too_deep(body: bytes, data: Any) -> bool:
    """Whether `data` nests arrays and objects deeper than MAX_DEPTH (cheap when the body cannot)."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return False
    level: list[tuple[Any, int]] = [(data, 1)]
    while level:
        value, depth = level.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            level.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            level.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


#: Made once: json.loads(body, parse_constant=...) builds a new decoder on every call.
_decode = json.JSONDecoder(parse_constant=_no_constants).decode


def parse_body(body: bytes) -> RpcCall:
    """The JSON-RPC message (or batch) in a request body; RpcError when it is not one."""
    try:
        # What json.loads does with bytes: UTF-8, -16 or -32 by the first bytes.
        data = _decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except _NotJson as exc:
        raise RpcError(INVALID_REQUEST, f"Invalid request: {exc} is not a JSON value") from None
    except RecursionError:
        raise RpcError(PARSE_ERROR, f"Parse error: JSON nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise RpcError(PARSE_ERROR, "Parse error: the body is not valid JSON") from None
    if _too_deep(body, data):
        raise RpcError(PARSE_ERROR, f"Parse error: JSON nested deeper than {MAX_DEPTH} levels")
    if isinstance(data, list):
        if not data:
            raise RpcError(INVALID_REQUEST, "Invalid request: empty batch")
        return RpcCall(method="batch", batch=tuple(_message(item) for item in data))
    return _message(data)


def _message(data: Any) -> RpcCall:
    if not isinstance(data, dict):
        raise RpcError(INVALID_REQUEST, "Invalid request: a JSON-RPC message is a JSON object")
    rid = data.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int, float))):
        raise RpcError(INVALID_REQUEST, "Invalid request: id must be a string or a number")
    if data.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'Invalid request: "jsonrpc" must be "2.0"', rid)
    method = data.get("method", _MISSING)
    if method is _MISSING:
        if "result" not in data and "error" not in data:
            raise RpcError(INVALID_REQUEST, "Invalid request: no method, result or error", rid)
        return RpcCall(method=None, id=rid)  # a client's answer to a server request
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, "Invalid request: method must be a non-empty string", rid)
    params = data.get("params")
    if params is not None and not isinstance(params, (dict, list)):
        raise RpcError(INVALID_REQUEST, "Invalid request: params must be an object or an array", rid)
    call = RpcCall(method=method, id=rid)
    _classify(call, params if isinstance(params, dict) else {}, params)
    meta = params.get("_meta") if isinstance(params, dict) else None
    call.notified = method == "subscriptions/listen" or (
        isinstance(meta, dict) and (meta.get("progressToken") is not None or meta.get(LOG_LEVEL_META) is not None))
    return call


def _classify(call: RpcCall, params: dict[str, Any], raw: Any) -> None:
    """Note what the call names (kind, subjects), or why that cannot be told (unclassified)."""
    method = call.method
    named = NAMED_METHODS.get(method or "")
    if named is not None:
        call.kind = named[0]
        value = params.get(named[1])
        if isinstance(value, str):
            call.name = value
            call.subjects = (value,)
        else:
            call.unclassified = f"{method} without a string params.{named[1]}"
        call.arguments = params.get("arguments", _MISSING)
    elif method == "subscriptions/listen":
        notifications = params.get("notifications")
        if not isinstance(notifications, dict):
            call.unclassified = "subscriptions/listen without params.notifications"
            return
        uris: list[str] = []
        # The SDK's model takes the field's name as well as its camelCase alias.
        for key in ("resourceSubscriptions", "resource_subscriptions"):
            value = notifications.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
                call.unclassified = f"subscriptions/listen with a {key} that is not a list of URIs"
                return
            uris += value
        if uris:
            call.kind = "resource"
            call.subjects = tuple(dict.fromkeys(uris))
            call.name = uris[0] if len(call.subjects) == 1 else None
    elif method == "completion/complete":
        ref = params.get("ref")
        kind_key = _REF_KINDS.get(ref.get("type")) if isinstance(ref, dict) else None
        value = ref.get(kind_key[1]) if kind_key is not None and isinstance(ref, dict) else None
        if kind_key is None or not isinstance(value, str):
            call.unclassified = "completion/complete without a ref/prompt name or ref/resource uri"
            return
        call.kind, call.name, call.subjects = kind_key[0], value, (value,)
    elif method == "initialize":
        version = params.get("protocolVersion")
        call.protocol_version = version if isinstance(version, str) else None
    elif method not in UNNAMED_METHODS and _names_something(
            {k: v for k, v in params.items() if k != "_meta"} if isinstance(raw, dict) else raw):
        call.unclassified = f"unknown method {method[:64]!r} naming a tool, prompt or resource"


def _names_something(value: Any, depth: int = 0) -> bool:
    """Whether params (of an unknown method) carry a key that names a tool, prompt or resource, or a URI."""
    if depth > 16:
        return True
    if isinstance(value, dict):
        return any((isinstance(k, str) and _NAMING_KEY.search(k)) or _names_something(v, depth + 1)
                   for k, v in value.items())
    if isinstance(value, list):
        return any(_names_something(v, depth + 1) for v in value)
    return isinstance(value, str) and "://" in value


def call_from_headers(headers: list[tuple[bytes, bytes]]) -> RpcCall | None:
    """What the Mcp-Method and Mcp-Name headers of a 2026-07-28 request say (None without them).

    Only for the record of a request refused before its body is read: unverified, bounded.
    """
    method = header(headers, b"mcp-method")
    if method is None:
        return None
    call = RpcCall(method=method.decode("latin-1")[:64])
    name = header(headers, b"mcp-name")
    if name is not None:
        call.name = name.decode("latin-1")[:256]
        call.kind = NAMED_METHODS.get(call.method or "", (None, ""))[0]
    return call


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body (None when the client went away first)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields `body` once, then whatever the client sends next (a disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class JsonRpcBody:
    """Reads and parses the body of every POST under the MCP path once; malformed ones get 400.

    The content type does not matter: the SDK serves a 2026-07-28 POST whatever it declares,
    so a body the gate did not read would pass the policy unseen.
    """

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.path = path.rstrip("/")

    def covers(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self.covers(scope["path"]):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return
        try:
            call = parse_body(body)
        except RpcError as exc:
            flag(scope, "malformed_jsonrpc")
            await send_rpc_error(send, 400, exc.code, exc.message, exc.request_id)
            return
        ex = exchange(scope)
        if ex is not None:
            ex.rpc = call
            if call.protocol_version and ex.protocol_version is None:
                ex.protocol_version = call.protocol_version[:64]
        await self.app(scope, replay(body, receive), send)


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


def _event_data(event: bytes) -> bytes | None:
    """The data field of one SSE event (None when it has none)."""
    data = [line[5:].removeprefix(b" ") for line in _LINE.split(event) if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def _loads(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def is_sse(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.lower().startswith(b"text/event-stream")


def is_json(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.lower().startswith(b"application/json")


#: In a JSON body without \u escapes every key is spelled as it reads: a body with no "error" member
#: and no isError that is true answers as a plain result, whatever else it holds (see MessageScanner.answer).
_NOT_PLAIN = re.compile(rb'"error"\s*:|"isError"\s*:\s*true|\\u')


class MessageScanner:
    """Finds the JSON-RPC messages in a response body, plain JSON or SSE, chunk by chunk."""

    def __init__(self, content_type: bytes | None) -> None:
        self.sse = is_sse(content_type)
        self.active = self.sse or is_json(content_type)
        self.pending = b""
        #: A JSON body's chunks so far (joined once, at its end).
        self.chunks: list[bytes] = []
        self.size = 0

    def answer(self, chunk: bytes, more: bool, request_id: Any) -> tuple[str, bool] | None:
        """The answer to `request_id` (as response_to) once `chunk` completes it, else None.

        A JSON body that cannot be anything but a plain result is not parsed: the outcome
        then needs no second json.loads of the answer (it is "ok" by its status either way).
        """
        if self.active and not self.sse and not more and not self.chunks and len(chunk) <= SCAN_LIMIT:
            if _NOT_PLAIN.search(chunk) is None:
                return "result", False
            return response_to(_loads(chunk), request_id)
        for message in self.feed(chunk, more):
            found = response_to(message, request_id)
            if found is not None:
                return found
        return None

    def feed(self, chunk: bytes, more: bool) -> list[Any]:
        """The messages completed by `chunk` (the final chunk has more=False)."""
        if not self.active:
            return []
        if not self.sse:
            self.chunks.append(chunk)
            self.size += len(chunk)
            if self.size > SCAN_LIMIT:
                self.active = False
                self.chunks = []
                return []
            if more:
                return []
            message = _loads(b"".join(self.chunks))
            self.chunks = []
            return [message] if message is not None else []
        self.pending += chunk
        if len(self.pending) > SCAN_LIMIT:
            self.active = False
            self.pending = b""
            return []
        messages = []
        while True:
            end = _EVENT_END.search(self.pending)
            if end is None:
                break
            event, self.pending = self.pending[: end.start()], self.pending[end.end() :]
            message = _loads(_event_data(event))
            if message is not None:
                messages.append(message)
        return messages


def response_to(message: Any, request_id: Any) -> tuple[str, bool] | None:
    """("result" | "error", isError) when `message` answers request `request_id`."""
    if not isinstance(message, dict) or message.get("id") != request_id:
        return None
    result = message.get("result")
    if isinstance(result, dict):
        return "result", result.get("isError") is True
    if "error" in message:
        return "error", False
    return ("result", False) if "result" in message else None


Edit = Callable[[Any], Any]


class BodyRewriter:
    """A send that passes the response on with its JSON-RPC messages replaced by `edit(message)`.

    A JSON body is held until complete (its Content-Length changes); an SSE stream is
    passed on event by event.
    """

    def __init__(self, send: Send, edit: Edit) -> None:
        self.send = send
        self.edit = edit
        self.mode = "pass"
        self.start: Message | None = None
        self.pending = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = header(message.get("headers", []), b"content-type")
            if message["status"] == 200 and (is_json(content_type) or is_sse(content_type)):
                self.mode = "sse" if is_sse(content_type) else "json"
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"]
                message = {**message, "headers": headers}
                if self.mode == "json":
                    self.start = message
                    return
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.pending += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if more:
                return
            body = self._edited_json(self.pending)
            assert self.start is not None
            start = {**self.start, "headers": [*self.start["headers"], (b"content-length", str(len(body)).encode())]}
            await self.send(start)
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
            return
        out = []
        while True:
            end = _EVENT_END.search(self.pending)
            if end is None:
                break
            out.append(self._edited_event(self.pending[: end.start()]) + end.group())
            self.pending = self.pending[end.end() :]
        if not more:
            out.append(self.pending)
            self.pending = b""
        if out or not more:
            await self.send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

    def _edited_json(self, body: bytes) -> bytes:
        message = _loads(body)
        if message is None:
            return body
        return json.dumps(self.edit(message), separators=(",", ":"), ensure_ascii=False).encode()

    def _edited_event(self, event: bytes) -> bytes:
        message = _loads(_event_data(event))
        if message is None:
            return event
        newline = b"\r\n" if b"\r\n" in event else b"\n"
        lines = [line for line in _LINE.split(event) if not line.startswith(b"data:")]
        lines.append(b"data: " + json.dumps(self.edit(message), separators=(",", ":"), ensure_ascii=False).encode())
        return newline.join(lines)
