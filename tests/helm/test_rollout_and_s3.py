"""Rolling upgrades without dropped requests: the rendered rollout strategy, preStop, grace period, the
engine's drain timeout and vLLM's --shutdown-timeout agree with each other and with the gateways' discovery
intervals. And an S3 endpoint over TLS with an internal CA (plus extra env/volumes) configured without
forking the chart."""

from __future__ import annotations

import copy

import helm_python as helm
import pytest

from tests.helm.chart import env_of, pod_spec, render, render_files
from tests.helm.value_sets import MINIO_TLS, value_sets

SETS = value_sets()
WITH_ENGINES = [n for n, v in SETS.items() if v.get("models")]


def _engine_settings(container: dict):
    from engine.settings import EngineSettings

    env = {k: v for k, v in env_of(container).items() if k.startswith("ENGINE_") and isinstance(v, str)}
    return EngineSettings(**{k.removeprefix("ENGINE_").lower(): v for k, v in env.items()})


@pytest.mark.parametrize("name", WITH_ENGINES)
def test_engine_rollout_drains_before_the_grace_period_ends(name: str) -> None:
    from engine.vllm_args import build_vllm_command
    from gateway.settings import GatewaySettings

    objs = render(SETS[name])
    gw = GatewaySettings(**objs.gateway_config())
    # how long until every gateway stopped picking a replica whose DNS record is gone
    leave = gw.routing.dns_interval + 2 * gw.health_interval
    for w in objs.engines():
        spec = pod_spec(w)
        main = next(c for c in spec["containers"] if c["name"] == "engine")
        sleep = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
        es = _engine_settings(main)
        cmd = build_vllm_command(es, "/cache/model", device="cuda")
        shutdown = int(cmd[cmd.index("--shutdown-timeout") + 1])
        # preStop outlasts discovery; vLLM finishes running requests before the supervisor's SIGKILL;
        # the kubelet's SIGKILL comes only after both
        assert sleep >= leave, (
            f"{w['metadata']['name']}: preStop {sleep}s < dns_interval + 2 x health_interval"
        )
        assert 0 < shutdown < es.drain_timeout
        assert spec["terminationGracePeriodSeconds"] > sleep + es.drain_timeout
        # readiness first: a new replica joins only once vLLM answers /health; the old one leaves only then
        assert main["readinessProbe"]["httpGet"]["path"] == "/health"
        if w["kind"] == "LeaderWorkerSet":
            # a whole new group is ready before an old one goes (the chart's rolloutStrategy)
            lws = objs.get("LeaderWorkerSet", w["metadata"]["name"])
            ru = lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]
            assert ru["maxUnavailable"] == 0 and int(ru["maxSurge"]) >= 1
        elif w["kind"] == "Deployment":
            ru = w["spec"]["strategy"]["rollingUpdate"]
            assert ru["maxUnavailable"] == 0 and int(ru["maxSurge"]) >= 1, (
                "a replica is removed before its successor is ready"
            )
        else:
            assert w["spec"]["updateStrategy"]["type"] == "RollingUpdate"


