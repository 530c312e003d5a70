"""The Grafana dashboard and the Prometheus rules use only metrics that /metrics exports.

`exported_names()` is the set of sample names the appliance exports; the integration
test test_metrics.py checks that a real scrape contains every one of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.scrape import exported_names

CONF = Path(__file__).resolve().parents[2] / "conf"
DASHBOARD = CONF / "grafana" / "dashboards" / "mcp-appliance.json"
ALERTS = CONF / "prometheus" / "alerts.yml"
PROMETHEUS = CONF / "prometheus" / "prometheus.yml"
METRIC = re.compile(r"\b(mcp_appliance_[a-z0-9_]+)")
#: Series Prometheus makes itself.
PROMETHEUS_OWN = {"up"}


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


def test_dashboard_uses_only_exported_metrics() -> None:
    names = used(dashboard_exprs())
    assert names, "the dashboard queries no appliance metric"
    assert names <= exported_names(), sorted(names - exported_names())


def test_alert_rules_use_only_exported_metrics() -> None:
    exprs = [rule["expr"] for rule in alert_rules()]
    names = used(exprs)
    assert names <= exported_names(), sorted(names - exported_names())
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
