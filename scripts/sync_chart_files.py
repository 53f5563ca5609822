#!/usr/bin/env python3
"""Copy the monitoring files of configs/ into the Helm chart, byte for byte.

Helm can only read files inside the chart (``.Files.Get``), and symlinks do not survive ``helm package``, so the
chart holds copies. configs/ stays the one place to edit; this script refreshes the copies and
tests/helm/test_chart_files.py fails when they drift.

  configs/prometheus/**/*.yml|yaml, configs/alerts/**/*.yml|yaml  (Prometheus rule files: a top-level `groups:`)
        -> helm/private-llm/files/prometheus/<name>.yml   (PrometheusRule)
  configs/grafana/**/*.json
        -> helm/private-llm/files/grafana/<name>.json     (Grafana dashboard ConfigMap)

Usage: scripts/sync_chart_files.py [--check]   (--check: change nothing, exit 1 when the copies are stale)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "private-llm"
RULE_DIRS = ("configs/prometheus", "configs/alerts")
DASHBOARD_DIRS = ("configs/grafana",)
# ConfigMap keys and file names the chart's templates glob for.
_NAME = re.compile(r"^[-._a-zA-Z0-9]+$")


def _is_rule_file(path: Path) -> bool:
    """A Prometheus rules file (not, say, a prometheus.yml scrape config)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SystemExit(f"sync_chart_files: {path}: not valid YAML: {e}") from e
    return isinstance(doc, dict) and isinstance(doc.get("groups"), list)


def plan(repo: Path = REPO) -> dict[Path, Path]:
    """Destination (inside the chart) -> source (in configs/) for every file the chart must hold."""
    chart = repo / "helm" / "private-llm"
    out: dict[Path, Path] = {}

    def add(dest: Path, src: Path) -> None:
        if not _NAME.match(dest.name):
            raise SystemExit(f"sync_chart_files: {src}: rename it to letters, digits, '-', '_' and '.' only")
        if dest in out:
            raise SystemExit(f"sync_chart_files: {src} and {out[dest]} both map to {dest.relative_to(repo)}")
        out[dest] = src

    for d in RULE_DIRS:
        for src in sorted((repo / d).rglob("*")):
            if src.suffix in (".yml", ".yaml") and src.is_file() and _is_rule_file(src):
                add(chart / "files" / "prometheus" / (src.stem + ".yml"), src)
    for d in DASHBOARD_DIRS:
        for src in sorted((repo / d).rglob("*.json")):
            if src.is_file():
                add(chart / "files" / "grafana" / src.name, src)
    return out


def managed_files(repo: Path = REPO) -> list[Path]:
    """Files currently in the chart's synced folders."""
    chart = repo / "helm" / "private-llm" / "files"
    return sorted(p for sub in ("prometheus", "grafana") for p in (chart / sub).glob("*") if p.is_file())


def differences(repo: Path = REPO) -> list[str]:
    want = plan(repo)
    problems = []
    for dest, src in want.items():
        if not dest.exists():
            problems.append(f"missing {dest.relative_to(repo)} (copy of {src.relative_to(repo)})")
        elif dest.read_bytes() != src.read_bytes():
            problems.append(f"stale {dest.relative_to(repo)} (differs from {src.relative_to(repo)})")
    for p in managed_files(repo):
        if p not in want:
            problems.append(f"extra {p.relative_to(repo)} (no source in configs/)")
    return problems


def sync(repo: Path = REPO) -> list[str]:
    want = plan(repo)
    changed = []
    for p in managed_files(repo):
        if p not in want:
            p.unlink()
            changed.append(f"removed {p.relative_to(repo)}")
    for dest, src in want.items():
        data = src.read_bytes()
        if not dest.exists() or dest.read_bytes() != data:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            changed.append(f"copied {src.relative_to(repo)} -> {dest.relative_to(repo)}")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check", action="store_true", help="only report; exit 1 when the chart's copies are stale"
    )
    args = ap.parse_args(argv)
    if args.check:
        problems = differences()
        for line in problems:
            print(line)
        return 1 if problems else 0
    for line in sync():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
