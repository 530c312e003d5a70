"""What is wrong in this process right now, in an operator's words: the worker's probe reports it.

The gate (an audit trail it cannot write) and the hosted app (a database it cannot write)
set a condition when a write fails and clear it when a write succeeds again; the worker's
health probe (appliance/gate/probe.py) answers with them, and /health turns them into
`degraded` with their reasons. A hosted app reports through `PROCESS_CONDITIONS`: it is the
one object both sides of a worker process can see (the app is imported, not built, by the
worker). Setting and clearing are single dict operations, safe from tool threads.
"""

from __future__ import annotations


class Conditions:
    """Named problems (concern -> reason); empty when the process is fine."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def set(self, concern: str, reason: str) -> None:
        """`concern` (e.g. "audit", "storage") is failing, for `reason`."""
        self._reasons[concern] = reason

    def clear(self, concern: str) -> None:
        """`concern` works again."""
        self._reasons.pop(concern, None)

    def reasons(self) -> list[str]:
        """Every current reason, sorted by concern."""
        return [reason for _, reason in sorted(self._reasons.items())]


#: This process's conditions (one per worker process).
PROCESS_CONDITIONS = Conditions()
