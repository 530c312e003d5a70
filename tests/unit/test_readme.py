"""README.md and conf/appliance.example.toml are what operators read: both must match the code."""

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from appliance.config import ENV_ALIASES, ENV_PREFIX
from appliance.reference import BEGIN, END, _example_lines, config_reference, example_toml

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = README.parent / "conf" / "appliance.example.toml"


def test_readme_configuration_reference_lists_every_key_as_the_code_defines_it() -> None:
    text = README.read_text()
    assert BEGIN in text and END in text, "README lost its config-reference markers"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == config_reference().strip(), (
        "README's configuration table is stale: run `python -m appliance.reference --readme README.md`"
    )


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "sudo bash scripts/test.sh" in README.read_text()
    assert "bash scripts/test.sh" in ci


def test_example_config_is_generated_from_the_settings() -> None:
    assert EXAMPLE.read_text() == example_toml(), (
        "conf/appliance.example.toml is stale: run `python -m appliance.reference --example conf/appliance.example.toml`"
    )


def test_example_config_passes_mcp_appliance_check() -> None:
    # Only this file: no MCP_APPLIANCE_* or seed variable of the test's own environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k not in ENV_ALIASES}
    result = subprocess.run([sys.executable, "-m", "appliance", "--config", str(EXAMPLE), "check"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {EXAMPLE}"), result.stdout


@dataclasses.dataclass(frozen=True)
class _Inner:
    """A sub-table."""

    weights: dict[str, int] = dataclasses.field(default_factory=lambda: {"a": 1, "b-c": 2, "d e": 3})


@dataclasses.dataclass(frozen=True)
class _Outer:
    """A table whose keys come before its sub-table, as TOML requires."""

    label: str = 'say "hi" \\ tschüss'
    ratio: float = 0.5
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_example_generator_writes_valid_toml_for_new_kinds_of_settings() -> None:
    text = "\n".join(_example_lines(_Outer, "", {}))
    assert tomllib.loads(text) == {"label": 'say "hi" \\ tschüss', "ratio": 0.5,
                                   "inner": {"weights": {"a": 1, "b-c": 2, "d e": 3}}}


def test_readme_command_blocks_are_the_ones_the_booted_host_test_runs() -> None:
    """tests/deploy/test_install.py runs every marked block verbatim; an unmarked new block would go untested."""
    from tests.deploy.readme_commands import BLOCKS, readme_blocks

    assert sorted(readme_blocks()) == sorted(BLOCKS)


def test_install_sh_closing_message_prints_the_readme_first_steps() -> None:
    from tests.deploy.readme_commands import readme_blocks

    install = (README.parent / "install.sh").read_text()
    message = install.split("<<'MSG'", 1)[1].split("\nMSG", 1)[0]
    for command in readme_blocks()["first-steps"]:
        assert f"\n    {command}\n" in message, f"install.sh's closing message lacks {command!r}"


def test_readme_and_install_sh_never_show_curl_with_a_bare_port() -> None:
    """Debian 12's curl 7.88 refuses `curl :80/health` ("URL using bad/illegal format")."""
    for path in (README, README.parent / "install.sh"):
        assert "curl :" not in path.read_text(), path.name