@pytest.mark.parametrize("name", list(SETS))
def test_gateway_rollout_drains_before_the_grace_period_ends(name: str) -> None:
    from gateway.settings import GatewaySettings

    objs = render(SETS[name])
    g = objs.gateway()
    spec = pod_spec(g)
    (c,) = spec["containers"]
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(env_of(c)["GATEWAY_DRAIN_TIMEOUT"])
    assert GatewaySettings(**objs.gateway_config(), drain_timeout=drain).drain_timeout == drain
    assert spec["terminationGracePeriodSeconds"] > sleep + drain
    assert g["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert c["readinessProbe"]["httpGet"]["path"].startswith("/readyz")


def test_drain_values_move_the_grace_period_and_the_vllm_timeout_together() -> None:
    values = copy.deepcopy(SETS["h200-single"])
    values["models"][0]["drainSeconds"] = 600
    values["models"][0]["preStopSleepSeconds"] = 20
    (w,) = render(values).engines()
    main = pod_spec(w)["containers"][0]
    from engine.vllm_args import build_vllm_command

    cmd = build_vllm_command(_engine_settings(main), "/cache/model", device="cuda")
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "595"
    assert pod_spec(w)["terminationGracePeriodSeconds"] == 630
    assert main["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "20"]


def _mounted_file(spec: dict, container: dict, path: str) -> dict:
    """The volume source that provides ``path`` inside ``container`` (the file must be one of its items)."""
    for m in container.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
            src = vol.get("secret") or vol.get("configMap")
            assert src is not None, vol
            assert path[len(prefix) :] in [i["path"] for i in src["items"]]
            assert m.get("readOnly") is True
            return vol
    raise AssertionError(f"{path} is not mounted in {container['name']}")


def _s3_containers(objs) -> list[tuple[dict, dict]]:
    out = []
    for w in objs.engines():
        spec = pod_spec(w)
        out += [(spec, c) for c in spec.get("initContainers", []) + spec["containers"]]
    spec = pod_spec(objs.gateway())
    out.append((spec, spec["containers"][0]))
    return out


def test_s3_ca_bundle_from_a_configmap_reaches_every_s3_client() -> None:
    objs = render(MINIO_TLS)
    clients = _s3_containers(objs)
    assert len(clients) == 3  # pull, engine, gateway (s3Credentials)
    for spec, c in clients:
        env = env_of(c)
        vol = _mounted_file(spec, c, env["AWS_CA_BUNDLE"])
        assert vol["configMap"]["name"] == "internal-ca" and env["AWS_CA_BUNDLE"].endswith("/ca.pem")
        assert env["S3_ENDPOINT_URL"].startswith("https://")
        assert env["AWS_ROLE_SESSION_NAME"] == "private-llm"  # s3.extraEnv
        assert "S3_VERIFY_SSL" not in env


def test_s3_ca_bundle_from_a_secret_and_verify_off() -> None:
    values = copy.deepcopy(MINIO_TLS)
    values["s3"]["caBundle"] = {"secretName": "minio-ca"}
    values["s3"]["verifySSL"] = False
    for spec, c in _s3_containers(render(values)):
        env = env_of(c)
        assert _mounted_file(spec, c, env["AWS_CA_BUNDLE"])["secret"]["secretName"] == "minio-ca"
        assert env["AWS_CA_BUNDLE"] == "/etc/private-llm/s3-ca/ca.crt"
        assert env["S3_VERIFY_SSL"] == "false"


def test_no_ca_bundle_no_volume() -> None:
    for spec, c in _s3_containers(render(SETS["h200-single"])):
        assert "AWS_CA_BUNDLE" not in env_of(c)
        assert all(v["name"] != "s3-ca" for v in spec["volumes"])


def test_ca_bundle_from_both_a_secret_and_a_configmap_is_refused() -> None:
    values = copy.deepcopy(MINIO_TLS)
    values["s3"]["caBundle"] = {"secretName": "a", "configMapName": "b"}
    with pytest.raises(helm.HelmError, match="s3.caBundle: set secretName or configMapName, not both"):
        render_files(values)


def test_extra_env_and_volumes_reach_engine_and_pull_containers() -> None:
    (w,) = render(MINIO_TLS).engines()
    spec = pod_spec(w)
    (pull,) = spec["initContainers"]
    main = spec["containers"][0]
    assert env_of(pull)["ENGINE_VERIFY_CACHE"] == "full" and "ENGINE_VERIFY_CACHE" not in env_of(main)
    assert env_of(main)["VLLM_LOGGING_LEVEL"] == "INFO" and "VLLM_LOGGING_LEVEL" not in env_of(pull)
    assert any(v["name"] == "aws-token" and "projected" in v for v in spec["volumes"])
    for c in (pull, main):
        assert {"name": "aws-token", "mountPath": "/var/run/secrets/aws", "readOnly": True} in c[
            "volumeMounts"
        ]
    # a model can override the defaults' lists
    values = copy.deepcopy(MINIO_TLS)
    values["models"][0]["extraVolumeMounts"] = []
    (w2,) = render(values).engines()
    assert all(m["name"] != "aws-token" for m in pod_spec(w2)["containers"][0]["volumeMounts"])


def test_several_gateway_workers_get_one_audit_file_per_worker() -> None:
    from gateway.settings import GatewaySettings

    cfg = render(MINIO_TLS).gateway_config()
    assert cfg["audit"]["path"] == "/var/lib/gateway/audit/audit.{pid}.jsonl"
    assert GatewaySettings(**cfg).workers == 2
    single = render(SETS["two-models"]).gateway_config()
    assert "{pid}" not in single["audit"]["path"]
