"""supervisord event listener: process state changes become JSON log lines."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from supervisor import childutils


def parse_payload(payload: str) -> dict[str, str]:
    """`key:value key:value` tokens of a PROCESS_STATE payload's first line."""
    first = payload.split("\n", 1)[0]
    return dict(token.split(":", 1) for token in first.split() if ":" in token)


def listen(service: str, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, log: TextIO = sys.stderr,
           on_event: Callable[[str, dict[str, str]], None] | None = None) -> None:
    """Speak supervisord's listener protocol forever; one log line per state change (and `on_event`)."""
    while True:
        headers, payload = childutils.listener.wait(stdin, stdout)
        fields = parse_payload(payload)
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "level": "warning" if headers["eventname"] in {"PROCESS_STATE_EXITED", "PROCESS_STATE_FATAL", "PROCESS_STATE_BACKOFF"} else "info",
            "logger": "appliance.events",
            "message": f"{fields.get('groupname', '?')}:{fields.get('processname', '?')} {fields.get('from_state', '?')} -> {headers['eventname'].removeprefix('PROCESS_STATE_')}",
            "service": service,
            "process": "events",
            "event": headers["eventname"],
            "group": fields.get("groupname"),
            "program": fields.get("processname"),
            "from_state": fields.get("from_state"),
            "expected": fields.get("expected"),
            "pid": fields.get("pid"),
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        if on_event is not None:
            on_event(headers["eventname"], fields)  # metrics: restarts, dead processes' gauges
        childutils.listener.ok(stdout)
