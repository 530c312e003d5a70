"""supervisord event listener: process state changes become JSON log lines; a stop starts every worker's."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from supervisor import childutils

from appliance.config import Settings

#: supervisord begins to stop (shutdown or restart): it then stops one process group at a time.
STOPPING = "SUPERVISOR_STATE_CHANGE_STOPPING"


def parse_payload(payload: str) -> dict[str, str]:
    """`key:value key:value` tokens of a PROCESS_STATE payload's first line."""
    first = payload.split("\n", 1)[0]
    return dict(token.split(":", 1) for token in first.split() if ":" in token)


def listen(service: str, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, log: TextIO = sys.stderr,
           on_event: Callable[[str, dict[str, str]], None] | None = None,
           on_stopping: Callable[[], str] | None = None) -> None:
    """Speak supervisord's listener protocol forever; one log line per state change (and `on_event`).

    `on_stopping` runs when supervisord begins to stop; what it returns is logged.
    """
    while True:
        headers, payload = childutils.listener.wait(stdin, stdout)
        if headers["eventname"] == STOPPING:
            done = on_stopping() if on_stopping is not None else ""
            log.write(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": "info", "logger": "appliance.events",
                "message": f"supervisord is stopping{': ' + done if done else ''}", "service": service,
                "process": "events", "event": STOPPING,
            }) + "\n")
            log.flush()
            childutils.listener.ok(stdout)
            continue
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


def run_events(settings: Settings) -> None:
    """The listener supervisord runs: dies with supervisord, stops the workers together with it."""
    from appliance.lifetime import die_with_supervisord, terminate_workers
    from appliance.metrics import ProcessEvents, multiproc_dir

    die_with_supervisord(settings.run_dir, "events")
    supervisord = os.getppid()

    def stop_workers() -> str:
        pids = terminate_workers(supervisord)
        return f"SIGTERM to {len(pids)} workers at once ({' '.join(map(str, pids)) or '-'})"

    listen(settings.service_name, on_event=ProcessEvents(settings.workers.count, multiproc_dir(settings.run_dir)),
           on_stopping=stop_workers)
