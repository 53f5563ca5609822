"""Properties of the rendered chart that matter in production, checked on every realistic value set."""

from __future__ import annotations

import copy
import json
import re
import shlex

import pytest
import yaml

from tests.helm.chart import (
    NAMESPACE,
    RELEASE,
    component,
    env_of,
    example,
    pod_spec,
    render,
    selector_matches,
    service_name,
)
from tests.helm.value_sets import DIGEST, REDIS_URL_PASSWORD, S3_SECRET, TP2_PVC, value_sets

SETS = value_sets()
WITH_ENGINES = sorted(n for n in SETS if n != "defaults")


@pytest.mark.parametrize("name", WITH_ENGINES)
def test_engines_have_gpus_shm_cache_and_pull_before_vllm(name: str) -> None:
    objs = render(SETS[name])
    engines = objs.engines()
    assert engines, name
    for w in engines:
        spec = pod_spec(w)
        main = spec["containers"][0]
        settings = env_of(main)
        tp = int(settings["ENGINE_TENSOR_PARALLEL_SIZE"]) * int(settings["ENGINE_PIPELINE_PARALLEL_SIZE"])
        gpus = main["resources"]["limits"]["nvidia.com/gpu"]
        # a group's tensor x pipeline parallelism spans its pods
        assert isinstance(gpus, int) and gpus * w.get("groupSize", 1) >= tp >= 1, (
            w["metadata"]["name"],
            gpus,
            tp,
        )
        assert main["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert main["command"] == ["llm-engine"] and main["args"] == ["run"]
        # /dev/shm is memory backed and sized
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
        assert {"mountPath": "/dev/shm", "name": "dshm"} in main["volumeMounts"]
        # the cache volume exists (pod volume or StatefulSet claim template) and both containers use it
        claims = [c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])]
        assert "cache" in claims or any(v["name"] == "cache" for v in spec["volumes"])
        assert {"mountPath": "/cache", "name": "cache"} in main["volumeMounts"]
        assert settings["ENGINE_CACHE_DIR"] == "/cache"
        # weights are pulled and verified by an init container, before vLLM starts
        source = settings["ENGINE_MODEL"]
        assert source.startswith("s3://")
        (pull,) = spec["initContainers"]
        assert pull["command"] == ["llm-engine"] and pull["args"] == ["pull", source, "--cache-dir", "/cache"]
        assert {"mountPath": "/cache", "name": "cache"} in pull["volumeMounts"]
        assert "S3_ENDPOINT_URL" in env_of(pull) and "AWS_REGION" in env_of(pull)
        # GPU nodes: the default toleration for the NVIDIA taint
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert settings["HF_HUB_OFFLINE"] == "1" and settings["ENGINE_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_long_running_container_has_probes_and_limits(name: str) -> None:
    for w in render(SETS[name]).workloads():
        for c in pod_spec(w)["containers"]:
            where = f"{w['metadata']['name']}/{c['name']}"
            assert c.get("readinessProbe") and c.get("livenessProbe"), where
            assert c["resources"].get("requests"), where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.parametrize("name", WITH_ENGINES)
def test_engine_probes_hit_vllm_health_and_allow_long_loads(name: str) -> None:
    for w in render(SETS[name]).engines():
        main = pod_spec(w)["containers"][0]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[kind]["httpGet"] == {"path": "/health", "port": "http"}, kind
        startup = main["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= 1800, "large models load and compile for many minutes"
        # the supervisor's own startup timeout agrees with the probe
        assert env_of(main)["ENGINE_STARTUP_TIMEOUT"] == str(budget)
        # grace period covers the preStop sleep and vLLM's drain
        grace = pod_spec(w)["terminationGracePeriodSeconds"]
        assert grace > int(env_of(main)["ENGINE_DRAIN_TIMEOUT"])
        assert main["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_gateway_deployment_drains_and_rolls_without_unavailability() -> None:
    objs = render({})
    gw = objs.gateway()
    spec = pod_spec(gw)
    (c,) = spec["containers"]
    assert gw["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz?require=any"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = env_of(c)
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = int(env["GATEWAY_DRAIN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain
    assert env["GATEWAY_HOST"] == "0.0.0.0" and env["GATEWAY_CONFIG"] == "/etc/gateway/config/gateway.yaml"
    # non-root, read-only root filesystem with a writable /tmp
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    pdb = objs.get("PodDisruptionBudget", gw["metadata"]["name"])
    assert selector_matches(
        pdb["spec"]["selector"]["matchLabels"], gw["spec"]["template"]["metadata"]["labels"]
    )
    svc = objs.get("Service", gw["metadata"]["name"])
    assert selector_matches(svc["spec"]["selector"], gw["spec"]["template"]["metadata"]["labels"])


def test_hpa_owns_replicas_when_enabled() -> None:
    objs = render(TP2_PVC)
    gw = objs.gateway()
    assert "replicas" not in gw["spec"]
    hpa = objs.get("HorizontalPodAutoscaler", gw["metadata"]["name"])
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": gw["metadata"]["name"],
    }
    assert hpa["spec"]["maxReplicas"] == 6
    ing = objs.get("Ingress", gw["metadata"]["name"])
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == gw["metadata"]["name"]


@pytest.mark.parametrize("name", WITH_ENGINES)
def test_network_policy_admits_only_gateway_and_prometheus_to_engines(name: str) -> None:
    objs = render(SETS[name])
    (pol,) = [p for p in objs.kinds("NetworkPolicy") if p["metadata"]["name"].endswith("-engines")]
    sel = pol["spec"]["podSelector"]["matchLabels"]
    gateway_labels = objs.gateway()["spec"]["template"]["metadata"]["labels"]
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    for w in objs.engines():
        assert selector_matches(sel, w["spec"]["template"]["metadata"]["labels"]), w["metadata"]["name"]
    # nothing else of the release is selected (the gateway stays reachable)
    for w in objs.workloads():
        if component(w) != "engine":
            assert not selector_matches(sel, w["spec"]["template"]["metadata"]["labels"])
    (rule,) = pol["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    peers = rule["from"]
    assert any(
        selector_matches(p["podSelector"]["matchLabels"], gateway_labels) and "namespaceSelector" not in p
        for p in peers
    )
    assert all("ipBlock" not in p for p in peers)
    assert all(p.get("podSelector", {}).get("matchLabels") for p in peers), (
        "an empty selector would admit every pod"
    )


def test_network_policy_prometheus_namespace() -> None:
    objs = render(example("h200-single.yaml"))
    (pol,) = [p for p in objs.kinds("NetworkPolicy") if p["metadata"]["name"].endswith("-engines")]
    prom = pol["spec"]["ingress"][0]["from"][1]
    assert prom["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert prom["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


@pytest.mark.parametrize("name", WITH_ENGINES)
def test_gateway_discovers_each_engine_through_its_headless_service(name: str) -> None:
    objs = render(SETS[name])
    cfg = objs.gateway_config()
    upstreams = {u for m in cfg["models"] for u in m["upstreams"]}
    for w in objs.engines():
        svc = objs.get("Service", service_name(w))
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is False
        assert selector_matches(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        # the selector tells this workload's pods from every other engine's
        for other in objs.engines():
            if other["metadata"]["name"] != w["metadata"]["name"]:
                assert not selector_matches(
                    svc["spec"]["selector"], other["spec"]["template"]["metadata"]["labels"]
                )
        port = svc["spec"]["ports"][0]["port"]
        assert pod_spec(w)["containers"][0]["ports"][0]["containerPort"] == port
        url = f"dns+http://{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
        pool = w["metadata"]["labels"].get("private-llm/pool")
        if pool is None:
            assert url in upstreams
        if w["kind"] == "StatefulSet":
            assert w["spec"]["serviceName"] == svc["metadata"]["name"]


@pytest.mark.parametrize("name", WITH_ENGINES)
def test_rendered_config_and_env_load_into_the_real_settings(name: str) -> None:
    """The ConfigMap is a valid GatewaySettings file; each engine's ENGINE_* env is valid EngineSettings and
    builds a vLLM command line for the GPU build."""
    from engine.settings import EngineSettings
    from engine.vllm_args import build_vllm_command
    from gateway.settings import GatewaySettings

    objs = render(SETS[name])
    cfg = objs.gateway_config()
    settings = GatewaySettings(**cfg)
    assert [m.name for m in settings.models] == [m["name"] for m in SETS[name]["models"]]
    for m in settings.models:
        assert m.upstreams and all(u.startswith(("dns+http://", "http://", "https://")) for u in m.upstreams)
    for w in objs.engines():
        main = pod_spec(w)["containers"][0]
        env = {k: v for k, v in env_of(main).items() if k.startswith("ENGINE_") and isinstance(v, str)}
        es = EngineSettings(**{k.removeprefix("ENGINE_").lower(): v for k, v in env.items()})
        cmd = build_vllm_command(es, "/cache/model", device="cuda")
        assert cmd[cmd.index("--port") + 1] == env["ENGINE_PORT"]
        assert cmd[cmd.index("--served-model-name") + 1] == env["ENGINE_SERVED_MODEL_NAME"]
        served = {m.upstream_model for m in settings.models}
        assert env["ENGINE_SERVED_MODEL_NAME"] in served
        if es.tensor_parallel_size > 1:
            assert cmd[cmd.index("--tensor-parallel-size") + 1] == str(es.tensor_parallel_size)
        for arg in shlex.split(es.extra_args):
            assert arg in cmd


def test_tensor_parallel_two_gets_two_gpus_and_a_shared_rwx_cache() -> None:
    objs = render(TP2_PVC)
    (w,) = objs.engines()
    assert w["kind"] == "Deployment" and w["spec"]["replicas"] == 3
    main = pod_spec(w)["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert env_of(main)["ENGINE_TENSOR_PARALLEL_SIZE"] == "2"
    assert env_of(main)["ENGINE_QUANTIZATION"] == "fp8"
    claim = next(v for v in pod_spec(w)["volumes"] if v["name"] == "cache")["persistentVolumeClaim"][
        "claimName"
    ]
    pvc = objs.get("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pod_spec(w)["runtimeClassName"] == "nvidia"
    shm = next(v for v in pod_spec(w)["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["sizeLimit"] == 34359738368
    assert objs.get("PodDisruptionBudget", w["metadata"]["name"])["spec"]["maxUnavailable"] == 1


def test_statefulset_pvc_cache_is_one_claim_per_replica() -> None:
    objs = render(example("h200-single.yaml"))
    (w,) = objs.engines()
    assert w["kind"] == "StatefulSet"
    (tmpl,) = w["spec"]["volumeClaimTemplates"]
    assert tmpl["metadata"]["name"] == "cache" and tmpl["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert not any(v["name"] == "cache" for v in pod_spec(w)["volumes"])
    assert not objs.kinds("PersistentVolumeClaim")
    assert pod_spec(w)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def _secret_values(values: dict) -> list[str]:
    out = [DIGEST, S3_SECRET, REDIS_URL_PASSWORD]
    out += [values.get("minio", {}).get("rootPassword", ""), values.get("redis", {}).get("password", "")]
    out += [k["sha256"] for k in values.get("gateway", {}).get("apiKeys", [])]
    return [s for s in out if s]


@pytest.mark.parametrize("name", sorted(SETS))
def test_no_secret_values_outside_secrets(name: str) -> None:
    values = SETS[name]
    objs = render(values)
    secrets = _secret_values(values)
    for obj in objs:
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)
        for s in secrets:
            assert s not in text, f"{obj['kind']} {obj['metadata']['name']} contains a secret value"
    for cm in objs.kinds("ConfigMap"):
        for key, data in cm["data"].items():
            if key.endswith(".yaml"):
                doc = yaml.safe_load(data)
                assert "api_keys" not in doc and "upstream_api_key" not in json.dumps(doc)


def test_secrets_reach_the_gateway_as_env_and_files() -> None:
    objs = render(TP2_PVC)
    c = pod_spec(objs.gateway())["containers"][0]
    env = env_of(c)
    keys_secret = objs.get("Secret", f"{RELEASE}-private-llm-api-keys")
    keys = yaml.safe_load(keys_secret["stringData"]["api-keys.yaml"])
    assert keys == TP2_PVC["gateway"]["apiKeys"]
    assert env["GATEWAY_API_KEYS_FILE"] == "/etc/gateway/keys/api-keys.yaml"
    vol = next(v for v in pod_spec(objs.gateway())["volumes"] if v["name"] == "api-keys")
    assert vol["secret"]["secretName"] == keys_secret["metadata"]["name"]
    assert env["GATEWAY_QUOTA__REDIS_URL"] == {
        "secretKeyRef": {"name": f"{RELEASE}-private-llm-redis-url", "key": "redis-url"}
    }
    # the engines read S3 credentials from the chart's Secret
    pull = pod_spec(objs.engines()[0])["initContainers"][0]
    assert env_of(pull)["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": f"{RELEASE}-private-llm-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert objs.get("Secret", f"{RELEASE}-private-llm-s3")["stringData"]["AWS_SECRET_ACCESS_KEY"] == S3_SECRET
    # gateway.s3Credentials: the gateway gets the same (audit archive); by default it does not
    assert env["AWS_SECRET_ACCESS_KEY"] == env_of(pull)["AWS_SECRET_ACCESS_KEY"]
    assert env["S3_ENDPOINT_URL"] == "https://s3.internal.example.com"
    assert "AWS_SECRET_ACCESS_KEY" not in env_of(
        pod_spec(render(example("h200-single.yaml")).gateway())["containers"][0]
    )


def test_api_key_file_loads_into_the_gateway_key_store(tmp_path) -> None:
    from gateway.auth.apikeys import ApiKeyStore

    objs = render(TP2_PVC)
    f = tmp_path / "api-keys.yaml"
    f.write_text(objs.get("Secret", f"{RELEASE}-private-llm-api-keys")["stringData"]["api-keys.yaml"])
    store = ApiKeyStore.from_settings([], str(f))
    assert len(store) == 1
    principal = store.lookup("password")  # DIGEST is sha256("password")
    assert principal is not None and principal.tenant == "ci" and principal.key_id == "ci"
    assert store.lookup("wrong") is None


def test_existing_secrets_are_referenced_not_created() -> None:
    from tests.helm.value_sets import BUNDLED_EXISTING, EXTERNAL_SECRETS

    objs = render(EXTERNAL_SECRETS)
    assert not objs.kinds("Secret")
    gw = pod_spec(objs.gateway())
    env = env_of(gw["containers"][0])
    assert env["GATEWAY_API_KEYS_FILE"] == "/etc/gateway/keys/keys.yaml"
    assert next(v for v in gw["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == "llm-api-keys"
    assert env["GATEWAY_QUOTA__REDIS_URL"] == {"secretKeyRef": {"name": "quota-redis", "key": "url"}}
    for w in objs.engines():
        e = env_of(pod_spec(w)["containers"][0])
        assert e["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "model-store", "key": "access"}}
        assert e["S3_ENDPOINT_URL"] == "http://minio.storage:9000"

    objs = render(BUNDLED_EXISTING)
    assert not objs.kinds("Secret")
    minio = objs.get("StatefulSet", f"{RELEASE}-private-llm-minio")
    assert (
        env_of(pod_spec(minio)["containers"][0])["MINIO_ROOT_PASSWORD"]["secretKeyRef"]["name"]
        == "minio-root"
    )
    e = env_of(pod_spec(objs.engines()[0])["containers"][0])
    assert e["S3_ENDPOINT_URL"] == f"http://{RELEASE}-private-llm-minio.{NAMESPACE}.svc.cluster.local:9000"
    assert e["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "minio-root", "key": "rootPassword"}}
    genv = env_of(pod_spec(objs.gateway())["containers"][0])
    assert genv["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "redis-auth", "key": "password"}}
    assert (
        genv["GATEWAY_QUOTA__REDIS_URL"]
        == f"redis://:$(REDIS_PASSWORD)@{RELEASE}-private-llm-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    )
    cache = next(v for v in pod_spec(objs.engines()[0])["volumes"] if v["name"] == "cache")
    assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": "shared-weights"}}


def test_bundled_minio_and_redis_are_off_by_default_and_self_contained_when_on() -> None:
    assert not [w for w in render({}).workloads() if component(w) in ("minio", "redis")]
    values = example("self-contained.yaml")
    objs = render(values)
    comps = {component(w): w for w in objs.workloads()}
    assert {"minio", "redis", "gateway", "engine"} <= set(comps)
    for name in ("minio", "redis"):
        w = comps[name]
        assert w["kind"] == "StatefulSet" and w["spec"]["replicas"] == 1
        assert pod_spec(w)["securityContext"]["runAsNonRoot"] is True
        pol = objs.get("NetworkPolicy", f"{RELEASE}-private-llm-{name}")
        assert selector_matches(
            pol["spec"]["podSelector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]
        )
    assert pod_spec(comps["minio"])["containers"][0]["image"].startswith("minio/minio:")
    assert pod_spec(comps["redis"])["containers"][0]["image"].startswith("redis:")
    # the Redis password reaches redis-server through stdin, not its command line
    args = " ".join(pod_spec(comps["redis"])["containers"][0]["args"])
    assert values["redis"]["password"] not in args and "requirepass" in args


def _checksum(objs, key: str) -> str:
    return objs.gateway()["spec"]["template"]["metadata"]["annotations"][key]


def test_checksum_annotations_roll_pods_when_config_or_secrets_change() -> None:
    base = copy.deepcopy(TP2_PVC)
    a = render(base)
    # a gateway setting changes: the gateway's config checksum (and so its pod template) changes
    changed = copy.deepcopy(base)
    changed["gateway"]["config"] = {"max_retries": 5}
    b = render(changed)
    assert _checksum(a, "checksum/config") != _checksum(b, "checksum/config")
    assert a.gateway()["spec"]["template"] != b.gateway()["spec"]["template"]
    # engines are untouched by a gateway-only change (no needless GPU restarts)
    assert a.engines()[0]["spec"]["template"] == b.engines()[0]["spec"]["template"]
    # an API key added: the Secret checksum changes, the config checksum does not
    keys = copy.deepcopy(base)
    keys["gateway"]["apiKeys"].append({"id": "new", "sha256": "a" * 64})
    c = render(keys)
    assert _checksum(a, "checksum/secrets") != _checksum(c, "checksum/secrets")
    assert _checksum(a, "checksum/config") == _checksum(c, "checksum/config")
    # S3 credentials rotated: the engines roll
    rotated = copy.deepcopy(base)
    rotated["s3"]["secretAccessKey"] = "rotated-secret"
    d = render(rotated)
    ann = lambda objs: objs.engines()[0]["spec"]["template"]["metadata"]["annotations"]["checksum/s3"]  # noqa: E731
    assert ann(a) != ann(d)
    # the same values render the same checksums (no random churn on every upgrade)
    assert _checksum(a, "checksum/config") == _checksum(render(copy.deepcopy(base)), "checksum/config")


def test_new_model_version_is_a_rolling_upgrade_with_no_unavailable_replica() -> None:
    """Changing a model's source changes only its engine's pod template; the Deployment's strategy starts the
    new replica (maxSurge) and keeps every old one (maxUnavailable 0) until the new one passes readiness."""
    v1 = copy.deepcopy(TP2_PVC)
    v2 = copy.deepcopy(TP2_PVC)
    v2["models"][0]["source"] = "s3://weights/mixtral-8x7b-instruct/v0.2"
    a, b = render(v1).engines()[0], render(v2).engines()[0]
    assert a["metadata"]["name"] == b["metadata"]["name"]
    assert a["spec"]["selector"] == b["spec"]["selector"], "a changed selector would make upgrades fail"
    assert a["spec"]["template"] != b["spec"]["template"]
    assert b["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert pod_spec(b)["initContainers"][0]["args"][1] == "s3://weights/mixtral-8x7b-instruct/v0.2"
    assert pod_spec(b)["containers"][0]["readinessProbe"]
    # the gateway's view of the model (its headless Service) does not change: no gateway restart
    assert render(v1).gateway_config() == render(v2).gateway_config()


def test_blue_green_switch_by_pool_weights() -> None:
    values = example("blue-green.yaml")
    before = render(values)
    names = {w["metadata"]["labels"]["private-llm/pool"]: w for w in before.engines()}
    assert set(names) == {"blue", "green"}
    assert pod_spec(names["green"])["initContainers"][0]["args"][1].endswith("/2024-12")
    (model,) = before.gateway_config()["models"]
    assert model["upstreams"] == [
        f"dns+http://{names['blue']['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8000"
    ]
    # both pools serve the model under the same name, so the switch is invisible to clients
    served = {env_of(pod_spec(w)["containers"][0])["ENGINE_SERVED_MODEL_NAME"] for w in before.engines()}
    assert served == {model["upstream_model"]} == {"llama-3.1-8b-instruct"}

    switched = copy.deepcopy(values)
    switched["models"][0]["pools"][0]["weight"] = 0
    switched["models"][0]["pools"][1]["weight"] = 100
    after = render(switched)
    (model2,) = after.gateway_config()["models"]
    assert model2["upstreams"] == [
        f"dns+http://{names['green']['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8000"
    ]
    # the gateway rolls to the new config; neither engine pool is restarted by the switch
    assert _checksum(before, "checksum/config") != _checksum(after, "checksum/config")
    for b, a in zip(before.engines(), after.engines(), strict=True):
        assert b["metadata"]["name"] == a["metadata"]["name"] and b["spec"] == a["spec"]

    both = copy.deepcopy(values)
    both["models"][0]["pools"][1]["weight"] = 50
    (model3,) = render(both).gateway_config()["models"]
    assert len(model3["upstreams"]) == 2


def test_two_models_render_two_engines_and_two_gateway_models() -> None:
    objs = render(example("two-models.yaml"))
    cfg = objs.gateway_config()
    assert [m["name"] for m in cfg["models"]] == ["llama-3.1-8b-instruct", "llama-3.3-70b-instruct"]
    # the chart's default timeouts, with this model's longer first byte
    assert cfg["models"][1]["timeouts"] == {"connect": 5, "first_byte": 300, "idle": 30, "total": 0}
    # free-form sections pass through; the chart fills in the deployment-specific keys
    assert cfg["quota"]["default"] == {"rpm": 600, "tpm": 200000, "max_concurrent": 32}
    assert cfg["quota"]["backend"] == "redis", "a Redis is configured: quota state is shared"
    assert cfg["auth"]["issuers"][0]["audience"] == "private-llm"
    assert cfg["audit"]["path"] == "/var/lib/gateway/audit/audit.jsonl"
    c = pod_spec(objs.gateway())["containers"][0]
    assert {"name": "audit", "mountPath": "/var/lib/gateway/audit"} in c["volumeMounts"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # nothing configured: nothing added
    plain = render({"models": [{"name": "m", "source": "s3://models/m"}]}).gateway_config()
    assert "quota" not in plain and "audit" not in plain
    explicit = {
        "models": [{"name": "m", "source": "s3://models/m"}],
        "redis": {"external": {"url": "redis://r:6379/0"}},
        "gateway": {"config": {"quota": {"backend": "memory"}, "audit": {"path": "/data/a.jsonl"}}},
    }
    cfg = render(explicit).gateway_config()
    assert cfg["quota"]["backend"] == "memory" and cfg["audit"]["path"] == "/data/a.jsonl"
    kinds = sorted((w["kind"], w["metadata"]["name"]) for w in objs.engines())
    assert kinds == [
        ("Deployment", f"{RELEASE}-private-llm-llama-3-1-8b-instruct"),
        ("StatefulSet", f"{RELEASE}-private-llm-llama-70b"),
    ]


def test_monitoring_objects_when_enabled() -> None:
    from tests.helm.value_sets import EXTERNAL_SECRETS

    assert not [o for o in render({}) if o["apiVersion"].startswith("monitoring.coreos.com")]
    objs = render(EXTERNAL_SECRETS)
    sms = {m["metadata"]["name"]: m for m in objs.kinds("ServiceMonitor")}
    gw_sm = sms[f"{RELEASE}-private-llm-gateway"]
    gw_svc = objs.get("Service", f"{RELEASE}-private-llm-gateway")
    metrics_svc = objs.get("Service", f"{RELEASE}-private-llm-gateway-metrics")
    # The gateway's metrics have their own ClusterIP Service and port; the API Service (maybe a LoadBalancer)
    # does not carry them.
    assert selector_matches(gw_sm["spec"]["selector"]["matchLabels"], metrics_svc["metadata"]["labels"])
    assert not selector_matches(gw_sm["spec"]["selector"]["matchLabels"], gw_svc["metadata"]["labels"])
    assert metrics_svc["spec"]["type"] == "ClusterIP"
    assert [p["name"] for p in metrics_svc["spec"]["ports"]] == ["metrics"]
    assert [e["port"] for e in gw_sm["spec"]["endpoints"]] == ["metrics"]
    (gw,) = [d for d in objs.kinds("Deployment") if d["metadata"]["name"] == f"{RELEASE}-private-llm-gateway"]
    env = {e["name"]: e.get("value") for e in gw["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GATEWAY_METRICS_PORT"] == "9091" and env["GATEWAY_TRUSTED_PROXIES"] == "[]"
    eng_sm = sms[f"{RELEASE}-private-llm-engines"]
    for w in objs.engines():
        svc = objs.get("Service", w["metadata"]["name"])
        assert selector_matches(eng_sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert not selector_matches(eng_sm["spec"]["selector"]["matchLabels"], gw_svc["metadata"]["labels"])


def test_gateway_network_policy_opens_metrics_to_prometheus_only() -> None:
    objs = render({})
    pol = objs.get("NetworkPolicy", f"{RELEASE}-private-llm-gateway")
    rules = pol["spec"]["ingress"]
    api = [r for r in rules if [p["port"] for p in r["ports"]] == ["http"]]
    metrics = [r for r in rules if [p["port"] for p in r["ports"]] == ["metrics"]]
    assert len(api) == 1 and "from" not in api[0]  # clients reach the API from anywhere
    assert len(metrics) == 1 and metrics[0]["from"][0]["podSelector"]["matchLabels"]
    assert all("metrics" not in [p["port"] for p in r["ports"]] or r.get("from") for r in rules)


def test_redis_persistence_on_by_default() -> None:
    objs = render({"redis": {"enabled": True, "password": "pw"}})
    (sts,) = [s for s in objs.kinds("StatefulSet") if s["metadata"]["name"].endswith("-redis")]
    assert "--appendonly yes" in sts["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert sts["spec"].get("volumeClaimTemplates")


def test_notes_print_base_url_and_a_curl() -> None:
    from tests.helm.chart import notes

    text = notes(example("two-models.yaml"))
    assert "Base URL for OpenAI clients: https://llm.example.com/v1" in text
    assert "curl https://llm.example.com/v1/chat/completions" in text
    assert '"model": "llama-3.1-8b-instruct"' in text
    text = notes(example("h200-single.yaml"))
    assert f"port-forward svc/{RELEASE}-private-llm-gateway 8080:80" in text
    assert "http://127.0.0.1:8080/v1" in text


DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LONG = {
    "models": [
        {
            "name": "Meta-Llama-3.1-405B-Instruct-FP8-dynamic (internal build #7, long name)",
            "source": "s3://models/x",
            "workload": "StatefulSet",
        },
        {
            "name": "another.model/with:odd_chars",
            "source": "s3://models/y",
            "pools": [{"name": "blue-pool-long-name", "weight": 1}],
        },
    ]
}


@pytest.mark.parametrize("name", [*sorted(SETS), "long-names"])
def test_names_and_labels_are_valid_for_kubernetes(name: str) -> None:
    values = LONG if name == "long-names" else SETS[name]
    for o in render(values, release="my-production-release-name"):
        n = o["metadata"]["name"]
        assert len(n) <= 63 and DNS_1123_LABEL.match(n), n
        if o["kind"] == "StatefulSet":
            assert len(n) <= 52, f"{n}: too long for the controller-revision-hash label"
        labels = dict(o["metadata"].get("labels", {}))
        if o["kind"] in ("Deployment", "StatefulSet"):
            labels.update(o["spec"]["template"]["metadata"]["labels"])
        for k, v in labels.items():
            assert len(str(v)) <= 63 and LABEL_VALUE.match(str(v)), (n, k, v)


def test_tool_structured_output_and_lora_settings_reach_the_engine() -> None:
    """The chart's typed settings for tools, structured output, pooling models, the Responses store and
    run-time LoRA become the engine's ENGINE_* variables, which engine/settings.py validates."""
    from engine.settings import EngineSettings

    settings = {
        "toolCallParser": "hermes",
        "enableAutoToolChoice": True,
        "structuredOutputsDisableAnyWhitespace": True,
        "toolCallStructuralTags": False,
        "responsesStore": True,
        "allowRuntimeLora": True,
        "maxLoraRank": 16,
    }
    objs = render({"models": [{"name": "m", "source": "s3://models/m", "settings": settings}]})
    env = env_of(pod_spec(objs.engines()[0])["containers"][0])
    assert env["ENGINE_TOOL_CALL_PARSER"] == "hermes" and env["ENGINE_ENABLE_AUTO_TOOL_CHOICE"] == "true"
    assert env["ENGINE_MAX_LORA_RANK"] == "16"
    engine_env = {k[len("ENGINE_") :].lower(): v for k, v in env.items() if k.startswith("ENGINE_")}
    s = EngineSettings(**engine_env)
    assert s.enable_auto_tool_choice and s.structured_outputs_disable_any_whitespace and s.responses_store
    assert s.allow_runtime_lora and s.lora_enabled and not s.tool_call_structural_tags
    plain = env_of(pod_spec(render({"models": [{"name": "m", "source": "s3://models/m"}]}).engines()[0])["containers"][0])
    assert not any(k in plain for k in ("ENGINE_TOOL_CALL_PARSER", "ENGINE_RUNNER", "ENGINE_RESPONSES_STORE"))
