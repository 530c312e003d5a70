"""Resource URIs as the policy sees them: one canonical spelling per resource.

A rule such as `resource:notes://1 = notes:read` must hold however the client spells the
URI. Two steps bring a URI to the form rules are written in:

- `canonical_uri`: RFC 3986 §6.2.2 syntax-based normalisation (scheme and host in lower
  case, percent-encoded unreserved characters decoded, other escapes in upper-case hex,
  dot segments removed) plus §6.2.3 for http(s)/ws(s) (default port and empty path), and
  characters a URI cannot hold percent-encoded as UTF-8 (RFC 3987 §3.1), so `notes://%31`,
  `NOTES://1` and `notes://1/./` name what `notes://1` names.
- a `ResourceResolver` for the hosted app: for an `MCPServer` it finds the resource the
  server itself would serve (a concrete resource, else the first matching template, its
  parameters validated as the SDK validates them) and spells it back from the template,
  so `notes://01`, `notes://+1` and `notes://1%20` (note 1 to the notes server) are
  `notes://1`. For other ASGI apps only `canonical_uri` is known: a spelling that is not
  already canonical cannot be vouched for and is refused while resource rules apply.
"""

from __future__ import annotations

import enum
import logging
import re
from typing import Any, Protocol

logger = logging.getLogger("appliance.policy")

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: Characters a URI may hold literally (unreserved, gen-delims, sub-delims); "%" is handled apart.
_URI_CHARS = _UNRESERVED | frozenset(":/?#[]@!$&'()*+,;=")
_HEX = "0123456789ABCDEFabcdef"
#: RFC 3986 Appendix B, with the scheme held to its grammar (ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )).
_PARTS = re.compile(r"^(?:([A-Za-z][A-Za-z0-9+.-]*):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$", re.DOTALL)
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _escapes(text: str) -> str:
    """Percent-escapes normalised: unreserved ones decoded, the rest upper-case; stray bytes encoded."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%" and i + 2 < len(text) and text[i + 1] in _HEX and text[i + 2] in _HEX:
            decoded = chr(int(text[i + 1 : i + 3], 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + text[i + 1 : i + 3].upper())
            i += 3
            continue
        if ch in _URI_CHARS:
            out.append(ch)
        else:  # "%" not starting an escape, spaces, controls, non-ASCII: their UTF-8 bytes, escaped
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4."""
    out: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith("./"):
            path = path[2:]
        elif path.startswith("/./"):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            if out:
                out.pop()
        elif path == "/..":
            path = "/"
            if out:
                out.pop()
        elif path in (".", ".."):
            path = ""
        else:
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end < 0 else end
            out.append(path[:end])
            path = path[end:]
    return "".join(out)


def _normalised_once(uri: str) -> str:
    match = _PARTS.match(uri)
    assert match is not None  # every group is optional: any string matches
    scheme, authority, path, query, fragment = match.groups()
    scheme = scheme.lower() if scheme else None
    out = f"{scheme}:" if scheme else ""
    if authority is not None:
        userinfo, at, hostport = authority.rpartition("@")
        host, port = hostport, None
        bracket = hostport.rfind("]")
        colon = hostport.rfind(":")
        if colon > bracket and re.fullmatch(r"[0-9]*", hostport[colon + 1 :]):
            host, port = hostport[:colon], hostport[colon + 1 :]
        host = _escapes(host)
        # Host names are case-insensitive; upper-case escapes in them stay upper-case (§6.2.2.1).
        host = re.sub(r"[^%]+|%[0-9A-F]{2}", lambda m: m[0] if m[0].startswith("%") else m[0].lower(), host)
        if port is not None:
            port = str(int(port)) if port else ""
            if not port or _DEFAULT_PORTS.get(scheme or "") == port:
                port = None
        out += "//" + (_escapes(userinfo) + "@" if at else "") + host + (f":{port}" if port is not None else "")
    path = _escapes(path)
    if scheme or authority is not None:
        path = _remove_dot_segments(path)
    if authority is not None and not path and scheme in _DEFAULT_PORTS:
        path = "/"
    out += path
    if query is not None:
        out += "?" + _escapes(query)
    if fragment is not None:
        out += "#" + _escapes(fragment)
    return out


