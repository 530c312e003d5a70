"""The configuration reference, generated from the Settings dataclasses: README's table and the example TOML.

    python -m appliance.reference --readme README.md --example conf/appliance.example.toml
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path

from appliance import config
from appliance.config import ENV_ALIASES, SERVER_INHERITS, ServerSettings, Settings, env_name, iter_keys


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
        return " \\| ".join(f"`{toml_value(a)}`" for a in typing.get_args(hint))
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


def _owners() -> dict[str, str]:
    """Dotted key -> name of the dataclass that declares it (the key of its `#:` doc)."""
    owners: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("source", "servers"):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            else:
                owners[prefix + f.name] = cls.__name__

    walk(Settings, "")
    return owners


def config_reference() -> str:
    """A Markdown table: key, type, default, environment variable, meaning."""
    docs = _field_docs()
    aliases = {key: name for name, key in ENV_ALIASES.items()}
    owners = _owners()
    rows = ["| key | type | default | environment | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, f, hint in iter_keys():
        env = f"`{env_name(key)}`" + (f", `{aliases[key]}`" if key in aliases else "")
        doc = docs.get((owners[key], f.name), "")
        rows.append(f"| `{key}` | {_type_name(hint)} | {_default(f)} | {env} | {doc} |")
    rows += _server_rows(docs)
    return "\n".join(rows) + "\n"


_SERVER_TYPES = {"command": "list of strings", "env": "table of strings", "env_files": "table of paths"}


def _server_rows(docs: dict[tuple[str, str], str]) -> list[str]:
    """The keys of a [servers.<name>] table (not set from the environment)."""
    hints = typing.get_type_hints(ServerSettings)
    rows = []
    for f in dataclasses.fields(ServerSettings):
        if f.name == "name":
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) is not None and type(None) in typing.get_args(hint):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kind = _SERVER_TYPES.get(f.name) or _type_name(hint)
        default = f"{SERVER_INHERITS[f.name]}" if f.name in SERVER_INHERITS else _default(f)
        if f.name in ("app", "command"):
            default = "—"
        elif f.name in ("env", "env_files"):
            default = "`{}`"
        rows.append(f"| `servers.<name>.{f.name}` | {kind} | {default} | — | {docs.get(('ServerSettings', f.name), '')} |")
    return rows


#: Keys the example shows commented out, and why: their default is decided when the appliance
#: runs, so writing today's value into a copied appliance.toml would pin it.
EXAMPLE_UNSET: dict[str, str] = {
    "version": "its default is the installed release",
}

EXAMPLE_HEADER = """\
# mcp-appliance configuration: every key, set to its built-in default.
# Generated from appliance/config.py by `python -m appliance.reference --example conf/appliance.example.toml`;
# do not edit (a test keeps it in sync with the code).
#
# Install as /etc/mcp-appliance/appliance.toml (or point --config / MCP_APPLIANCE_CONFIG
# at it) and keep only the keys you change: a missing key, table or file means the
# default. Every key can also be set from the environment as MCP_APPLIANCE_<TABLE>_<KEY>
# (e.g. MCP_APPLIANCE_WORKERS_COUNT=4; lists comma-separated); the environment wins over
# this file. Unknown keys and values of the wrong type are errors: `mcp-appliance check`
# names them. Files of secrets (keys, tokens, certificates) are shown where the appliance
# looks for them and read only when a setting uses them (auth.mode, tls.enabled, ...).
"""

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value: typing.Any) -> str:
    """`value` (a default of a Settings field) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        # A JSON string is a TOML basic string (no surrogate escapes with ensure_ascii=False).
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{k if _BARE_KEY.match(k) else toml_value(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML form for {value!r}")  # a new kind of setting: teach the generator


def _choices(hint: typing.Any) -> str:
    """What a key without a doc comment accepts, from its type."""
    if typing.get_origin(hint) is typing.Literal:
        return "One of " + ", ".join(toml_value(a) for a in typing.get_args(hint)) + "."
    return _type_name(hint).capitalize() + "."


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=98, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)


def _example_lines(cls: type, prefix: str, docs: dict[tuple[str, str], str]) -> Iterator[str]:
    """One table's keys (doc comment, then `key = default`), then its sub-tables."""
    hints = typing.get_type_hints(cls)
    aliases = {key: name for name, key in ENV_ALIASES.items()}
    tables = []
    for f in dataclasses.fields(cls):
        if f.name in ("source", "servers"):
            continue
        key, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            tables.append((key, hint))
            continue
        doc = docs.get((cls.__name__, f.name)) or _choices(hint)
        if key in aliases:
            doc += f" Also the environment variable {aliases[key]}."
        if key in EXAMPLE_UNSET:
            doc += f" Left unset here: {EXAMPLE_UNSET[key]}."
        yield from _comment(doc)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{key} has no default")  # every setting needs one: a missing file means defaults
        line = f"{f.name} = {toml_value(default)}"
        yield f"# {line}" if key in EXAMPLE_UNSET else line
    for key, table in tables:
        yield ""
        yield from _comment(inspect.getdoc(table) or "")
        yield f"[{key}]"
        yield from _example_lines(table, key + ".", docs)


def example_toml() -> str:
    """conf/appliance.example.toml: every key at its default, with its doc from config.py as a comment."""
    lines = list(_example_lines(Settings, "", _field_docs()))
    return EXAMPLE_HEADER + "\n" + "\n".join(lines) + "\n" + servers_example()


#: Values the example's server table shows where the default says nothing (empty, or "absent").
SERVER_EXAMPLE_VALUES: dict[str, typing.Any] = {
    "path": "/servers/calc/mcp",
    "app": "mypkg.calc:server",
    "command": ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/files"],
    "env": {"LOG_LEVEL": "info"},
    "env_files": {"GITHUB_TOKEN": "/etc/mcp-appliance/secrets/github-token"},
    "cwd": "/srv/files",
    "policy_rules": ["tool:add = calc:use"],
    "policy_default": "allow",
    "rate": 20,
    "burst": 40,
    "max_sessions": 1000,
    "max_sessions_per_principal": 10,
    "workers": 1,
}


def servers_example() -> str:
    """The example's server table, commented out (there is none by default: the [mcp] server is
    "default"): every key of ServerSettings; a stdio server's own keys commented twice, as the
    alternative to `app`."""
    lines = [
        "",
        "# More servers, each a table [servers.<name>] on a path of its own (default /servers/<name>/mcp),",
        "# hosted next to the [mcp] one (named \"default\"). Set in this file only: the environment does not",
        "# override server tables. Every key, explained in the README's table:",
        "#",
        "# [servers.calc]",
    ]
    for f in dataclasses.fields(ServerSettings):
        if f.name == "name":
            continue
        value = SERVER_EXAMPLE_VALUES.get(f.name, f.default)
        line = f"{f.name} = {toml_value(value)}"
        if f.name in SERVER_INHERITS:
            line = f"{line:<40} # absent: {SERVER_INHERITS[f.name]}"
        alternative = f.name == "command" or f.name in config.COMMAND_ONLY
        lines.append(("# # " if alternative else "# ") + line)
    return "\n".join(lines) + "\n"


BEGIN = "<!-- config-reference: generated by `python -m appliance.reference --readme README.md` -->"
END = "<!-- end of config-reference -->"


def update_readme(path: Path) -> None:
    """Replace the table between the markers in README.md with a fresh one."""
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{config_reference()}{END}{tail}")


def main(argv: list[str]) -> int:
    """--readme PATH and/or --example PATH (both at once after adding a setting), or the table on stdout."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m appliance.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, help="rewrite the table between the markers of this README")
    parser.add_argument("--example", type=Path, help="write the example appliance.toml here")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme(args.readme)
    if args.example:
        args.example.write_text(example_toml())
    if not (args.readme or args.example):
        print(config_reference(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
