"""The chart's monitoring files are byte-identical copies of configs/ (scripts/sync_chart_files.py), the schema
is what scripts/gen_chart_schema.py writes, and the rendered monitoring objects carry exactly those files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import yaml

from tests.helm.chart import RELEASE, render
from tests.support import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gen_chart_schema  # noqa: E402
import sync_chart_files  # noqa: E402

MONITORING = {"monitoring": {"prometheusRule": {"enabled": True}, "grafanaDashboards": {"enabled": True}}}


def test_chart_copies_match_configs_byte_for_byte() -> None:
    plan = sync_chart_files.plan()
    assert any(d.parent.name == "prometheus" for d in plan), "configs/ holds no Prometheus rule file"
    assert any(d.parent.name == "grafana" for d in plan), "configs/ holds no Grafana dashboard"
    for dest, src in plan.items():
        assert dest.exists(), f"{dest} missing: run scripts/sync_chart_files.py"
        assert dest.read_bytes() == src.read_bytes(), (
            f"{dest} drifted from {src}: run scripts/sync_chart_files.py"
        )
    assert sync_chart_files.differences() == []


def test_sync_detects_and_repairs_drift(tmp_path) -> None:
    """On a scratch copy: an edited config, a new dashboard and a stale chart file are all found and fixed."""
    for sub in ("configs", "helm/private-llm/files"):
        shutil.copytree(REPO / sub, tmp_path / sub)
    rules_src = next(src for dest, src in sync_chart_files.plan().items() if dest.parent.name == "prometheus")
    edited = tmp_path / rules_src.relative_to(REPO)
    edited.write_text("groups:\n  - name: edited\n    rules: []\n")
    (tmp_path / "configs/grafana/extra.json").write_text("{}\n")
    (tmp_path / "configs/prometheus/scrape.yml").write_text("scrape_configs: []\n")  # not a rules file
    (tmp_path / "helm/private-llm/files/grafana/stale.json").write_text("{}\n")
    problems = sync_chart_files.differences(tmp_path)
    assert any(p.startswith("stale") and edited.stem in p for p in problems)
    assert any(p.startswith("missing") and "extra.json" in p for p in problems)
    assert any(p.startswith("extra") and "stale.json" in p for p in problems)
    assert not any("scrape.yml" in p for p in problems)
    sync_chart_files.sync(tmp_path)
    assert sync_chart_files.differences(tmp_path) == []
    assert not (tmp_path / "helm/private-llm/files/grafana/stale.json").exists()


def test_check_mode_exit_status() -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts/sync_chart_files.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_schema_file_is_generated() -> None:
    assert (REPO / "helm/private-llm/values.schema.json").read_text() == gen_chart_schema.render(), (
        "values.schema.json is stale: run scripts/gen_chart_schema.py"
    )


def test_rendered_rules_and_dashboards_are_the_configs_files() -> None:
    objs = render(MONITORING)
    plan = sync_chart_files.plan()
    groups = []
    for src in sorted(
        (s for d, s in plan.items() if d.parent.name == "prometheus"), key=lambda s: s.stem + ".yml"
    ):
        groups += yaml.safe_load(src.read_text())["groups"]
    (rule,) = objs.kinds("PrometheusRule")
    assert rule["spec"]["groups"] == groups
    cm = objs.get("ConfigMap", f"{RELEASE}-private-llm-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboards = {d.name: s for d, s in plan.items() if d.parent.name == "grafana"}
    assert set(cm["data"]) == set(dashboards)
    for name, src in dashboards.items():
        assert json.loads(cm["data"][name]) == json.loads(src.read_text())
        assert cm["data"][name] == src.read_text().rstrip("\n")


def test_packaged_chart_carries_the_files(tmp_path) -> None:
    """`helm package` output (what users install from a repository) still holds the rules and dashboards."""
    import helm_python as helm

    archive = helm.package(REPO / "helm/private-llm", destination=tmp_path)
    with open(archive, "rb") as f:
        packaged = helm.Chart.load_archive(f.read())
    out = packaged.render(MONITORING, name=RELEASE, namespace="ai")
    assert "kind: PrometheusRule" in out["private-llm/templates/monitoring.yaml"]
    names = {f["name"] for f in packaged.files}
    chart_dir = REPO / "helm/private-llm"
    assert {str(d.relative_to(chart_dir)) for d in sync_chart_files.plan()} <= names
