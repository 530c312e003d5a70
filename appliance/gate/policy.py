"""Tool policy: which scopes a tool, resource or prompt requires, enforced per call and in lists.

Rules come from policy.rules ("tool:delete_* = notes:write"); the first rule whose kind
and pattern match decides. A call without a required scope gets 403 and a JSON-RPC
error naming the scope; list results hide what the caller may not use.

Resource rules do not depend on spelling: a URI is decided as sent, in its RFC 3986
canonical form and as the resource the hosted app resolves it to (appliance/gate/resources.py),
and every one of these must be allowed. While some rule could refuse the caller, a request
the gate cannot classify (a batch, an unknown method naming something, a named call without
its name, a URI the gate cannot spell canonically) is refused and counted, never passed on.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.config import PolicySettings, split_rule
from appliance.gate.auth import Principal
from appliance.gate.exchange import exchange, flag
from appliance.gate.jsonrpc import INVALID_PARAMS, BodyRewriter, RpcCall
from appliance.gate.resources import CanonicalOnly, ResourceResolver, Unresolvable
from appliance.gate.responses import INVALID_REQUEST, send_rpc_error
from appliance.uris import canonical_uri

FORBIDDEN = -32003

#: List methods whose results are filtered: method -> (result key, kind, item key naming it).
LISTS: dict[str, tuple[str, str, str]] = {
    "tools/list": ("tools", "tool", "name"),
    "prompts/list": ("prompts", "prompt", "name"),
    "resources/list": ("resources", "resource", "uri"),
    "resources/templates/list": ("resourceTemplates", "resource", "uriTemplate"),
}


@dataclass(frozen=True)
class Rule:
    """One parsed rule."""

    kind: str
    pattern: str
    scopes: tuple[str, ...]
    regex: re.Pattern[str]


@dataclass(frozen=True)
class Decision:
    """allowed, and why (reason), and the first missing scope when refused."""

    allowed: bool
    reason: str
    missing: str | None = None
    required: tuple[str, ...] = ()
    #: Why a URI could not be decided (reason "uncanonical").
    detail: str | None = None


class Policy:
    """The rules, matched with a small cache (names come from clients, so the cache is bounded)."""

    CACHE_SIZE = 2048

    def __init__(self, settings: PolicySettings, resources: ResourceResolver | None = None) -> None:
        self.rules = [self._rule(text) for text in settings.rules]
        self.default_allow = settings.default == "allow"
        self.filter_lists = settings.filter_lists
        self.resources = resources or CanonicalOnly()
        self._cache: dict[tuple[str, str], Rule | None] = {}

    @staticmethod
    def _rule(text: str) -> Rule:
        kind, pattern, scopes = split_rule(text)
        return Rule(kind, pattern, scopes, re.compile(fnmatch.translate(pattern)))

    def rule_for(self, kind: str, name: str) -> Rule | None:
        """The first rule matching `name` of `kind`, or None."""
        key = (kind, name)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = next((r for r in self.rules if r.kind == kind and r.regex.match(name)), None)
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = found
        return found

    def decide(self, principal: Principal, kind: str, name: str | None, resolve: bool = True) -> Decision:
        """May `principal` use the `kind` named `name` (a resource however its URI is spelled)?

        resolve=False for URIs that are not a client's spelling of a resource: URI templates
        (completion refs) and the server's own list items.
        """
        if kind != "resource" or name is None:
            return self._decide_one(principal, kind, name)
        spellings = [name, canonical_uri(name)]
        # The app resolves the URI as sent; its canonical form too, in case the app is more lenient than the SDK.
        for sent in dict.fromkeys(spellings) if resolve else ():
            resolved = self.resources.resolve(sent)
            if isinstance(resolved, Unresolvable):
                if sent == name and self.restricts(principal, "resource"):
                    return Decision(False, "uncanonical", detail=resolved.why)
            elif resolved is not None:
                spellings.append(resolved)
        decision = Decision(True, "no_rule")
        for spelling in dict.fromkeys(spellings):
            decision = self._decide_one(principal, kind, spelling)
            if not decision.allowed:
                return decision
        return decision

    def _decide_one(self, principal: Principal, kind: str, name: str | None) -> Decision:
        rule = self.rule_for(kind, name) if name is not None else None
        if rule is None:
            if self.default_allow or principal.everything:
                return Decision(True, "no_rule")
            return Decision(False, "default_deny")
        for scope in rule.scopes:
            if not principal.has(scope):
                return Decision(False, "missing_scope", scope, rule.scopes)
        return Decision(True, "scope", required=rule.scopes)

    def restricts(self, principal: Principal, kind: str | None = None) -> bool:
        """Whether some rule (of `kind`, when given) could refuse or hide something from `principal`."""
        if principal.everything:
            return False
        return not self.default_allow or any(not principal.has(s) for r in self.rules
                                             if kind is None or r.kind == kind for s in r.scopes)

    def filtered(self, principal: Principal, method: str, message: Any) -> Any:
        """A list response without the items `principal` may not use."""
        key, kind, item_key = LISTS[method]
        result = message.get("result") if isinstance(message, dict) else None
        items = result.get(key) if isinstance(result, dict) else None
        if not isinstance(items, list):
            return message
        kept = [i for i in items if not isinstance(i, dict) or not isinstance(i.get(item_key), str)
                or self.decide(principal, kind, i[item_key], resolve=False).allowed]
        return {**message, "result": {**result, key: kept}}


def _refusal(kind: str, name: str | None, decision: Decision) -> tuple[str, dict[str, Any]]:
    label = f"{kind} {name!r}" if name is not None else f"this {kind}"
    if decision.missing:
        return (f"Forbidden: {label} requires scope '{decision.missing}'",
                {"required_scope": decision.missing, "required_scopes": list(decision.required), kind: name})
    if decision.detail:
        return f"Forbidden: {label} cannot be checked against policy.rules: {decision.detail}", {kind: name}
    return f"Forbidden: no policy rule allows {label}", {kind: name}


class PolicyCheck:
    """403 for calls the principal lacks a scope for; filtered list results; unclassifiable calls refused."""

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = exchange(scope)
        rpc = ex.rpc if ex is not None else None
        if rpc is None or ex is None or ex.principal is None:
            await self.app(scope, receive, send)
            return
        principal = ex.principal
        if self.policy.restricts(principal):
            unclassified = "a batch" if rpc.batch else rpc.unclassified
            if unclassified is not None:
                ex.authz = ("denied", "unclassified")
                flag(scope, "policy", denied="unclassified")
                code = INVALID_PARAMS if rpc.kind is not None else INVALID_REQUEST
                await send_rpc_error(send, 400, code, f"Refused: the gate cannot apply policy.rules to {unclassified}",
                                     rpc.id, {"reason": "unclassified"})
                return
        for call in rpc.batch or (rpc,):
            if call.kind is None:
                continue
            for subject in call.subjects or (None,):
                decision = self.policy.decide(principal, call.kind, subject,
                                              resolve=call.method != "completion/complete")
                ex.authz = ("allowed" if decision.allowed else "denied", decision.reason)
                if not decision.allowed:
                    await self._refuse(scope, send, call, subject, decision)
                    return
        if self.policy.filter_lists and rpc.method in LISTS and self.policy.restricts(principal):
            method = rpc.method
            send = BodyRewriter(send, lambda message: self.policy.filtered(principal, method, message))
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, call: RpcCall, subject: str | None, decision: Decision) -> None:
        flag(scope, "policy", denied=decision.reason)
        message, data = _refusal(call.kind or "call", subject, decision)
        await send_rpc_error(send, 403, FORBIDDEN, message, call.id, data)
