"""The event listener: state changes become log lines; supervisord's stop starts every worker's stop."""

from __future__ import annotations

import io
import json

import pytest

from appliance.events import STOPPING, listen


def event(name: str, payload: str = "") -> str:
    return (f"ver:3.0 server:supervisor serial:1 pool:events poolserial:1 eventname:{name} "
            f"len:{len(payload)}\n{payload}")


def test_supervisord_stopping_runs_the_stop_hook_once_and_is_acknowledged() -> None:
    stdin = io.StringIO(event(STOPPING) + event("PROCESS_STATE_STOPPING", "processname:worker-00 groupname:worker-00 "
                                                "from_state:RUNNING pid:42"))
    stdout, log, calls = io.StringIO(), io.StringIO(), []
    with pytest.raises(KeyError):  # stdin at its end: no headers, so the endless loop stops
        listen("svc", stdin, stdout, log, on_stopping=lambda: calls.append(1) or "2 workers")
    assert calls == [1]
    assert stdout.getvalue().startswith("READY\nRESULT 2\nOKREADY\nRESULT 2\nOKREADY\n")
    records = [json.loads(line) for line in log.getvalue().splitlines()]
    assert records[0]["event"] == STOPPING and records[0]["message"] == "supervisord is stopping: 2 workers"
    assert records[1]["program"] == "worker-00"
