"""The gate's metrics sink writes every count into the worker's multiprocess files at once.

Run in a child process: prometheus-client picks its multiprocess value class when it is
first imported, from PROMETHEUS_MULTIPROC_DIR, as in a worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from appliance.gate.exchange import Exchange
from appliance.gate.jsonrpc import RpcCall
from appliance.gate.metrics import RequestMetrics
from appliance.metrics import GateMetrics

sink = RequestMetrics(GateMetrics(0))
for n, (duration, answer) in enumerate([(0.0004, ("result", False)), (0.3, ("result", True)), (70.0, ("result", False))]):
    ex = Exchange(started=0.0, http_method="POST", status=200, answer=answer, authz=("allowed", "authenticated"))
    ex.rpc = RpcCall(method="tools/call", id=n, kind="tool", name="add")
    sink(ex, duration)
registry = CollectorRegistry()
MultiProcessCollector(registry, sys.argv[1])  # what the admin app's /metrics reads: the files only
print(json.dumps({f"{s.name}{sorted(s.labels.items())}": s.value for m in registry.collect() for s in m.samples}))
"""


def test_every_count_of_a_recorded_request_is_in_the_multiprocess_files(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    samples = json.loads(out.stdout)

    def value(name: str, **labels: str) -> float:
        return samples[f"{name}{sorted(labels.items())}"]  # type: ignore[no-any-return]

    assert value("mcp_appliance_requests_total", server="default", method="tools/call", status="200") == 3
    assert value("mcp_appliance_tool_calls_total", server="default", tool="add", outcome="ok") == 2
    assert value("mcp_appliance_tool_calls_total", server="default", tool="add", outcome="tool_error") == 1
    assert value("mcp_appliance_authz_decisions_total", decision="allowed", reason="authenticated") == 3
    for name, labels in (("mcp_appliance_request_duration_seconds", {"server": "default", "method": "tools/call"}),
                         ("mcp_appliance_tool_call_duration_seconds", {"server": "default", "tool": "add"})):
        assert value(f"{name}_count", **labels) == 3
        assert abs(value(f"{name}_sum", **labels) - 70.3004) < 1e-9
        # Buckets are cumulative: 0.0004 s in the first, 0.3 s from 0.5 up, 70 s only in +Inf.
        assert value(f"{name}_bucket", le="0.001", **labels) == 1
        assert value(f"{name}_bucket", le="0.5", **labels) == 2
        assert value(f"{name}_bucket", le="60.0", **labels) == 2
        assert value(f"{name}_bucket", le="+Inf", **labels) == 3
