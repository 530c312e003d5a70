"""README.md is what operators read: its configuration reference must match the code."""

from pathlib import Path

from appliance.reference import BEGIN, END, config_reference

README = Path(__file__).resolve().parents[2] / "README.md"


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
