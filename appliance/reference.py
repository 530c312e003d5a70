"""The configuration reference (README's table), generated from the Settings dataclasses."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

from appliance import config
from appliance.config import ENV_ALIASES, Settings, env_name, iter_keys


def _field_docs() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the `#:` comment above the field in config.py."""
    docs: dict[tuple[str, str], str] = {}
    source = inspect.getsource(config).splitlines()
    current_class = ""
    pending: list[str] = []
    for line in source:
        stripped = line.strip()
        if line.startswith("class "):
            current_class = line.split()[1].split("(")[0].rstrip(":")
            pending = []
        elif stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif ":" in stripped and not stripped.startswith(("#", '"', "def ", "return", "@")) and line.startswith("    ") and not line.startswith("        "):
            name = stripped.split(":", 1)[0].strip()
            if pending:
                docs[(current_class, name)] = " ".join(pending)
            pending = []
        elif not stripped.startswith("#"):
            pending = []
    return docs


def _type_name(hint: typing.Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in typing.get_args(hint))
    if origin is tuple:
        return "list of strings"
    return {int: "integer", float: "number", bool: "boolean", str: "string", Path: "path"}.get(hint, str(hint))


def _default(f: dataclasses.Field[typing.Any]) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (str, Path)):
        return f'`"{value}"`'
    return f"`{value}`"


def config_reference() -> str:
    """A Markdown table: key, type, default, environment variable, meaning."""
    docs = _field_docs()
    aliases = {key: name for name, key in ENV_ALIASES.items()}
    owners: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            else:
                owners[prefix + f.name] = cls.__name__

    walk(Settings, "")
    rows = ["| key | type | default | environment | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, f, hint in iter_keys():
        env = f"`{env_name(key)}`" + (f", `{aliases[key]}`" if key in aliases else "")
        doc = docs.get((owners[key], f.name), "")
        rows.append(f"| `{key}` | {_type_name(hint)} | {_default(f)} | {env} | {doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
