"""The Grafana dashboard and the Prometheus rules use only metrics that /metrics exports,
and every metric an alert uses has an integration test that makes it move.

`exported_names()` is the set of sample names the appliance exports; the integration
test test_metrics.py checks that a real scrape contains every one of them. Dashboards and
alerts may also use what only an appliance with a stdio server exports (ALL_EXPORTED).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import ServerSettings, Settings
from appliance.scrape import exported_names

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
DASHBOARD = CONF / "grafana" / "dashboards" / "mcp-appliance.json"
ALERTS = CONF / "prometheus" / "alerts.yml"
PROMETHEUS = CONF / "prometheus" / "prometheus.yml"
METRIC = re.compile(r"\b(mcp_appliance_[a-z0-9_]+)")
#: Series Prometheus makes itself.
PROMETHEUS_OWN = {"up"}

#: Every metric an alert uses -> the integration test that makes its condition happen on a real
#: appliance and sees the metric change in /metrics. An alert on a metric without one fails below.
MOVED_BY = {
    "mcp_appliance_process_cpu_seconds_total":
        "tests/integration/test_alert_metrics.py::test_a_workers_cpu_seconds_are_the_kernels_and_grow_while_it_serves",
    "mcp_appliance_cpu_limit":
        "tests/integration/test_alert_metrics.py::test_the_cpu_and_memory_limits_alerts_divide_by_are_the_machines",
    "mcp_appliance_process_resident_memory_bytes":
        "tests/integration/test_alert_metrics.py::test_a_new_worker_adds_its_memory_to_the_appliances_total",
    "mcp_appliance_memory_limit_bytes":
        "tests/integration/test_alert_metrics.py::test_the_cpu_and_memory_limits_alerts_divide_by_are_the_machines",
    "mcp_appliance_http_errors_total":
        "tests/integration/test_alert_metrics.py::test_a_worker_killed_in_the_middle_of_a_call_counts_a_5xx_and_a_restart",
    "mcp_appliance_nginx_http_requests_total":
        "tests/integration/test_alert_metrics.py::test_nginx_counts_every_request_it_serves",
    "mcp_appliance_worker_restarts_total":
        "tests/integration/test_metrics.py::test_counters_survive_a_worker_crash_and_the_restart_is_counted",
    "mcp_appliance_workers_ready":
        "tests/integration/test_alert_metrics.py::test_workers_ready_falls_to_zero_when_the_only_worker_stops_answering",
    "mcp_appliance_audit_write_errors_total":
        "tests/integration/test_alert_metrics.py::test_audit_records_that_cannot_be_written_are_counted",
    "mcp_appliance_storage_errors_total":
        "tests/integration/test_full_disk.py::test_a_full_data_disk_makes_add_note_say_storage_full_while_reads_work",
    "mcp_appliance_trace_spans_dropped_total":
        "tests/integration/test_tracing.py::test_a_receiver_that_is_down_or_slow_never_fails_a_call_and_drops_are_counted",
    "mcp_appliance_stdio_crash_looping":
        "tests/integration/test_bridge_supervision.py::test_a_crash_looping_server_is_reported_and_refused_with_503",
    "mcp_appliance_security_violations_total":
        "tests/integration/test_metrics.py::test_requests_tools_authz_and_violations_are_counted_by_label",
}


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def used(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


#: What an appliance hosting a stdio server exports (its bridge's metrics besides the rest).
ALL_EXPORTED = exported_names(Settings(servers=(ServerSettings(name="files", path="/servers/files/mcp",
                                                               command=("mcp-server-files",)),)))


def test_dashboard_uses_only_exported_metrics() -> None:
    names = used(dashboard_exprs())
    assert names, "the dashboard queries no appliance metric"
    assert names <= ALL_EXPORTED, sorted(names - ALL_EXPORTED)


def test_alert_rules_use_only_exported_metrics() -> None:
    exprs = [rule["expr"] for rule in alert_rules()]
    names = used(exprs)
    assert names <= ALL_EXPORTED, sorted(names - ALL_EXPORTED)
    others = {w for e in exprs for w in re.findall(r"\b([a-z_]+)\{", e) if not w.startswith("mcp_appliance_")}
    assert others <= PROMETHEUS_OWN, others


def test_the_seed_alerts_and_the_worker_alerts_exist() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name, threshold in (("McpApplianceHighCpu", "0.80"), ("McpApplianceHighMemory", "0.85"),
                            ("McpApplianceHighErrorRate", "0.05")):
        assert threshold in rules[name]["expr"], name
    assert "mcp_appliance_worker_restarts_total" in rules["McpApplianceWorkerFlapping"]["expr"]
    assert "mcp_appliance_workers_ready" in rules["McpApplianceNoReadyWorker"]["expr"]
    assert all(rule["labels"]["severity"] in {"warning", "critical"} for rule in rules.values())


def test_histograms_are_queried_through_their_buckets() -> None:
    for expr in dashboard_exprs() + [r["expr"] for r in alert_rules()]:
        for match in re.finditer(r"histogram_quantile\([^,]+,(.*)", expr):
            assert "_bucket" in match.group(1), expr


def test_dashboard_panels_are_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


@pytest.mark.parametrize("path", [PROMETHEUS, ALERTS, *sorted((CONF / "grafana" / "provisioning").rglob("*.yml"))],
                         ids=lambda p: p.name)
def test_config_files_are_valid_yaml(path: Path) -> None:
    assert yaml.safe_load(path.read_text())


def test_prometheus_loads_the_alert_rules() -> None:
    assert yaml.safe_load(PROMETHEUS.read_text())["rule_files"] == ["alerts.yml"]


def test_every_metric_an_alert_uses_has_a_test_that_moves_it() -> None:
    names = used([rule["expr"] for rule in alert_rules()])
    assert names, "no alert uses an appliance metric"
    missing = sorted(names - MOVED_BY.keys())
    assert not missing, f"alerts use metrics no test moves; write one and add it to MOVED_BY: {missing}"
    for metric, node in MOVED_BY.items():
        path, name = node.split("::")
        source = (ROOT / path).read_text()
        tests = {f.name: f for f in ast.walk(ast.parse(source)) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert name in tests, f"{node}: no such test"
        assert metric in (ast.get_source_segment(source, tests[name]) or ""), f"{node} does not look at {metric}"
        assert "pytest.mark.integration" in source, f"{path}: not an integration test (a real appliance)"