def canonical_uri(uri: str) -> str:
    """The RFC 3986 normal form of `uri` (see the module docstring); idempotent."""
    # Decoding can complete a scheme ("%6Eotes://1"): normalise again until nothing changes.
    for _ in range(4):
        again = _normalised_once(uri)
        if again == uri:
            break
        uri = again
    return uri


class Unresolvable:
    """A URI that names a resource of the hosted app in a form the gate cannot spell back."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"Unresolvable({self.why!r})"


class ResourceResolver(Protocol):
    """The canonical URI of what the hosted app would serve for `uri` (None: nothing, it is unknown)."""

    def resolve(self, uri: str) -> str | None | Unresolvable: ...


class CanonicalOnly:
    """Any ASGI app: only RFC 3986 equivalence is known, so only the canonical spelling is vouched for."""

    def resolve(self, uri: str) -> str | None | Unresolvable:
        canonical = canonical_uri(uri)
        if canonical != uri:
            return Unresolvable(f"not in canonical form: use {canonical!r}")
        return canonical


def _spelled(value: Any) -> str | list[str] | None:
    """A validated template parameter as the template's own text (None: not a plain value)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(int(value)) if isinstance(value, int) else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        items = [_spelled(v) for v in value]
        return [i for i in items if isinstance(i, str)] if all(isinstance(i, str) for i in items) else None
    import pydantic_core

    plain = pydantic_core.to_jsonable_python(value, fallback=lambda _: None)
    return plain if isinstance(plain, str) else None


class SdkResources:
    """An `MCPServer`'s resources, looked up as its resource manager does (templates may change at run time)."""

    def __init__(self, server: Any) -> None:
        self.manager = getattr(server, "_resource_manager", None)
        self.usable = self.manager is not None and hasattr(self.manager, "_resources") \
            and hasattr(self.manager, "list_templates")
        if not self.usable:
            logger.error("this mcp SDK hides its resource manager: resource URIs are refused while "
                         "resource rules apply")
        self._models: dict[int, tuple[Any, Any]] = {}

    def _arguments(self, template: Any) -> Any:
        """The pydantic model of a template function's parameters (as the SDK builds it), cached."""
        cached = self._models.get(id(template))
        if cached is not None and cached[0] is template:
            return cached[1]
        from mcp.server.mcpserver.utilities.func_metadata import func_metadata

        fn = getattr(template.fn, "__wrapped__", template.fn)  # the SDK wraps it in validate_call
        skip = [template.context_kwarg] if template.context_kwarg else []
        model = func_metadata(fn, skip_names=skip, structured_output=False).arg_model
        self._models[id(template)] = (template, model)
        return model

    def resolve(self, uri: str) -> str | None | Unresolvable:
        if not self.usable:
            return Unresolvable("the SDK's resources cannot be inspected")
        from pydantic import ValidationError

        from mcp.server.mcpserver.resources.templates import ResourceSecurityError

        if uri in self.manager._resources:
            return uri
        for template in self.manager.list_templates():
            try:
                params = template.matches(uri)
            except ResourceSecurityError:
                return None  # the SDK answers "Unknown resource"
            if params is None:
                continue
            try:
                validated = self._arguments(template).model_validate(params)
            except ValidationError:
                return None  # the SDK fails the read the same way: nothing is served
            spelled = {}
            for name in params:
                text = _spelled(getattr(validated, name, None))
                if text is None:
                    return Unresolvable(f"parameter {name!r} of {template.uri_template!r} has no plain spelling")
                spelled[name] = text
            try:
                return canonical_uri(template.parsed_template.expand(spelled))
            except (TypeError, ValueError) as exc:
                return Unresolvable(f"{template.uri_template!r} cannot spell it back: {exc}")
        return None


def hosted_resources(app_spec: str) -> ResourceResolver:
    """The resolver for the hosted app named by mcp.app (already imported by the worker)."""
    from mcp.server.mcpserver import MCPServer

    from appliance.worker import import_target  # here: the worker module imports the gate

    target = import_target(app_spec)
    return SdkResources(target) if isinstance(target, MCPServer) else CanonicalOnly()
