"""Logging: one JSON object per line, and no line per call where nginx's access log has the call."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import anyio
import pytest
from mcp.server.streamable_http import StreamableHTTPServerTransport

from appliance.config import Settings
from appliance.logs import configure_logging


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging changes process-wide logging: put it back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sdk = logging.getLogger("mcp.server.streamable_http")
    filters, httpx_level = sdk.filters[:], logging.getLogger("httpx2").level
    try:
        yield
    finally:
        root.handlers[:], root.level = handlers, level
        sdk.filters[:] = filters
        logging.getLogger("httpx2").setLevel(httpx_level)


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_stateless_requests_throw_away_transport_logs_nothing(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(Settings(), "worker-00", 0)
    # What the SDK does at the end of every stateless request: a transport without a session ends.
    anyio.run(StreamableHTTPServerTransport(mcp_session_id=None).terminate)
    # A real session's end is still logged.
    anyio.run(StreamableHTTPServerTransport(mcp_session_id="abc").terminate)
    records = lines(capsys.readouterr().err)
    assert [r["message"] for r in records] == ["Terminating session: abc"]
    assert records[0]["process"] == "worker-00" and records[0]["level"] == "INFO"


def test_outgoing_requests_are_not_logged_one_by_one_unless_debugging(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(Settings(), "admin")
    logging.getLogger("httpx2").info("HTTP Request: GET http://127.0.0.1:9101/_appliance/health")
    assert capsys.readouterr().err == ""
    configure_logging(Settings(log_level="debug"), "admin")
    logging.getLogger("httpx2").info("HTTP Request: GET http://127.0.0.1:9101/_appliance/health")
    assert [r["logger"] for r in lines(capsys.readouterr().err)] == ["httpx2"]
