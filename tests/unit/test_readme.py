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
