"""The docs are tested: every gateway YAML block in README.md and docs/*.md passes `llm-gateway config check`,
every Helm values block passes the chart's schema, every command line shown in the README is run by a test
(or by the quickstart test), and user docs carry no internal notes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.cli import main as gateway_cli
from tests.support import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "helm/private-llm/README.md"]
# Top-level keys only the chart's values have (the gateway config has models: too, but never these).
CHART_KEYS = {"gateway", "engine", "s3", "minio", "redis", "networkPolicy", "monitoring", "imagePullSecrets"}
CHART_MODEL_KEYS = {"source", "pools", "replicas", "gpus", "settings", "workload", "cache"}
K8S_KEYS = {"apiVersion", "kind", "containers", "terminationGracePeriodSeconds", "spec", "metadata"}


def blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    text = path.read_text()
    out = []
    for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def kind_of(data: dict) -> str:
    if set(data) & K8S_KEYS:
        return "kubernetes"
    if set(data) & CHART_KEYS:
        return "chart"
    models = data.get("models")
    if isinstance(models, list) and any(isinstance(m, dict) and set(m) & CHART_MODEL_KEYS for m in models):
        return "chart"
    return "gateway"


YAML_BLOCKS = [
    (f"{p.relative_to(REPO)}:{line}", text) for p in DOCS if p.exists() for line, text in blocks(p, "yaml")
]


def test_the_docs_have_gateway_blocks() -> None:
    kinds = [kind_of(yaml.safe_load(t)) for _, t in YAML_BLOCKS]
    assert kinds.count("gateway") >= 10 and kinds.count("chart") >= 2


@pytest.mark.parametrize("where", [w for w, _ in YAML_BLOCKS])
def test_yaml_block(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = dict(YAML_BLOCKS)[where]
    data = yaml.safe_load(text)
    assert isinstance(data, dict), f"{where}: a YAML block must be a mapping"
    kind = kind_of(data)
    if kind == "kubernetes":
        return  # a pod spec fragment: the Helm chart's own tests render and validate the real objects
    if kind == "chart":
        from tests.helm.chart import chart

        chart().validate_schema(data)
        return
    for var in [v for v in list(__import__("os").environ) if v.startswith("GATEWAY_")]:
        monkeypatch.delenv(var)
    f = tmp_path / "gateway.yaml"
    f.write_text(text)
    rc = gateway_cli(["config", "check", str(f), "--quiet"])
    assert rc == 0, f"{where}: {capsys.readouterr().err.strip()}"


def test_a_typo_in_a_doc_block_would_be_caught(tmp_path: Path, capsys) -> None:
    where, text = next((w, t) for w, t in YAML_BLOCKS if t.startswith("quota:"))
    f = tmp_path / "gateway.yaml"
    f.write_text(text.replace("on_backend_error", "on_backend_eror"))
    assert kind_of(yaml.safe_load(f.read_text())) == "gateway"
    assert gateway_cli(["config", "check", str(f)]) == 1
    assert "did you mean 'on_backend_error'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- README commands

README = (REPO / "README.md").read_text()


def readme_command_lines() -> list[str]:
    """Each command of the README's bash blocks (continuation lines joined, comments dropped)."""
    out = []
    for _, block in blocks(REPO / "README.md", "bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


# Every README command -> the test that runs it. A new command in the README fails this test until it is
# exercised somewhere and listed here.
EXERCISED = {
    r"^scripts/quickstart$": "tests/e2e/test_quickstart.py",
    r"^scripts/test$": "tests/unit/test_bootstrap.py",  # its first step; the whole suite is the rest
    r"^curl -sN? \$OPENAI_BASE_URL/chat/completions": "tests/e2e/test_quickstart.py",
    r"^REG=": "tests/helm/test_dockerfiles.py",
    r"^docker build -f docker/(gateway|engine|engine-cpu)\.Dockerfile": "tests/helm/test_dockerfiles.py",
    r"^docker compose -f docker/compose\.yaml (up -d|down -v)$": "tests/e2e/test_compose_smoke.py",  # via scripts/ctr compose
    r"^S3_ENDPOINT_URL=.* llm-engine push ": "tests/helm/test_deploy_doc.py",
    r"^kubectl (create namespace|-n llm create secret)": "tests/helm/test_deploy_doc.py",
    r"^llm-gateway keys create --id team-a --tenant team-a --file api-keys.yaml > team-a.key$": "tests/helm/test_deploy_doc.py",
    r"^helm install llm helm/private-llm": "tests/helm/test_deploy_doc.py",
    r"^export GATEWAY_API_KEYS_FILE=|^llm-gateway keys (create|list|rotate|revoke)": "tests/unit/test_docs.py",
}


# Commands shown inline in the README's prose (`llm-engine run --dry-run`) -> the test that runs them.
INLINE_EXERCISED = {
    r"^llm-(gateway serve|engine run) --help$|^llm-gateway config check|^llm-engine config check$": "tests/unit/test_config_strict.py",
    r"^llm-engine run --dry-run$": "tests/unit/test_config_strict.py",
    r"^scripts/quickstart( --help)?$": "tests/e2e/test_quickstart.py",
    r"^llm-engine (pull|push|run)$": "tests/integration/test_weights.py",
    r"^llm-gateway audit verify PATH$": "tests/unit/test_audit_chain.py",
    r"^llm-gateway keys create$": "tests/integration/test_keys_cli.py",
    r"^llm-gateway serve --config FILE$": "tests/support.py",  # how every gateway of the suite starts
    r"^scripts/bootstrap$|^scripts/test( tests/unit -q)?$": "tests/unit/test_bootstrap.py",
    r"^source \.venv/bin/activate$|^\.venv/bin/llm-gateway$": "tests/unit/test_bootstrap.py",
    r"^scripts/(bench_e2e|bench_overhead)\.py$|^scripts/gpu/h200_stack\.sh$": "docs/benchmarks.md",  # benchmarks, not tests
    r"^llm-(gateway|engine)$": "pyproject.toml",
    r"^llm-engine lora (add|remove|list)( |$)": "tests/e2e/test_openai_surface.py",
    r"^scripts/ctr (build all|compose -f docker/compose\.yaml up -d)$": "tests/e2e/test_compose_smoke.py",
    r"^scripts/opcount\.py$": "tests/unit/test_opcount.py",
    r"^scripts/build-native$": "tests/unit/test_native.py",
}


def test_every_inline_readme_command_is_exercised() -> None:
    spans = set(re.findall(r"`((?:llm-gateway|llm-engine|scripts/|source |\.venv/)[^`]*)`", README))
    assert len(spans) >= 15
    for span in (" ".join(x.split()) for x in spans):
        hits = [t for pattern, t in INLINE_EXERCISED.items() if re.search(pattern, span)]
        assert hits, f"README command not exercised by any test: {span!r}"
        assert (REPO / hits[0]).is_file()


def test_every_readme_command_is_exercised() -> None:
    lines = readme_command_lines()
    assert len(lines) >= 10
    for line in lines:
        hits = [t for pattern, t in EXERCISED.items() if re.search(pattern, line)]
        assert hits, f"README command not exercised by any test: {line!r}"
        assert (REPO / hits[0]).is_file()


def test_readme_key_management_block_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    block = next(b for _, b in blocks(REPO / "README.md", "bash") if "keys list" in b)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "llm-gateway").write_text(f'#!/bin/sh\nexec {sys.executable} -m gateway "$@"\n')
    (bindir / "llm-gateway").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(PATH=f"{bindir}:{env['PATH']}", PYTHONPATH=str(REPO))
    r = subprocess.run(
        ["bash", "-ec", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    entries = yaml.safe_load((tmp_path / "api-keys.yaml").read_text())
    assert [e["id"] for e in entries] == ["app1"] and entries[0]["disabled"] is True
    assert (tmp_path / "api-keys.yaml.bak").exists() and "app1" in r.stdout
    key = (tmp_path / "app1.key").read_text().strip()
    assert key.startswith("sk-") and key not in (tmp_path / "api-keys.yaml").read_text()


def test_deploy_guide_names_the_real_jwt_key() -> None:
    deploy = (REPO / "docs/deploy.md").read_text()
    assert "`auth.issuers`" in deploy and "`issuers`," not in deploy


INTERNAL = re.compile(
    r"for the lead|\bissue \d+|\(issue\b|issue note|\bhelpers?\b(?! for)|session note", re.I
)


def test_user_docs_carry_no_internal_notes() -> None:
    for p in [*DOCS, REPO / "helm/private-llm/values.yaml"]:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            m = INTERNAL.search(line)
            assert not m or "runbook helpers" in line, f"{p.relative_to(REPO)}:{i}: {line.strip()}"
