"""Helpers for the observability tests: metric names used by configs/ (alert rules, Grafana dashboard)
and metric names present in a Prometheus text scrape."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "configs" / "prometheus" / "alerts.rules.yml"
DASHBOARD = REPO / "configs" / "grafana" / "llm-stack-dashboard.json"
PROMETHEUS_CONFIG = REPO / "configs" / "prometheus" / "prometheus.yml"

# Grafana template variables, replaced by what Grafana would put there before Prometheus sees the query.
_GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "${model}": ".*", "$model": ".*"}


def grafana_to_promql(expr: str) -> str:
    for k, v in _GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    if "$" in expr.replace("$labels", "").replace("$value", ""):
        raise AssertionError(f"unknown Grafana variable in {expr!r}")
    return expr


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables substituted) for every target and variable query."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], grafana_to_promql(t["expr"])))
    return out


def dashboard_variable_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    names = set()
    for v in dash["templating"]["list"]:
        m = re.fullmatch(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*),\s*\w+\)", v.get("query", "") if isinstance(v.get("query"), str) else "")
        if m:
            names.add(m.group(1))
    return names


def selector_names(expr: str) -> set[str]:
    """Metric names of every vector selector in a PromQL expression (parsing it, so it must be valid)."""
    ast = promql_parser.parse(expr)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if not node.name:
                raise AssertionError(f"selector without a metric name in {expr!r}")
            names.add(node.name)

    promql_parser.walk(ast, visit)
    return names


def scrape_names(text: str) -> set[str]:
    """Every series name a Prometheus server would store from this scrape (declared families included)."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        for s in suffixes.get(fam.type, ("",)):
            names.add(fam.name + s)
        for sample in fam.samples:
            names.add(sample.name)
    return names
