"""The outcome of a call is read from its answer without parsing a plain JSON result twice."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.gate.jsonrpc import MessageScanner


def body(message: Any) -> bytes:
    return json.dumps(message).encode()


@pytest.mark.parametrize(("message", "expected"), [
    ({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "error: \"error\": no"}],
                                           "isError": False}}, ("result", False)),
    ({"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": True}}, ("result", True)),
    ({"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "bad"}}, ("error", False)),
])
def test_a_json_answer_in_one_chunk_gives_its_outcome(message: Any, expected: tuple[str, bool]) -> None:
    assert MessageScanner(b"application/json").answer(body(message), False, 1) == expected
    # The same, however it is spaced.
    spaced = json.dumps(message, indent=2).encode()
    assert MessageScanner(b"application/json").answer(spaced, False, 1) == expected


def test_an_error_key_spelled_with_escapes_is_still_an_error() -> None:
    escaped = b'{"jsonrpc":"2.0","id":1,"\\u0065rror":{"code":-1,"message":"x"}}'
    assert MessageScanner(b"application/json").answer(escaped, False, 1) == ("error", False)
    tool_error = b'{"jsonrpc":"2.0","id":1,"result":{"is\\u0045rror":true}}'
    assert MessageScanner(b"application/json").answer(tool_error, False, 1) == ("result", True)


def test_a_json_answer_in_chunks_is_read_once_complete() -> None:
    data = body({"jsonrpc": "2.0", "id": 4, "result": {"isError": True}})
    scanner = MessageScanner(b"application/json")
    assert scanner.answer(data[:7], True, 4) is None
    assert scanner.answer(data[7:20], True, 4) is None
    assert scanner.answer(data[20:], False, 4) == ("result", True)


def test_an_sse_answer_is_found_after_the_notifications_before_it() -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1}}
    events = b"".join(b"event: message\r\ndata: " + body(m) + b"\r\n\r\n"
                      for m in (progress, {"jsonrpc": "2.0", "id": 2, "error": {"code": -1}}))
    scanner = MessageScanner(b"text/event-stream")
    assert scanner.answer(events[:40], True, 2) is None
    assert scanner.answer(events[40:], True, 2) == ("error", False)
