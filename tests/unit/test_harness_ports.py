"""The tests' port picker stays out of the kernel's ephemeral range (a port clash was seen there)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness import PORT_FLOOR, ephemeral_ports, free_port_block, listen_ports

ROOT = Path(__file__).resolve().parents[2]


def test_ports_handed_to_appliances_are_never_ephemeral_nor_handed_twice() -> None:
    ephemeral = ephemeral_ports()
    handed: list[int] = []
    for _ in range(300):
        base = free_port_block(4)
        handed += range(base, base + 4)
    assert not [p for p in handed if p in ephemeral or p < PORT_FLOOR]
    assert len(handed) == len(set(handed))


def test_the_ephemeral_range_is_read_from_the_kernel(tmp_path: Path) -> None:
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("20000\t45000\n")
    assert ephemeral_ports(setting) == range(20000, 45001)
    assert ephemeral_ports(tmp_path / "missing") == range(32768, 61000)  # Linux's default


def test_a_low_ephemeral_range_moves_test_ports_above_it() -> None:
    assert listen_ports(range(32768, 61000)) == range(PORT_FLOOR, 32768)
    assert listen_ports(range(1024, 40001)) == range(40001, 65536)


def test_no_test_or_benchmark_finds_a_port_by_binding_port_0() -> None:
    """Port 0 gives an ephemeral port; handed to a process later, it may be taken by then."""
    offenders = []
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "bind"
                    and node.args and isinstance(node.args[0], ast.Tuple) and len(node.args[0].elts) == 2
                    and isinstance(node.args[0].elts[1], ast.Constant) and node.args[0].elts[1].value == 0):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
