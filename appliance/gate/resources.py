"""Resource URIs as the policy sees them: one canonical spelling per resource.

A rule such as `resource:notes://1 = notes:read` must hold however the client spells the
URI. Two steps bring a URI to the form rules are written in:

- `canonical_uri` (appliance/uris.py): RFC 3986 normalisation, so `notes://%31` and
  `NOTES://1` name what `notes://1` names.
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
from typing import Any, Protocol

from appliance.uris import canonical_uri

logger = logging.getLogger("appliance.policy")


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
