"""The benchmark and the tests share one set of helpers (the `tests` package) without sys.path tricks.

The benchmark runs as the README says, `python -m bench.<module>` from the repo root: the
repo root is then on the import path, so `bench` imports `tests.harness` and the tests
import `bench.wrk` as ordinary packages.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "bench").rglob("*.py"), *(ROOT / "tests").rglob("*.py")])


def test_no_benchmark_or_test_module_changes_the_import_path() -> None:
    offenders = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                    and node.value.id == "sys":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["bench.run", "bench.ratios", "bench.gate_overhead", "bench.gate_layers",
                                    "bench.baseline", "bench.stdio", "bench.worker_ab"])
def test_benchmark_commands_start_from_the_repo_root(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
