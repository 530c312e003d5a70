"""The Dockerfile read as data, so tests hold the image to what its instructions promise."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


@dataclass
class Stage:
    """One FROM … stage: its base, its name and its instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        """The argument text of every `instruction` in this stage."""
        return [text for name, text in self.instructions if name == instruction]

    def exec_form(self, instruction: str) -> list[str]:
        """The JSON (exec) form of the last `instruction`, e.g. CMD ["a", "b"]."""
        return json.loads(self.args(instruction)[-1])

    @property
    def env(self) -> dict[str, str]:
        """ENV key=value pairs, later ones winning ($VARS are left as written)."""
        env: dict[str, str] = {}
        for text in self.args("ENV"):
            for pair in shlex.split(text):
                key, _, value = pair.partition("=")
                env[key] = value
        return env

    @property
    def healthcheck(self) -> list[str]:
        """The HEALTHCHECK's command in exec form."""
        text = self.args("HEALTHCHECK")[-1]
        return json.loads(text.split(" CMD ", 1)[1])


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    """Every stage of the Dockerfile; comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result: list[Stage] = []
    for line in filter(str.strip, logical):
        name, _, text = line.strip().partition(" ")
        name, text = name.upper(), " ".join(text.split())
        if name == "FROM":
            words = text.split()
            result.append(Stage(base=words[0], name=words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif result:
            result[-1].instructions.append((name, text))
    return result


def runtime_stage(path: Path = DOCKERFILE) -> Stage:
    """The stage the image is made of: the last one."""
    return stages(path)[-1]
