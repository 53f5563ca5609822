"""Every value set renders with a real Helm engine, lints clean, and every object is valid Kubernetes
(kubernetes-validate --strict, offline schemas) for the oldest supported and a current Kubernetes version."""

from __future__ import annotations

import copy

import helm_python as helm
import kubernetes_validate
import pytest

from tests.helm.chart import CHART_DIR, KUBE_VERSIONS, render
from tests.helm.lws import API_VERSION as LWS_API
from tests.helm.lws import validate_lws
from tests.helm.value_sets import value_sets

SETS = value_sets()
# Custom resources of the Prometheus operator: no schema ships with kubernetes-validate.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def _validate(obj: dict, version: str) -> None:
    if obj["apiVersion"] == LWS_API:
        validate_lws(obj)
        return
    if (obj["apiVersion"], obj["kind"]) in CRDS:
        _check_crd(obj)
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.utils.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        raise AssertionError(
            f"{obj['kind']} {obj['metadata']['name']} invalid for {version} at {path}: {e.message}"
        ) from None


def _check_crd(obj: dict) -> None:
    """The fields the Prometheus operator requires, checked by hand."""
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert spec["selector"]["matchLabels"], obj
        assert spec["endpoints"] and all(e["port"] and e["path"].startswith("/") for e in spec["endpoints"])
    else:
        assert spec["groups"], "PrometheusRule without rule groups"
        for g in spec["groups"]:
            assert g["name"] and g["rules"]
            for r in g["rules"]:
                assert ("alert" in r) != ("record" in r) and r["expr"], r


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(SETS))
def test_every_object_is_valid_kubernetes(name: str, version: str) -> None:
    objs = render(SETS[name])
    assert objs, name
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy"} <= kinds
    for obj in objs:
        _validate(obj, version)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_validator_rejects_a_broken_manifest() -> None:
    """The strict validation above can fail: a misspelled field and a wrong type are caught."""
    gw = render({})
    deployment = copy.deepcopy(gw.gateway())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(AssertionError, match="readinessProbes"):
        _validate(deployment, KUBE_VERSIONS[0])
    deployment = copy.deepcopy(gw.gateway())
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(AssertionError, match="replicas"):
        _validate(deployment, KUBE_VERSIONS[1])


@pytest.mark.parametrize("name", sorted(SETS))
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART_DIR, SETS[name], strict=True, namespace="ai", kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
