"""Rendering the chart with a real Helm engine (helm-python-sdk, Helm's Go SDK through ctypes), offline.

The chart is loaded once per process; each render validates the values against values.schema.json exactly as
`helm install` does, then renders every template. Manifests come back parsed, one dict per object.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

from tests.support import REPO

CHART_DIR = REPO / "helm" / "private-llm"
EXAMPLES = CHART_DIR / "examples"
RELEASE = "llm"
NAMESPACE = "ai"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.27", "1.33")

# kubernetes-validate re-reads its 1.4 MB definitions file for every object; read each file once.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents
)


@functools.lru_cache(maxsize=1)
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


@functools.lru_cache(maxsize=64)
def _render(values_json: str, release: str, namespace: str) -> tuple[tuple[str, str], ...]:
    out = chart().render(json.loads(values_json), name=release, namespace=namespace, is_install=True)
    return tuple(sorted(out.items()))


def render_files(
    values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included). Raises HelmValuesError / HelmRenderError."""
    return dict(_render(json.dumps(values or {}, sort_keys=True), release, namespace))


class Manifests(list):
    """The rendered objects, with small lookups for tests."""

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self if m["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for m in self:
            if m["kind"] == kind and m["metadata"]["name"] == name:
                return m
        raise KeyError(f"no {kind} {name} among {[(m['kind'], m['metadata']['name']) for m in self]}")

    def workloads(self) -> list[dict[str, Any]]:
        return [m for m in self if m["kind"] in ("Deployment", "StatefulSet")]

    def engines(self) -> list[dict[str, Any]]:
        """Engine workloads; a LeaderWorkerSet appears as its leader pods (the ones that serve HTTP)."""
        single = [w for w in self.workloads() if component(w) == "engine"]
        return single + [group_pods(g, "leader") for g in self.kinds("LeaderWorkerSet")]

    def gateway(self) -> dict[str, Any]:
        return self.get("Deployment", f"{RELEASE}-private-llm-gateway")

    def gateway_config(self) -> dict[str, Any]:
        cm = self.get("ConfigMap", f"{RELEASE}-private-llm-gateway")
        return yaml.safe_load(cm["data"]["gateway.yaml"])


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=64)
def _parsed(values_json: str, release: str, namespace: str) -> tuple[dict[str, Any], ...]:
    docs = []
    for path, text in _render(values_json, release, namespace):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.load_all(text, Loader=_Loader) if d]
    return tuple(docs)


def render(
    values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> Manifests:
    """The rendered objects (fresh copies: tests may change them)."""
    return Manifests(copy.deepcopy(_parsed(json.dumps(values or {}, sort_keys=True), release, namespace)))


def notes(values: dict[str, Any] | None = None) -> str:
    return render_files(values)["private-llm/templates/NOTES.txt"]


def component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


LWS_NAME = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"


def group_pods(lws: dict[str, Any], role: str) -> dict[str, Any]:
    """A LeaderWorkerSet's leader or worker pods in a workload's shape (spec.template), with the labels its
    controller adds to them at run time (set name, worker index: 0 for the leader)."""
    tpl = copy.deepcopy(
        lws["spec"]["leaderWorkerTemplate"]["leaderTemplate" if role == "leader" else "workerTemplate"]
    )
    labels = tpl["metadata"].setdefault("labels", {})
    labels[LWS_NAME] = lws["metadata"]["name"]
    labels[LWS_WORKER_INDEX] = "0" if role == "leader" else "1"
    lwt = lws["spec"]["leaderWorkerTemplate"]
    spec = {"template": tpl, "volumeClaimTemplates": lwt.get("volumeClaimTemplates", [])}
    return {
        "kind": "LeaderWorkerSet",
        "metadata": lws["metadata"],
        "spec": spec,
        "role": role,
        "groupSize": lwt["size"],
    }


def service_name(engine: dict[str, Any]) -> str:
    """The headless Service the gateway discovers an engine through (a group's selects its leaders)."""
    name: str = engine["metadata"]["name"]
    return f"{name}-leaders" if engine["kind"] == "LeaderWorkerSet" else name


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (plain values) or the valueFrom dict."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
