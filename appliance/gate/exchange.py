"""The record of one request as it passes the gate: each layer fills in what it learns.

`Outcome` (the outermost recording layer) creates it; inner layers find it in
`scope["state"]` and note the principal, the parsed JSON-RPC call, a denial or a
security violation. When the request is answered the record goes to the audit trail
and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

if TYPE_CHECKING:
    from appliance.gate.auth import Principal
    from appliance.gate.jsonrpc import RpcCall

STATE_KEY = "appliance.exchange"

#: Violation kinds that also make the outcome "denied" (the others are protocol errors).
DENIALS = frozenset({"bad_credential", "bad_host", "bad_origin", "policy", "session_owner"})


@dataclass(slots=True)
class Exchange:
    """What the gate knows about one HTTP request to the MCP endpoint."""

    started: float
    http_method: str
    request_id: str = "-"
    client: str | None = None
    protocol_version: str | None = None
    principal: Principal | None = None
    #: The session id as the client sees it (owner tag included).
    session: str | None = None
    rpc: RpcCall | None = None
    status: int = 0
    #: ("allowed" | "denied", reason) of the last authorization step that decided.
    authz: tuple[str, str] | None = None
    #: Why the request was refused (a DENIALS kind, "missing_credential" or "missing_scope" …).
    denied: str | None = None
    violation: str | None = None
    #: The JSON-RPC response to the request, once seen: ("result" | "error", isError).
    answer: tuple[str, bool] | None = None
    #: The trace the request's span belongs to (32 hex digits; None with tracing off).
    trace_id: str | None = None
    done: bool = False

    @property
    def opens_session(self) -> bool:
        """Whether the request may open a legacy session: only an initialize does (MCP's Streamable
        HTTP transport). A session id an app issues on any other answer stays unknown to the gate."""
        return self.rpc is not None and self.rpc.method == "initialize"

    @property
    def outcome(self) -> str:
        """ok, tool_error, denied or protocol_error."""
        if self.denied:
            return "denied"
        if self.status >= 400 or self.status == 0:
            return "protocol_error"
        if self.answer is not None:
            kind, is_error = self.answer
            if kind == "error":
                return "protocol_error"
            if is_error:
                return "tool_error"
        return "ok"


def exchange(scope: Scope) -> Exchange | None:
    """The record of the request `scope` belongs to (None outside the gate, e.g. in unit tests)."""
    state: Any = scope.get("state")
    return state.get(STATE_KEY) if state is not None else None


def flag(scope: Scope, violation: str, denied: str | None = None) -> None:
    """Note a security violation (and the denial it causes) on the request's record."""
    ex = exchange(scope)
    if ex is None:
        return
    ex.violation = violation
    if denied or violation in DENIALS:
        ex.denied = denied or violation
