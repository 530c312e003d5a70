"""Every metric an alert uses (conf/prometheus/alerts.yml) moves when its condition happens.

Each test makes the condition real on a real appliance (load, a new worker, a worker that
stops answering, a worker killed in the middle of a call, a full audit disk) and sees the
change in /metrics. tests/unit/test_dashboards.py keeps the registry of which test moves
which metric, and fails when an alert uses a metric that no test moves.

One appliance with one worker serves the module; the tests that stop or kill it run last.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.pool import worker_socket
from tests.harness import Appliance, http, new_appliance, running, wait_until
from tests.integration.clients import modern_request
from tests.integration.gatekit import call
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, Any], float]


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    with running(new_appliance(1, max_workers=2)) as app:  # room to scale to 2 for the memory test
        yield app


def search(app: Appliance, count: int) -> None:
    """`count` successful tool calls through nginx."""
    for _ in range(count):
        assert call(app, "tools/call", "search_notes", {"arguments": {"query": "alert"}})[0] == 200


def kernel_cpu_seconds(pid: int) -> float:
    """user + system CPU of `pid` as the kernel accounts it (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_cpu_and_memory_limits_alerts_divide_by_are_the_machines(appliance: Appliance) -> None:
    samples = scrape(appliance)
    cpus = float(os.cpu_count() or 1)
    quota = Path("/sys/fs/cgroup/cpu.max")
    if quota.exists() and quota.read_text().split()[0] != "max":
        used, period = quota.read_text().split()
        cpus = min(cpus, int(used) / int(period))
    assert total(samples, "mcp_appliance_cpu_limit") == cpus
    mem_total = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1]) * 1024  # type: ignore[index]
    memory = Path("/sys/fs/cgroup/memory.max")
    limit = int(memory.read_text()) if memory.exists() and memory.read_text().strip().isdigit() else mem_total
    assert total(samples, "mcp_appliance_memory_limit_bytes") == min(limit, mem_total)


def test_nginx_counts_every_request_it_serves(appliance: Appliance) -> None:
    before = total(scrape(appliance), "mcp_appliance_nginx_http_requests_total")
    search(appliance, 10)
    after = total(scrape(appliance), "mcp_appliance_nginx_http_requests_total")
    assert after >= before + 10


def test_a_workers_cpu_seconds_are_the_kernels_and_grow_while_it_serves(appliance: Appliance) -> None:
    pid = appliance.worker_pid(0)
    first = total(scrape(appliance), "mcp_appliance_process_cpu_seconds_total", program="worker-00")
    search(appliance, 50)
    low = kernel_cpu_seconds(pid)
    reported = total(scrape(appliance), "mcp_appliance_process_cpu_seconds_total", program="worker-00")
    high = kernel_cpu_seconds(pid)
    # The scrape read the kernel's figure while the worker ran (psutil adds user and system as floats).
    assert low - 1e-6 <= reported <= high + 1e-6, (low, reported, high)
    assert reported > first, (first, reported)


def test_a_new_worker_adds_its_memory_to_the_appliances_total(appliance: Appliance) -> None:
    metric = "mcp_appliance_process_resident_memory_bytes"
    before = total(scrape(appliance), metric)
    assert appliance.command("scale", "2", timeout=180).returncode == 0
    try:
        appliance.wait_healthy(timeout=120, workers=2)
        samples = scrape(appliance)
        new_worker = total(samples, metric, program="worker-01")
        assert new_worker > 10 * 2**20  # a whole Python process: tens of MiB
        assert total(samples, metric) - before >= new_worker / 2, (before, total(samples, metric), new_worker)
    finally:
        assert appliance.command("scale", "1", timeout=180).returncode == 0
        appliance.wait_healthy(timeout=120, workers=1)
    assert not [ls for n, ls in scrape(appliance) if n == metric and dict(ls)["program"] == "worker-01"]


