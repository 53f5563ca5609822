"""Multi-pod groups: roles from settings or LeaderWorkerSet's variables, vLLM flags per launcher and role,
layout checks, and the leader's weights digest that workers compare before joining."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from engine.group import (
    GroupError,
    GroupInfoServer,
    GroupPlan,
    check_same_weights,
    manifest_digest,
    ray_command,
    resolve_plan,
    wait_for_leader,
)
from engine.group_run import commands
from engine.manifest import MANIFEST_NAME
from engine.settings import EngineSettings
from engine.vllm_args import EngineArgsError, build_vllm_command
from tests.support import REPO

LWS = {"LWS_LEADER_ADDRESS": "r1-0.r1.ns", "LWS_GROUP_SIZE": "2"}


def _s(**kw: object) -> EngineSettings:
    return EngineSettings(model="/m", served_model_name="r1", **kw)  # type: ignore[arg-type]


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_single_pod_by_default_and_no_group_flags() -> None:
    plan = resolve_plan(_s(), {})
    assert plan == GroupPlan("single", 1, 0, None, "mp")
    cmd = build_vllm_command(_s(), "/m", device="cuda", plan=plan)
    for flag in ("--nnodes", "--headless", "--distributed-executor-backend", "--data-parallel-size"):
        assert flag not in cmd


@pytest.mark.parametrize(("index", "role"), [("0", "leader"), ("1", "worker")])
def test_role_from_leaderworkerset_environment(index: str, role: str) -> None:
    plan = resolve_plan(_s(), {**LWS, "LWS_WORKER_INDEX": index})
    assert (plan.role, plan.size, plan.index, plan.leader_address) == (role, 2, int(index), "r1-0.r1.ns")


def test_settings_override_the_environment() -> None:
    plan = resolve_plan(
        _s(group_role="worker", group_index=2, group_size=3, group_leader_address="10.0.0.9"),
        {**LWS, "LWS_WORKER_INDEX": "1"},
    )
    assert (plan.role, plan.size, plan.index, plan.leader_address) == ("worker", 3, 2, "10.0.0.9")


@pytest.mark.parametrize(
    ("settings", "env", "needle"),
    [
        ({"group_size": 2}, {}, "index is unknown"),
        ({"group_role": "worker", "group_size": 2, "group_index": 1}, {}, "leader's address"),
        (
            {"group_role": "worker", "group_size": 2, "group_index": 2, "group_leader_address": "x"},
            {},
            "between 1 and 1",
        ),
        ({"group_role": "leader", "group_size": 1}, {}, "GROUP_SIZE >= 2"),
        ({"group_role": "leader", "group_size": 2, "group_index": 1}, {}, "index 0"),
        ({}, {"LWS_GROUP_SIZE": "two", "LWS_WORKER_INDEX": "0"}, "LWS_GROUP_SIZE='two'"),
    ],
)
def test_impossible_roles_are_named(settings: dict[str, object], env: dict[str, str], needle: str) -> None:
    with pytest.raises(GroupError, match=needle):
        resolve_plan(_s(**settings), env)


def test_mp_launcher_spans_tensor_and_pipeline_parallel_over_the_group() -> None:
    s = _s(tensor_parallel_size=8, pipeline_parallel_size=2, gpus_per_pod=8, group_master_port=29600)
    leader = build_vllm_command(
        s, "/m", device="cuda", plan=resolve_plan(s, {**LWS, "LWS_WORKER_INDEX": "0"})
    )
    worker = build_vllm_command(
        s, "/m", device="cuda", plan=resolve_plan(s, {**LWS, "LWS_WORKER_INDEX": "1"})
    )
    for cmd, rank in ((leader, "0"), (worker, "1")):
        assert _flag(cmd, "--tensor-parallel-size") == "8" and _flag(cmd, "--pipeline-parallel-size") == "2"
        assert _flag(cmd, "--distributed-executor-backend") == "mp"
        assert _flag(cmd, "--nnodes") == "2" and _flag(cmd, "--node-rank") == rank
        assert _flag(cmd, "--master-addr") == "r1-0.r1.ns" and _flag(cmd, "--master-port") == "29600"
    assert "--headless" not in leader and "--headless" in worker


def test_ray_launcher_runs_vllm_on_the_leader_only() -> None:
    s = _s(group_launcher="ray", tensor_parallel_size=8, pipeline_parallel_size=2, ray_port=6380)
    lp = resolve_plan(s, {**LWS, "LWS_WORKER_INDEX": "0"})
    wp = resolve_plan(s, {**LWS, "LWS_WORKER_INDEX": "1"})
    vllm = build_vllm_command(s, "/m", device="cuda", plan=lp)
    assert _flag(vllm, "--distributed-executor-backend") == "ray" and "--nnodes" not in vllm
    head, serve = commands(s, lp, vllm, "/venv/bin/python")
    assert head[1:4] == ["start", "--head", "--port=6380"] and "--block" in head
    assert serve == vllm
    (node,) = commands(s, wp, build_vllm_command(s, "/m", device="cuda", plan=wp), "/venv/bin/python")
    assert node == ray_command(s, wp, node[0]) and "--address=r1-0.r1.ns:6380" in node


def test_dp_launcher_gives_each_pod_its_ranks_and_expert_parallel() -> None:
    s = _s(
        group_launcher="dp", data_parallel_size=16, enable_expert_parallel=True, data_parallel_rpc_port=14000
    )
    env = {**LWS, "LWS_WORKER_INDEX": "1"}
    worker = build_vllm_command(s, "/m", device="cuda", plan=resolve_plan(s, env))
    assert (
        _flag(worker, "--data-parallel-size") == "16" and _flag(worker, "--data-parallel-size-local") == "8"
    )
    assert _flag(worker, "--data-parallel-start-rank") == "8" and "--headless" in worker
    assert _flag(worker, "--data-parallel-address") == "r1-0.r1.ns"
    assert _flag(worker, "--data-parallel-rpc-port") == "14000" and "--enable-expert-parallel" in worker
    leader = build_vllm_command(
        s, "/m", device="cuda", plan=resolve_plan(s, {**LWS, "LWS_WORKER_INDEX": "0"})
    )
    assert "--headless" not in leader and "--data-parallel-start-rank" not in leader


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"tensor_parallel_size": 8, "gpus_per_pod": 8}, "must be equal"),
        ({"tensor_parallel_size": 1}, "smaller than the group"),
        ({"group_launcher": "dp", "data_parallel_size": 3}, "does not divide"),
        ({"group_launcher": "dp", "data_parallel_size": 1}, "smaller than the group"),
    ],
)
def test_layouts_that_do_not_fill_the_group_are_refused(settings: dict[str, object], needle: str) -> None:
    s = _s(**settings)
    with pytest.raises(EngineArgsError, match=needle):
        build_vllm_command(s, "/m", device="cuda", plan=resolve_plan(s, {**LWS, "LWS_WORKER_INDEX": "0"}))


def test_group_flags_cannot_be_smuggled_through_extra_args() -> None:
    with pytest.raises(EngineArgsError, match="--nnodes"):
        build_vllm_command(_s(extra_args="--nnodes 4"), "/m", device="cuda", plan=resolve_plan(_s(), {}))


def test_worker_refuses_to_join_a_leader_with_other_weights(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(b'{"files": []}')
    mine = manifest_digest(tmp_path)
    assert mine == hashlib.sha256(b'{"files": []}').hexdigest()
    server = GroupInfoServer("127.0.0.1", 0, {"digest": "f" * 64, "size": 2})
    try:
        plan = GroupPlan("worker", 2, 1, "127.0.0.1", "mp")
        info = wait_for_leader(plan, server.port, timeout=10)
        with pytest.raises(GroupError, match="changed in the object store") as e:
            check_same_weights(info, mine, plan)
        assert mine[:16] in str(e.value) and "f" * 16 in str(e.value)
        check_same_weights({"digest": mine, "size": 2}, mine, plan)  # the same weights join
        with pytest.raises(GroupError, match="group of 3"):
            check_same_weights({"digest": mine, "size": 3}, mine, plan)
    finally:
        server.shutdown()


def test_worker_gives_up_on_a_leader_that_never_answers() -> None:
    from tests.support import free_port

    with pytest.raises(GroupError, match="did not answer"):
        wait_for_leader(GroupPlan("worker", 2, 1, "127.0.0.1", "mp"), free_port(), timeout=1.5, interval=0.3)


def test_cli_dry_run_prints_each_process_of_the_pod() -> None:
    env = {
        "ENGINE_MODEL": str(REPO),
        "ENGINE_GROUP_LAUNCHER": "ray",
        "ENGINE_TENSOR_PARALLEL_SIZE": "2",
        "ENGINE_DEVICE": "cuda",
        "LWS_GROUP_SIZE": "2",
        "LWS_WORKER_INDEX": "0",
        "LWS_LEADER_ADDRESS": "lead",
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert (
        len(lines) == 2 and " start --head " in lines[0] and "--distributed-executor-backend ray" in lines[1]
    )
    bad = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--dry-run"],
        env={**env, "LWS_WORKER_INDEX": "1", "LWS_LEADER_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "leader's address" in bad.stderr
