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


# -- proving that alerts fire: series built from real scrapes, evaluated by promtool -------------------------

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
PROMTOOL_STEP = 15  # seconds: the scrape interval of configs/prometheus/prometheus.yml


def scrape_samples(text: str, target: dict[str, str]) -> tuple[dict[SeriesKey, float], set[SeriesKey]]:
    """The samples a Prometheus server would store from one successful scrape of ``target`` (its ``job`` and
    ``instance`` labels added, plus ``up`` = 1), and which of them are cumulative (counters, histogram and
    summary parts). ``_created`` samples are left out."""
    values: dict[SeriesKey, float] = {}
    cumulative: set[SeriesKey] = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            key = (s.name, tuple(sorted({**s.labels, **target}.items())))
            values[key] = s.value
            if fam.type in ("counter", "histogram", "summary", "gaugehistogram"):
                cumulative.add(key)
    values[("up", tuple(sorted(target.items())))] = 1.0
    return values, cumulative


def failed_scrape(target: dict[str, str]) -> dict[SeriesKey, float]:
    """What Prometheus stores for a target it could not scrape: ``up`` = 0."""
    return {("up", tuple(sorted(target.items()))): 0.0}


def _num(v: float) -> str:
    return repr(float(v)).replace("inf", "Inf")


def _series(key: SeriesKey) -> str:
    name, labels = key
    return name + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in labels) + "}"


def timeline(
    quiet: dict[SeriesKey, float],
    start: dict[SeriesKey, float],
    end: dict[SeriesKey, float],
    cumulative: set[SeriesKey],
    quiet_steps: int,
    active_steps: int,
    names: set[str],
) -> list[dict[str, str]]:
    """promtool input series for the metrics in ``names``: ``quiet_steps`` scrapes of the state before the
    condition was forced (``quiet``), then ``active_steps`` scrapes during which the condition persists as
    observed between the two scrapes taken while it was forced (``start`` -> ``end``): a counter keeps growing
    by what it grew between them (the traffic between two scrapes repeats every scrape interval), a gauge
    keeps its trend (constant when it did not move)."""
    out = []
    for key in sorted(set(quiet) | set(start) | set(end)):
        if key[0] not in names:
            continue
        if key in cumulative:
            a = start.get(key, quiet.get(key, 0.0))
            b = end.get(key, a)
            values = f"{_num(a)}x{quiet_steps} {_num(a)}+{_num(max(b - a, 0.0))}x{active_steps}"
        else:
            q = quiet.get(key)
            head = f"{_num(q)}x{quiet_steps}" if q is not None else f"_x{quiet_steps}"
            b = end.get(key, start.get(key))
            if b is None:
                continue
            d = b - start.get(key, b)
            tail = f"{_num(b)}{'+' if d >= 0 else '-'}{_num(abs(d))}x{active_steps}"
            values = f"{head} {tail}"
        out.append({"series": _series(key), "values": values})
    return out


def alert_names_used(rules: list[dict[str, Any]]) -> set[str]:
    return {n for r in rules for n in selector_names(r["expr"])}


def promtool_alert_test(
    path: Path,
    series: list[dict[str, str]],
    eval_after_steps: int,
    firing: dict[str, dict[str, str]],
) -> str:
    """Write a promtool unit test over ``series`` that expects, ``eval_after_steps`` scrapes in, exactly the
    alerts in ``firing`` (name -> labels a firing instance must carry) to be firing, or none at all when
    ``firing`` is empty. Runs ``promtool test rules``; returns its output (raises on failure)."""
    import subprocess

    eval_time = f"{eval_after_steps * PROMTOOL_STEP}s"
    checks: list[dict[str, Any]] = []
    if firing:
        for name, labels in sorted(firing.items()):
            sel = ",".join(['alertstate="firing"', f"alertname={json.dumps(name)}"] + [f"{k}={json.dumps(v)}" for k, v in labels.items()])
            checks.append(
                {
                    "expr": f"count by (alertname) (ALERTS{{{sel}}}) > bool 0",
                    "eval_time": eval_time,
                    "exp_samples": [{"labels": f"{{alertname={json.dumps(name)}}}", "value": 1}],
                }
            )
        others = "|".join(sorted(firing))
        checks.append(
            {"expr": f'ALERTS{{alertstate="firing",alertname!~"{others}"}}', "eval_time": eval_time, "exp_samples": []}
        )
    else:
        checks.append({"expr": "ALERTS", "eval_time": eval_time, "exp_samples": []})
    doc = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": f"{PROMTOOL_STEP}s",
        "tests": [{"interval": f"{PROMTOOL_STEP}s", "input_series": series, "promql_expr_test": checks}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"promtool test rules {path} failed:\n{r.stdout}{r.stderr}")
    return r.stdout
