"""configs/: the alert rules and the dashboard are valid PromQL; the Prometheus config points at them."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.monitoring import (
    ALERTS,
    PROMETHEUS_CONFIG,
    alert_rules,
    dashboard_queries,
    grafana_to_promql,
    selector_names,
)


def test_every_alert_rule_is_valid_promql_with_named_selectors():
    rules = alert_rules()
    assert len(rules) >= 10
    for r in rules:
        assert r["alert"] and r["labels"]["severity"] in {"info", "warning", "critical"}, r
        assert selector_names(r["expr"]), r["alert"]


def test_alerts_cover_the_seed_and_operator_questions():
    by_name = {r["alert"]: r["expr"] for r in alert_rules()}
    used = {n for e in by_name.values() for n in selector_names(e)}
    # p99 over 500 ms: the threshold is really 0.5 s against a 0.99 quantile.
    ttft = by_name["LlmTimeToFirstTokenP99High"]
    assert "histogram_quantile(0.99" in ttft and ttft.strip().endswith("> 0.5")
    assert by_name["LlmGpuUtilizationHigh"].strip().endswith("> 0.85")
    for needed in (
        "llm_gateway_time_to_first_token_seconds_bucket",
        "llm_gateway_request_duration_seconds_bucket",
        "llm_gateway_requests_total",
        "llm_gateway_replica_healthy",
        "llm_gateway_breaker_state",
        "llm_gateway_audit_queue_depth",
        "llm_engine_gpu_utilization_ratio",
    ):
        assert needed in used, needed


def test_a_broken_expression_is_rejected_by_the_parser():
    with pytest.raises(ValueError):
        selector_names("sum(rate(llm_gateway_requests_total[5m])")
    with pytest.raises(ValueError):
        selector_names("histogram_quantile(0.99, sum by (le) rate(x_bucket[5m]))")


def test_every_dashboard_query_is_valid_promql():
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, q in queries:
        assert selector_names(q), title


def test_unknown_grafana_variable_is_caught():
    with pytest.raises(AssertionError):
        grafana_to_promql('rate(x{pod="$pod"}[5m])')


def test_prometheus_config_scrapes_gateway_vllm_and_engine_exporter_and_loads_the_rules():
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert {"llm-gateway", "vllm", "llm-engine"} <= set(jobs)
    assert any(t.endswith(":9400") for sc in jobs["llm-engine"]["static_configs"] for t in sc["targets"])
    assert ALERTS.name in cfg["rule_files"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_config_and_rules():
    # Prometheus's own checker, where the Debian package is installed (an extra to the parser above).
    r = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_alerts_fire_on_synthetic_series_with_promtool():
    # configs/prometheus/alerts.test.yml: each alert fires where it should, and only there.
    r = subprocess.run(
        ["promtool", "test", "rules", "alerts.test.yml"], capture_output=True, text=True, cwd=ALERTS.parent
    )
    assert r.returncode == 0, r.stdout + r.stderr
