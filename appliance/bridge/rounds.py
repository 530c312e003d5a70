"""2026-07-28 multi-round-trip for a child that asks mid-call (sampling, elicitation, roots), by replay.

A 2026-07-28 request has no back channel, and a call held open in one worker could not
be finished by the retry, which may reach any worker. So the bridge keeps nothing: when
the child asks, its call is cancelled (the child gets notifications/cancelled) and the
client gets an InputRequiredResult; the `requestState` carries the client's answers so
far, in order; the retry runs the call again, on any worker's child, and answers the
child's questions from them until it asks something new or finishes. Right for calls
that ask before they change anything (the usual shape); a tool that writes and then asks
writes again on each round. The state holds only the client's own answers (nothing a
client could not send anyway), so it needs no sealing.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import anyio
import mcp_types as types
from mcp.shared.exceptions import MCPError

STATE_PREFIX = "bridge-replay:"
#: Rounds one call may take before the bridge gives up on it.
MAX_ROUNDS = 8


def _expired() -> MCPError:
    return MCPError(code=types.INVALID_PARAMS, message="Invalid or expired requestState")


class Replay:
    """The answers a 2026-07-28 call brings, and the question the child asks beyond them."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.used = 0
        self.asked = anyio.Event()
        self.ended = anyio.Event()
        self.question: Any = None

    @classmethod
    def from_params(cls, params: Any) -> Replay:
        """The replay a request carries (none yet on its first round)."""
        params = params if isinstance(params, dict) else {}
        state = params.get("requestState")
        if state is None:
            return cls([])
        if not isinstance(state, str) or not state.startswith(STATE_PREFIX):
            raise _expired()
        try:
            answers = json.loads(base64.urlsafe_b64decode(state.removeprefix(STATE_PREFIX)))
        except (ValueError, binascii.Error):
            raise _expired() from None
        responses = params.get("inputResponses") or {}
        key = f"r{len(answers)}" if isinstance(answers, list) else None
        if key is None or not isinstance(responses, dict) or key not in responses:
            raise MCPError(code=types.INVALID_PARAMS, message=f"inputResponses must answer {key!r}")
        return cls([*answers, responses[key]])

    async def answer(self, question: Any) -> Any | None:
        """The client's answer to the child's next question; None once the call is given up for a new round."""
        if self.used < len(self.answers):
            self.used += 1
            return self.answers[self.used - 1]
        self.question = question
        self.asked.set()
        await self.ended.wait()
        return None

    def input_required(self) -> dict[str, Any]:
        """The result that asks the client the child's question."""
        if len(self.answers) >= MAX_ROUNDS:
            raise MCPError(code=types.INTERNAL_ERROR, message=f"the stdio server asked more than {MAX_ROUNDS} questions")
        state = STATE_PREFIX + base64.urlsafe_b64encode(json.dumps(self.answers).encode()).decode()
        result = types.InputRequiredResult(input_requests={f"r{len(self.answers)}": self.question}, request_state=state)
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)
