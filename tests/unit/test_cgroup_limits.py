"""The limits the CPU and memory alerts divide by come from the appliance's own cgroup, where systemd writes them."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from appliance.scrape import _own_cgroups, cpu_limit, memory_limit


def fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    unit = root / "system.slice" / "mcp-appliance.service"
    unit.mkdir(parents=True)
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/system.slice/mcp-appliance.service\n")
    return root, proc


def test_a_systemd_units_memory_max_and_cpu_quota_are_the_limits(tmp_path: Path) -> None:
    root, proc = fake_tree(tmp_path)
    unit = root / "system.slice" / "mcp-appliance.service"
    (unit / "memory.max").write_text("1073741824\n")
    (unit / "cpu.max").write_text("150000 100000\n")
    (root / "system.slice" / "memory.max").write_text("max\n")
    cgroups = _own_cgroups(root, proc)
    assert cgroups == [unit, root / "system.slice", root]
    assert memory_limit(cgroups) == min(1073741824, psutil.virtual_memory().total)
    assert cpu_limit(cgroups) == min(1.5, float(os.cpu_count() or 1))


def test_a_parents_tighter_limit_binds_the_unit_too(tmp_path: Path) -> None:
    root, proc = fake_tree(tmp_path)
    (root / "system.slice" / "mcp-appliance.service" / "memory.max").write_text("max\n")
    (root / "system.slice" / "memory.max").write_text("536870912\n")
    (root / "system.slice" / "cpu.max").write_text("50000 100000\n")
    cgroups = _own_cgroups(root, proc)
    assert memory_limit(cgroups) == 536870912
    assert cpu_limit(cgroups) == 0.5


def test_without_limits_the_machine_is_the_limit(tmp_path: Path) -> None:
    root, proc = fake_tree(tmp_path)
    cgroups = _own_cgroups(root, proc)
    assert memory_limit(cgroups) == psutil.virtual_memory().total
    assert cpu_limit(cgroups) == float(os.cpu_count() or 1)


def test_a_container_whose_cgroup_is_the_mount_root_reads_the_root(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/\n")
    (root / "memory.max").write_text("268435456\n")
    assert _own_cgroups(root, proc) == [root]
    assert memory_limit(_own_cgroups(root, proc)) == 268435456
