"""Multi-pod engine groups: a model too large for one node renders as a LeaderWorkerSet whose leaders alone serve
HTTP and take the gateway's traffic, and whose pods carry what engine/group.py needs to form the group."""

from __future__ import annotations

import helm_python as helm
import pytest

from engine.group import resolve_plan
from engine.settings import EngineSettings
from engine.vllm_args import build_vllm_command
from tests.helm.chart import (
    LWS_WORKER_INDEX,
    NAMESPACE,
    env_of,
    example,
    group_pods,
    pod_spec,
    render,
    selector_matches,
)
from tests.helm.lws import validate_lws
from tests.helm.value_sets import GROUPS_RAY_DP

R1_H100 = example("deepseek-r1-h100-2nodes.yaml")
NAME = "llm-private-llm-deepseek-r1"


def _engine_settings(container: dict) -> EngineSettings:
    env = {k: v for k, v in env_of(container).items() if k.startswith("ENGINE_") and isinstance(v, str)}
    return EngineSettings(**{k.removeprefix("ENGINE_").lower(): v for k, v in env.items()})


def test_r1_on_two_h100_nodes_is_one_group_of_two_pods() -> None:
    objs = render(R1_H100)
    assert not objs.workloads() or all(w["metadata"]["name"] != NAME for w in objs.workloads())
    lws = objs.get("LeaderWorkerSet", NAME)
    validate_lws(lws)
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {
        "maxUnavailable": 0,
        "maxSurge": 1,
    }
    (claim,) = lwt["volumeClaimTemplates"]
    assert (
        claim["metadata"]["name"] == "cache" and claim["spec"]["resources"]["requests"]["storage"] == "900Gi"
    )
    for role in ("leader", "worker"):
        spec = pod_spec(group_pods(lws, role))
        main = spec["containers"][0]
        env = env_of(main)
        # 8 GPUs and one RDMA device per pod; RDMA pins memory
        for kind in ("requests", "limits"):
            assert main["resources"][kind]["nvidia.com/gpu"] == 8
            assert main["resources"][kind]["rdma/rdma_shared_device_a"] == 1
        assert "IPC_LOCK" in main["securityContext"]["capabilities"]["add"]
        assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert env["ENGINE_GROUP_LAUNCHER"] == "mp" and env["ENGINE_GPUS_PER_POD"] == "8"
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["NCCL_IB_HCA"] == "mlx5"
        assert env["VLLM_HOST_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        # every pod pulls and verifies the weights itself
        (pull,) = spec["initContainers"]
        assert pull["args"][:2] == ["pull", "s3://models/deepseek-r1"]
    leader = pod_spec(group_pods(lws, "leader"))["containers"][0]
    worker = pod_spec(group_pods(lws, "worker"))["containers"][0]
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {p["name"] for p in leader["ports"]} == {"http", "group"}
    assert "ports" not in worker and "readinessProbe" not in worker and "lifecycle" not in worker


def test_gateway_routes_to_the_leaders_only() -> None:
    objs = render(R1_H100)
    lws = objs.get("LeaderWorkerSet", NAME)
    svc = objs.get("Service", f"{NAME}-leaders")
    assert svc["spec"]["selector"][LWS_WORKER_INDEX] == "0"
    assert selector_matches(
        svc["spec"]["selector"], group_pods(lws, "leader")["spec"]["template"]["metadata"]["labels"]
    )
    assert not selector_matches(
        svc["spec"]["selector"], group_pods(lws, "worker")["spec"]["template"]["metadata"]["labels"]
    )
    (model,) = objs.gateway_config()["models"]
    assert model["upstreams"] == [f"dns+http://{NAME}-leaders.{NAMESPACE}.svc.cluster.local:8000"]
    # the LeaderWorkerSet's own headless Service is named after it: ours must not collide with it
    assert not [s for s in objs.kinds("Service") if s["metadata"]["name"] == NAME]


def test_group_pods_may_reach_each_other_on_any_port() -> None:
    objs = render(R1_H100)
    np = objs.get("NetworkPolicy", f"{NAME}-group")
    lws = objs.get("LeaderWorkerSet", NAME)
    for role in ("leader", "worker"):
        labels = group_pods(lws, role)["spec"]["template"]["metadata"]["labels"]
        assert selector_matches(np["spec"]["podSelector"]["matchLabels"], labels)
        assert selector_matches(np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"], labels)
    assert "ports" not in np["spec"]["ingress"][0]


@pytest.mark.parametrize(("index", "role"), [("0", "leader"), ("1", "worker")])
def test_rendered_pods_build_the_group_command_line(index: str, role: str) -> None:
    """What the chart sets plus what the LeaderWorkerSet controller adds gives each pod its vLLM flags."""
    lws = render(R1_H100).get("LeaderWorkerSet", NAME)
    container = pod_spec(group_pods(lws, role))["containers"][0]
    s = _engine_settings(container)
    lws_env = {
        "LWS_LEADER_ADDRESS": f"{NAME}-0.{NAME}.{NAMESPACE}",
        "LWS_GROUP_SIZE": "2",
        "LWS_WORKER_INDEX": index,
    }
    plan = resolve_plan(s, lws_env)
    assert plan.role == role
    cmd = build_vllm_command(s, "/cache/models/x", device="cuda", plan=plan)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "8"
    assert cmd[cmd.index("--pipeline-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--node-rank") + 1] == index
    assert ("--headless" in cmd) == (role == "worker")


def test_ray_and_data_parallel_groups() -> None:
    objs = render(GROUPS_RAY_DP)
    ray = objs.get("LeaderWorkerSet", "llm-private-llm-big-dense")
    dp = objs.get("LeaderWorkerSet", "llm-private-llm-big-moe")
    for lws in (ray, dp):
        validate_lws(lws)
    assert ray["spec"]["replicas"] == 2 and ray["spec"]["leaderWorkerTemplate"]["size"] == 2
    ray_env = env_of(pod_spec(group_pods(ray, "worker"))["containers"][0])
    assert ray_env["ENGINE_GROUP_LAUNCHER"] == "ray" and ray_env["ENGINE_GPUS_PER_POD"] == "4"
    assert "NCCL_NVLS_ENABLE" not in ray_env  # nvlinkMulticast: true
    main = pod_spec(group_pods(dp, "worker"))["containers"][0]
    dp_env = env_of(main)
    assert dp_env["ENGINE_DATA_PARALLEL_SIZE"] == "32" and dp_env["ENGINE_ENABLE_EXPERT_PARALLEL"] == "true"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 8
    s = _engine_settings(main)
    plan = resolve_plan(s, {"LWS_LEADER_ADDRESS": "lead", "LWS_GROUP_SIZE": "4", "LWS_WORKER_INDEX": "3"})
    cmd = build_vllm_command(s, "/m", device="cuda", plan=plan)
    assert cmd[cmd.index("--data-parallel-start-rank") + 1] == "24" and "--enable-expert-parallel" in cmd


def test_r1_on_one_h200_node_needs_no_group() -> None:
    objs = render(example("deepseek-r1-h200.yaml"))
    assert not objs.kinds("LeaderWorkerSet")
    (w,) = objs.engines()
    main = pod_spec(w)["containers"][0]
    assert w["kind"] == "StatefulSet" and main["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert env_of(main)["ENGINE_TENSOR_PARALLEL_SIZE"] == "8"


@pytest.mark.parametrize(
    ("group", "settings", "needle"),
    [
        (
            {"size": 2, "gpusPerPod": 4},
            {"tensorParallelSize": 8, "pipelineParallelSize": 2},
            "must equal group.size",
        ),
        ({"size": 2, "launcher": "dp", "dataParallelSize": 3, "gpusPerPod": 2}, {}, "multiple of group.size"),
        ({"size": 2, "launcher": "dp", "dataParallelSize": 4}, {}, "gpusPerPod is required"),
    ],
)
def test_layouts_that_do_not_fill_the_group_fail_at_install(group: dict, settings: dict, needle: str) -> None:
    values = {"models": [{"name": "m", "source": "s3://models/m", "group": group, "settings": settings}]}
    with pytest.raises(helm.HelmRenderError, match=needle):
        render(values)


def test_a_misspelled_group_key_fails_at_install() -> None:
    values = {"models": [{"name": "m", "source": "s3://models/m", "group": {"size": 2, "gpusPerPods": 8}}]}
    with pytest.raises(helm.HelmValuesError, match="gpusPerPods"):
        render(values)