def test_workers_ready_falls_to_zero_when_the_only_worker_stops_answering(appliance: Appliance) -> None:
    metric = "mcp_appliance_workers_ready"
    pid = appliance.worker_pid(0)
    assert total(scrape(appliance), metric) == 1
    os.kill(pid, signal.SIGSTOP)  # alive for supervisord, silent for the health probe
    try:
        wait_until(lambda: total(scrape(appliance), metric) == 0, 30, "workers_ready 0 while the worker is stopped")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: total(scrape(appliance), metric) == 1, 30, "workers_ready 1 again")


def request_waiting_on(sock: Path) -> bool:
    """Whether a connection to the worker's unix socket (only nginx uses it) holds unread data
    or waits to be accepted: nginx has sent a request the worker has not read."""
    listing = subprocess.run(["ss", "-xan"], capture_output=True, text=True, check=True).stdout
    return any(line.split()[2] != "0" for line in listing.splitlines() if f" {sock} " in f" {line} ")


def test_a_worker_killed_in_the_middle_of_a_call_counts_a_5xx_and_a_restart(appliance: Appliance) -> None:
    """Last: kills the worker."""
    pid = appliance.worker_pid(0)
    before = scrape(appliance)
    headers, body = modern_request("tools/call", "list_notes", {"name": "list_notes", "arguments": {}})
    answer: dict[str, Any] = {}
    client = threading.Thread(target=lambda: answer.update(r=http("POST", appliance.mcp_url, body, headers, timeout=60)))
    os.kill(pid, signal.SIGSTOP)
    try:
        client.start()
        wait_until(lambda: request_waiting_on(worker_socket(appliance.run_dir, 0)), 30,
                   "the call reached the stopped worker's socket")
    finally:
        os.kill(pid, signal.SIGKILL)
    client.join(60)
    status, _, raw = answer["r"]
    # 502 with a JSON-RPC error: the call reached the worker and may have run (see nginx.conf.j2).
    assert status == 502 and "error" in json.loads(raw), (status, raw)

    def counted() -> Samples | None:
        samples = scrape(appliance)
        restarted = total(samples, "mcp_appliance_worker_restarts_total", worker="0") > \
            total(before, "mcp_appliance_worker_restarts_total", worker="0")
        errors = total(samples, "mcp_appliance_http_errors_total", status="502") > \
            total(before, "mcp_appliance_http_errors_total", status="502")
        return samples if restarted and errors else None

    wait_until(counted, 30, "the 502 and the worker's restart counted in /metrics")
    appliance.wait_healthy(timeout=60, workers=1)


# --- audit write errors: the audit disk fills up ----------------------------------------------


def mount_tiny_tmpfs(path: Path, owner: str) -> bool:
    """A 256 KiB tmpfs at `path` owned by `owner` (the user the workers run as); False if not allowed."""
    path.mkdir(parents=True)
    user = pwd.getpwnam(owner) if os.geteuid() == 0 else pwd.getpwuid(os.getuid())
    options = f"size=256k,mode=0750,uid={user.pw_uid},gid={user.pw_gid}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def fill(directory: Path) -> None:
    """Write zeros into `directory` until its file system is full."""
    with open(directory / "filler", "wb", buffering=0) as out:
        try:
            while out.write(b"\0" * 4096):
                pass
        except OSError:
            return


def test_audit_records_that_cannot_be_written_are_counted(make_appliance: Callable[..., Appliance]) -> None:
    app = make_appliance(1)
    audit = Path(app.settings["log_dir"]) / "audit"
    if not mount_tiny_tmpfs(audit, app.settings.get("user", "mcp-appliance")):
        pytest.skip("mounting a tmpfs needs root")
    try:
        app.start()
        app.wait_healthy(timeout=60, workers=1)
        before = total(scrape(app), "mcp_appliance_audit_write_errors_total")
        fill(audit)

        def failures_counted() -> bool:
            call(app, "tools/call", "search_notes", {"arguments": {"query": "full"}})  # answered or refused
            return total(scrape(app), "mcp_appliance_audit_write_errors_total") > before

        # Appends may still fit in the audit file's last page for a few records.
        wait_until(failures_counted, 60, "audit write errors counted while the audit disk is full", interval=0.2)
    finally:
        app.stop()
        subprocess.run(["umount", str(audit)], check=True)
